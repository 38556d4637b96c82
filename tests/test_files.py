"""safetensors helpers: header reading, sshs hashes, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

import pytest
import safetensors.torch
import torch

from musubi import files as safetensors_io
from musubi.errors import MusubiError
from musubi.files import atomic_save_file, iter_tensors, model_hashes, read_header

torch.set_num_threads(1)

# Data-region order of safetensors serialisation (dtype group, then name), spec 7.4.
DTYPE_ORDER = ["I64", "F64", "F32", "I32", "BF16", "F16", "I16", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL"]
DTYPE_NAMES = {
    torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.int32: "I32", torch.bfloat16: "BF16",
    torch.float16: "F16", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def mixed_tensors(big: bool) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    tensors = {
        "b.lora_down.weight": torch.randn(4, 8, generator=generator).to(torch.bfloat16),
        "a.lora_up.weight": torch.randn(8, 4, generator=generator).to(torch.float16),
        "a.alpha": torch.tensor(4.0),
        "z.scale": torch.randn(3, generator=generator, dtype=torch.float64),
        "step": torch.tensor([12345], dtype=torch.int64),
        "counts": torch.arange(5, dtype=torch.int32),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(7, dtype=torch.uint8),
        "small": torch.arange(3, dtype=torch.int16),
        "tiny": torch.arange(-2, 2, dtype=torch.int8),
    }
    if big:  # pushes the buffer past 1 MiB + 64 KiB so the legacy hash window holds tensor bytes
        tensors["m.lora_down.weight"] = torch.randn(300_000, generator=generator)
    return tensors


def raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def independent_hashes(tensors, metadata):
    """Hashes built from the tensors' own bytes in the spec's order, not from a serialisation."""
    names = sorted(tensors, key=lambda name: (DTYPE_ORDER.index(DTYPE_NAMES[tensors[name].dtype]), name))
    data = b"".join(raw_bytes(tensors[name]) for name in names)
    # Only the header comes from the library: its length shifts the legacy window.
    training = {key: value for key, value in metadata.items() if key.startswith("ss_")}
    serialised = safetensors.torch.save(tensors, training)
    header_length = int.from_bytes(serialised[:8], "little")
    whole = serialised[:8 + header_length] + data
    assert whole == serialised  # the spec's layout is the one the library writes
    return hashlib.sha256(data).hexdigest(), hashlib.sha256(whole[0x100000:0x110000]).hexdigest()[:8]


METADATA = {"ss_network_dim": "4", "ss_output_name": "demo", "modelspec.title": "Demo", "sshs_model_hash": "old"}


@pytest.mark.parametrize("big", [False, True])
def test_model_hashes_match_an_independent_computation(big):
    tensors = mixed_tensors(big)
    model_hash, legacy_hash = model_hashes(tensors, METADATA)
    assert (model_hash, legacy_hash) == independent_hashes(tensors, METADATA)
    if not big:
        assert legacy_hash == hashlib.sha256(b"").hexdigest()[:8] == "e3b0c442"


def test_model_hash_ignores_metadata_and_legacy_hash_sees_only_ss_keys():
    tensors = mixed_tensors(big=True)
    base = model_hashes(tensors, METADATA)
    non_training_changed = model_hashes(tensors, {**METADATA, "modelspec.title": "x" * 5000, "sshs_legacy_hash": "y"})
    training_changed = model_hashes(tensors, {**METADATA, "ss_training_comment": "z" * 5000})
    assert non_training_changed == base
    assert training_changed[0] == base[0]
    assert training_changed[1] != base[1]
    assert model_hashes(tensors) == model_hashes(tensors, {"modelspec.title": "only"})


def test_model_hash_changes_with_one_bit():
    tensors = mixed_tensors(big=False)
    changed = dict(tensors)
    changed["a.alpha"] = torch.tensor(4.000001)
    assert model_hashes(changed)[0] != model_hashes(tensors)[0]


def test_read_header_returns_dtypes_shapes_and_metadata(tmp_path):
    path = str(tmp_path / "model.safetensors")
    tensors = mixed_tensors(big=False)
    safetensors.torch.save_file(tensors, path, metadata={"ss_a": "1", "note": "ü"})
    infos, metadata = read_header(path)
    assert metadata == {"ss_a": "1", "note": "ü"}
    assert infos == {name: (DTYPE_NAMES[t.dtype], tuple(t.shape)) for name, t in tensors.items()}

    safetensors.torch.save_file({"x": torch.zeros(2)}, path)
    assert read_header(path) == ({"x": ("F32", (2,))}, {})


def write_bytes(path, data: bytes) -> str:
    with open(path, "wb") as file:
        file.write(data)
    return str(path)


def header_file(tmp_path, header: bytes, data: bytes = b"") -> str:
    return write_bytes(tmp_path / "bad.safetensors", len(header).to_bytes(8, "little") + header + data)


@pytest.mark.parametrize("make_file", [
    lambda tmp: str(tmp / "missing.safetensors"),
    lambda tmp: str(tmp),
    lambda tmp: write_bytes(tmp / "short.safetensors", b"abc"),
    lambda tmp: write_bytes(tmp / "text.safetensors", b"this is a plain text file, not a model"),
    lambda tmp: header_file(tmp, b"\xff\xfe not json"),
    lambda tmp: header_file(tmp, b"[1, 2, 3]"),
    lambda tmp: header_file(tmp, json.dumps({"x": {"dtype": "F32", "shape": [4]}}).encode()),
    lambda tmp: header_file(tmp, json.dumps({"__metadata__": {"a": 1}}).encode()),
    lambda tmp: header_file(tmp, json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode(), b"\0" * 8),
], ids=["missing", "folder", "too-short", "text", "bad-json", "not-object", "no-offsets", "bad-metadata", "truncated"])
def test_read_header_rejects_non_safetensors_naming_the_file(tmp_path, make_file):
    path = make_file(tmp_path)
    with pytest.raises(MusubiError) as error:
        read_header(path)
    assert path in str(error.value)


def test_read_header_of_a_truncated_real_file(tmp_path):
    path = str(tmp_path / "cut.safetensors")
    safetensors.torch.save_file({"x": torch.zeros(64)}, path)
    os.truncate(path, os.path.getsize(path) - 10)
    with pytest.raises(MusubiError, match="outside the file"):
        read_header(path)


def test_iter_tensors_reads_requested_names(tmp_path):
    path = str(tmp_path / "m.safetensors")
    tensors = mixed_tensors(big=False)
    safetensors.torch.save_file(tensors, path)
    assert sorted(name for name, _ in iter_tensors(path)) == sorted(tensors)
    loaded = list(iter_tensors(path, ["counts", "a.alpha"]))
    assert [name for name, _ in loaded] == ["counts", "a.alpha"]
    assert all(torch.equal(tensor, tensors[name]) for name, tensor in loaded)
    with pytest.raises(MusubiError, match="m.safetensors"):
        list(iter_tensors(path, ["nope"]))


def test_atomic_save_file_writes_a_complete_file_and_no_leftovers(tmp_path):
    path = str(tmp_path / "out.safetensors")
    write_bytes(path, b"old content")
    tensors = mixed_tensors(big=False)
    atomic_save_file(tensors, path, {"ss_x": "1"})
    assert os.listdir(tmp_path) == ["out.safetensors"]
    loaded = safetensors.torch.load_file(path)
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[name], tensors[name]) and loaded[name].dtype == tensors[name].dtype for name in tensors)
    assert read_header(path)[1] == {"ss_x": "1"}


def test_atomic_save_file_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "out.safetensors")
    write_bytes(path, b"old content")

    def failing_save(tensors, filename, metadata=None):
        write_bytes(filename, b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors_io, "save_file", failing_save)
    with pytest.raises(OSError, match="No space"):
        atomic_save_file({"x": torch.zeros(2)}, path)
    assert os.listdir(tmp_path) == ["out.safetensors"]
    with open(path, "rb") as file:
        assert file.read() == b"old content"


def test_atomic_save_file_rejects_bad_metadata_and_missing_folder(tmp_path):
    with pytest.raises(MusubiError, match="'steps'"):
        atomic_save_file({"x": torch.zeros(2)}, str(tmp_path / "a.safetensors"), {"steps": 10})
    missing = str(tmp_path / "nope" / "a.safetensors")
    with pytest.raises(MusubiError, match="does not exist"):
        atomic_save_file({"x": torch.zeros(2)}, missing)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_saved_files_and_folders_get_the_permissions_the_umask_gives(tmp_path, umask):
    """safetensors' own writer creates 0600 files; everything saved must look like any other new file."""
    from musubi.files import write_folder_atomically, write_text_atomically

    previous = os.umask(umask)
    try:
        tensors_path = str(tmp_path / "model.safetensors")
        atomic_save_file({"w": torch.zeros(2)}, tensors_path)
        atomic_save_file({"w": torch.ones(2)}, tensors_path)  # replacing keeps the rule too
        text_path = str(tmp_path / "notes.json")
        write_text_atomically(text_path, "{}")
        state = str(tmp_path / "run-step000002-state")
        write_folder_atomically(state, {
            "network.safetensors": lambda path: safetensors.torch.save_file({"w": torch.zeros(1)}, path),
            "train_state.json": lambda path: open(path, "w").close(),
        })
        modes = {path: os.stat(path).st_mode & 0o777 for path in (tensors_path, text_path, state,
                                                                   os.path.join(state, "network.safetensors"),
                                                                   os.path.join(state, "train_state.json"))}
    finally:
        os.umask(previous)
    file_mode, folder_mode = 0o666 & ~umask, 0o777 & ~umask
    assert modes == {tensors_path: file_mode, text_path: file_mode, state: folder_mode,
                     os.path.join(state, "network.safetensors"): file_mode,
                     os.path.join(state, "train_state.json"): file_mode}


# --- reading without a memory map, writing as tensors come ---------------------------------------

def every_dtype_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(5, 7, generator=generator) * 3
    return {
        "f32": base.clone(), "f16": base.half(), "bf16": base.bfloat16(), "f64": base.double(),
        "e4m3": base.to(torch.float8_e4m3fn), "e5m2": base.to(torch.float8_e5m2),
        "i64": torch.arange(12).reshape(3, 4), "i8": torch.arange(-4, 4, dtype=torch.int8), "u8": torch.arange(9, dtype=torch.uint8),
        "bool": base > 0, "scalar": torch.tensor(2.5), "empty": torch.empty(0, 3), "odd_bytes": torch.arange(3, dtype=torch.int8),
    }


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (fp8 has no equality of its own)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("borrowed", [False, True])
def test_iter_tensors_reads_every_dtype_as_safetensors_does(tmp_path, borrowed):
    path = str(tmp_path / "all.safetensors")
    tensors = every_dtype_tensors()
    safetensors.torch.save_file(tensors, path)
    reference = safetensors.torch.load_file(path)
    read = {name: tensor.clone() for name, tensor in iter_tensors(path, borrowed=borrowed)}
    assert set(read) == set(reference)
    for name, tensor in reference.items():
        assert same(read[name], tensor), name


@pytest.mark.parametrize("borrowed", [False, True])
def test_iter_tensors_names_a_truncated_file_and_a_missing_tensor(tmp_path, borrowed):
    path = tmp_path / "cut.safetensors"
    safetensors.torch.save_file({"a": torch.ones(64), "b": torch.ones(64)}, str(path))
    with pytest.raises(MusubiError, match="no tensor named 'c'"):
        list(iter_tensors(str(path), ["c"], borrowed=borrowed))
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(MusubiError, match="cut.safetensors"):
        list(iter_tensors(str(path), borrowed=borrowed))


def resident_bytes_of_mapping(path: str) -> int:
    """Bytes of ``path``'s pages mapped into this process and resident, exactly (Linux smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
                inside = len(fields) >= 6 and fields[5] == path
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not safetensors_io._CAN_GIVE_PAGES_BACK or not os.path.exists("/proc/self/smaps"),
                    reason="needs madvise and /proc (Linux)")
def test_borrowed_tensors_give_their_pages_back_and_leave_the_file_alone(tmp_path):
    path = str(tmp_path / "big.safetensors")
    tensor_bytes = 4 << 20
    tensors = {f"t{index:02d}": torch.full((tensor_bytes // 4,), float(index)) for index in range(16)}  # 64 MiB in all
    safetensors.torch.save_file(tensors, path)
    before = safetensors_io.read_layout(path)
    with open(path, "rb") as file:
        original = hashlib.sha256(file.read()).hexdigest()
    resident = []
    for name, tensor in iter_tensors(path, borrowed=True):
        assert torch.equal(tensor, tensors[name])  # reads every page of it
        resident.append(resident_bytes_of_mapping(path))
        kept = tensor.clone()  # what a consumer keeps is its own copy
    assert min(resident) >= tensor_bytes  # the tensor at hand is resident (the measure sees it)...
    assert max(resident) < 3 * tensor_bytes  # ...but only about one at a time, not the 64 MiB file
    assert torch.equal(kept, tensors["t15"])
    with open(path, "rb") as file:
        assert hashlib.sha256(file.read()).hexdigest() == original
    assert safetensors_io.read_layout(path) == before


def test_stream_save_file_writes_what_safetensors_reads(tmp_path):
    tensors = every_dtype_tensors()
    path = str(tmp_path / "streamed.safetensors")
    safetensors_io.stream_save_file(path, safetensors_io.entries_of(tensors), iter(tensors.items()), {"note": "x"})
    loaded = safetensors.torch.load_file(path)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert same(loaded[name], tensor), name
    assert read_header(path)[1] == {"note": "x"}
    with open(path, "rb") as file:
        header_length = int.from_bytes(file.read(8), "little")
    assert header_length % 8 == 0  # tensor data starts aligned


def test_stream_save_file_refuses_a_tensor_that_differs_from_its_entry_and_leaves_nothing(tmp_path):
    path = tmp_path / "bad.safetensors"
    entries = [("a", "F32", (2,)), ("b", "BF16", (3,))]
    with pytest.raises(MusubiError, match="'b'"):
        safetensors_io.stream_save_file(str(path), entries, iter([("a", torch.ones(2)), ("b", torch.ones(3))]))
    with pytest.raises(MusubiError, match="announced but never given"):
        safetensors_io.stream_save_file(str(path), entries, iter([("a", torch.ones(2))]))
    assert os.listdir(tmp_path) == []
    assert not [thread for thread in threading.enumerate() if thread.name == "musubi-sync"]


def test_stream_save_file_flushes_to_disk_while_writing(tmp_path, monkeypatch):
    """The disk works while later tensors are still being produced, not all at the closing fsync."""
    flushed_sizes = []
    real_sync = getattr(os, "fdatasync", os.fsync)

    def recording_sync(descriptor):
        flushed_sizes.append(os.fstat(descriptor).st_size)
        real_sync(descriptor)

    monkeypatch.setattr(os, "fdatasync" if hasattr(os, "fdatasync") else "fsync", recording_sync)
    monkeypatch.setattr(safetensors_io._SyncAsYouGo, "STRETCH", 64 << 10)
    tensors = {f"t{index}": torch.full((64 << 10,), float(index)) for index in range(8)}  # 256 KiB each

    def slowly():
        for index, (name, tensor) in enumerate(tensors.items()):
            if index == len(tensors) - 1:  # like a quantizer still busy: give the flushing thread its turn
                deadline = time.monotonic() + 20
                while not flushed_sizes and time.monotonic() < deadline:
                    time.sleep(0.01)
            yield name, tensor

    path = str(tmp_path / "streamed.safetensors")
    safetensors_io.stream_save_file(path, safetensors_io.entries_of(tensors), slowly())
    total = os.path.getsize(path)
    early = [size for size in flushed_sizes if size < total]
    assert early, flushed_sizes  # at least one flush before the last tensor was written
    loaded = safetensors.torch.load_file(path)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
