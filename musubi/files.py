"""Reading, hashing and atomically writing files (safetensors and any other), and the rules for
the names users give to what is written.

A safetensors file is an 8-byte little-endian header length ``n``, a JSON header of ``n`` bytes
(tensor name -> dtype, shape, byte offsets, plus an optional ``__metadata__`` map of strings) and
then the raw tensor bytes. Reading only the header lets callers validate many files cheaply
before loading any tensor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
import re
import secrets
import shutil
import stat
import sys
import threading
import time
import unicodedata
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import MusubiError

logger = logging.getLogger(__name__)

# A header larger than this is certainly not a real safetensors header (the reference
# implementation refuses headers above 100 MB as well).
MAX_HEADER_BYTES = 100 * 1024 * 1024

# Window hashed by the "legacy" model hash of sd-webui-additional-networks.
LEGACY_HASH_START = 0x100000
LEGACY_HASH_LENGTH = 0x10000

TensorInfo = tuple[str, tuple[int, ...]]


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Return ``({name: (dtype, shape)}, metadata)`` of a safetensors file without loading tensors.

    ``metadata`` is ``{}`` when the file has none. Raises MusubiError naming the file when it is
    missing, unreadable, or not a well-formed safetensors file.
    """
    layout = read_layout(path)
    return {name: (entry.dtype, entry.shape) for name, entry in layout.tensors.items()}, layout.metadata


@dataclass(frozen=True)
class TensorEntry:
    dtype: str  # safetensors' name: BF16, F8_E4M3, …
    shape: tuple[int, ...]
    start: int  # byte offset in the file
    length: int  # bytes


@dataclass(frozen=True)
class FileLayout:
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def read_layout(path: str) -> FileLayout:
    """Where each tensor of a safetensors file lies, read from its header alone (checked as :func:`read_header`)."""
    if not os.path.exists(path):
        raise MusubiError(f"{path}: file not found; check the path.")
    if os.path.isdir(path):
        raise MusubiError(f"{path}: is a folder, expected a .safetensors file.")
    try:
        with open(path, "rb") as file:
            file_size = os.fstat(file.fileno()).st_size
            length_bytes = file.read(8)
            if len(length_bytes) < 8:
                raise _not_safetensors(path, "the file is shorter than the 8-byte header length")
            header_length = int.from_bytes(length_bytes, "little")
            if header_length > MAX_HEADER_BYTES or 8 + header_length > file_size:
                raise _not_safetensors(path, f"the header length {header_length} does not fit the file size {file_size}")
            header_bytes = file.read(header_length)
    except OSError as error:
        raise MusubiError(f"{path}: cannot be read ({error.strerror or error}); check its permissions.") from error

    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _not_safetensors(path, f"the header is not valid JSON ({error})") from error
    if not isinstance(header, dict):
        raise _not_safetensors(path, "the header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise _not_safetensors(path, "the __metadata__ entry is not a map of strings")

    data_start = 8 + header_length
    data_size = file_size - data_start
    tensors: dict[str, TensorEntry] = {}
    for name, info in header.items():
        try:
            dtype = info["dtype"]
            shape = tuple(int(size) for size in info["shape"])
            begin, end = (int(offset) for offset in info["data_offsets"])
        except (TypeError, KeyError, ValueError) as error:
            raise _not_safetensors(path, f"the header entry of tensor '{name}' is malformed") from error
        if not isinstance(dtype, str) or not 0 <= begin <= end <= data_size:
            raise _not_safetensors(path, f"tensor '{name}' lies outside the file (truncated download?)")
        tensors[name] = TensorEntry(dtype, shape, data_start + begin, end - begin)
    return FileLayout(tensors, dict(metadata))


def _not_safetensors(path: str, reason: str) -> MusubiError:
    return MusubiError(f"{path}: not a readable safetensors file: {reason}.")


def is_float_dtype(dtype: str) -> bool:
    """True for the floating-point dtype names of a safetensors header (F16, BF16, F8_E4M3, …)."""
    return dtype.startswith("F") or dtype == "BF16"


def dtype_and_shape(value) -> tuple[str, tuple[int, ...]]:
    """Safetensors dtype name and shape of a tensor, a ``(dtype, shape)`` pair or a raw header entry."""
    if isinstance(value, torch.Tensor):
        return _SAFETENSORS_DTYPE_NAMES.get(value.dtype, str(value.dtype)), tuple(value.shape)
    if isinstance(value, Mapping):
        return str(value["dtype"]), tuple(int(size) for size in value["shape"])
    dtype, shape = value
    return str(dtype), tuple(int(size) for size in shape)


_SAFETENSORS_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ", torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


# safetensors dtype names -> torch dtypes (those this torch has).
_TORCH_DTYPES = {
    name: getattr(torch, attribute)
    for name, attribute in (("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
                            ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("I64", "int64"), ("I32", "int32"),
                            ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("U16", "uint16"), ("U32", "uint32"),
                            ("U64", "uint64"), ("BOOL", "bool"))
    if hasattr(torch, attribute)
}
SAFETENSORS_DTYPES = {dtype: name for name, dtype in _TORCH_DTYPES.items()}


def iter_tensors(path: str, names: Iterable[str] | None = None, *,
                 borrowed: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` of a file one tensor at a time, so only one is loaded at once.

    ``names`` restricts (and orders) what is read; by default every tensor in file order. Each
    tensor is read into memory of its own with plain reads, not through a memory map: a map
    keeps every page it touched resident until it closes, so going through a 28 GB checkpoint
    would end with all of it counted in the process's memory.

    With ``borrowed``, a tensor is instead a read-only view of the file mapped into memory, so
    nothing is copied; once the next tensor is asked for, the pages of the previous one are given
    back, and reading it again would fault them back in. For consumers that read each tensor and
    let it go (the quantizer), copy what they keep and never write to one (the pages are the
    file's: writing is a crash, not an error). A read-only map is not charged against the
    system's memory commit, so a checkpoint larger than RAM maps as well. Where pages cannot be
    given back (no ``madvise``), tensors are read as usual.
    """
    layout = read_layout(path)
    if sys.byteorder != "little":  # the file's bytes are little-endian; let safetensors convert
        yield from _iter_tensors_mapped(path, names)
        return
    order = list(layout.tensors) if names is None else list(names)
    if borrowed and _CAN_GIVE_PAGES_BACK:
        yield from _iter_tensors_borrowed(path, layout, order)
        return
    try:
        with open(path, "rb", buffering=0) as file:
            for name in order:
                yield name, _read_tensor(file, _entry(layout, path, name), path, name)
    except OSError as error:
        raise MusubiError(f"{path}: cannot read tensors ({error.strerror or error}).") from error


_CAN_GIVE_PAGES_BACK = hasattr(mmap.mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED")


def _entry(layout: FileLayout, path: str, name: str) -> TensorEntry:
    entry = layout.tensors.get(name)
    if entry is None:
        raise MusubiError(f"{path}: cannot read tensors (no tensor named {name!r}).")
    return entry


def _checked_dtype(entry: TensorEntry, path: str, name: str) -> torch.dtype:
    dtype = _TORCH_DTYPES.get(entry.dtype)
    if dtype is None:
        raise MusubiError(f"{path}: tensor {name!r} has the dtype {entry.dtype}, which this torch cannot hold.")
    expected = math.prod(entry.shape) * dtype.itemsize
    if expected != entry.length:
        raise _not_safetensors(path, f"tensor '{name}' takes {entry.length} bytes, not the {expected} its shape needs")
    return dtype


def _read_tensor(file, entry: TensorEntry, path: str, name: str) -> torch.Tensor:
    dtype = _checked_dtype(entry, path, name)
    if entry.length == 0:
        return torch.empty(entry.shape, dtype=dtype)
    buffer = bytearray(entry.length)
    file.seek(entry.start)
    view, read = memoryview(buffer), 0
    while read < entry.length:
        count = file.readinto(view[read:])
        if not count:
            raise _not_safetensors(path, f"tensor '{name}' ends early (truncated file?)")
        read += count
    return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(entry.shape)


def _iter_tensors_borrowed(path: str, layout: FileLayout, order: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        with open(path, "rb") as file:
            if os.fstat(file.fileno()).st_size == 0:
                return
            mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as error:
        raise MusubiError(f"{path}: cannot read tensors ({error.strerror or error}).") from error
    # The mapping is never closed by hand: tensors still alive keep it open, and it goes with them.
    whole = memoryview(mapping)
    page = mmap.PAGESIZE
    for name in order:
        entry = _entry(layout, path, name)
        dtype = _checked_dtype(entry, path, name)
        if entry.length == 0:
            yield name, torch.empty(entry.shape, dtype=dtype)
            continue
        first = entry.start - entry.start % page
        end = entry.start + entry.length
        mapping.madvise(mmap.MADV_WILLNEED, first, end - first)  # one big read-ahead, not page by page
        with warnings.catch_warnings():  # torch warns that the buffer is read-only, which is the point
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.frombuffer(whole[entry.start:end], dtype=torch.uint8)
        yield name, tensor.view(dtype).reshape(entry.shape)
        del tensor
        done = end - end % page  # the last page may be shared with the next tensor
        if done > first:
            mapping.madvise(mmap.MADV_DONTNEED, first, done - first)


def _iter_tensors_mapped(path: str, names: Iterable[str] | None) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        with safe_open(path, framework="pt", device="cpu") as file:
            for name in list(file.keys()) if names is None else names:
                yield name, file.get_tensor(name)
    except (OSError, safetensors.SafetensorError) as error:
        raise MusubiError(f"{path}: cannot read tensors ({error}).") from error


def stream_save_file(path: str, entries: Sequence[tuple[str, str, tuple[int, ...]]],
                     tensors: Iterable[tuple[str, torch.Tensor]], metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file tensor by tensor, as ``tensors`` produces them, atomically.

    ``entries`` — ``(name, safetensors dtype, shape)`` in the order ``tensors`` will yield them —
    make the header up front, so nothing but the tensor at hand is ever held: a checkpoint of any
    size is written with the memory of its largest tensor. A tensor that does not match its entry
    is an error (and no file is left behind).
    """
    header: dict[str, Any] = {}
    offset = 0
    for name, dtype, shape in entries:
        torch_dtype = _TORCH_DTYPES.get(dtype)
        if torch_dtype is None:
            raise MusubiError(f"{path}: cannot write tensor {name!r} of dtype {dtype}.")
        length = math.prod(shape) * torch_dtype.itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + length]}
        offset += length
    if metadata:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise MusubiError(f"metadata entry {key!r}: safetensors metadata keys and values must be strings.")
        header["__metadata__"] = dict(metadata)
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # tensor data starts 8-byte aligned

    def write(temporary: str) -> None:
        with open(temporary, "wb") as stream:
            stream.write(len(encoded).to_bytes(8, "little"))
            stream.write(encoded)
            expected = iter(entries)
            with _SyncAsYouGo(stream) as syncing:
                for name, tensor in tensors:
                    entry = next(expected, None)
                    if entry is None or entry[0] != name or SAFETENSORS_DTYPES.get(tensor.dtype) != entry[1] \
                            or tuple(tensor.shape) != tuple(entry[2]):
                        raise MusubiError(f"{path}: tensor {name!r} ({tensor.dtype}, {list(tensor.shape)}) does not "
                                          f"match the header entry {entry!r} written for it.")
                    if tensor.numel():
                        flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                        stream.write(memoryview(flat.numpy()))
                        syncing.wrote()
            missing = next(expected, None)
            if missing is not None:
                raise MusubiError(f"{path}: tensor {missing[0]!r} was announced but never given.")

    write_atomically(path, write)


class _SyncAsYouGo:
    """Flushes a file that is being streamed to disk in the background, stretch by stretch.

    The atomic writer's closing fsync would otherwise wait for the whole file at once, after all
    the work is done (on a virtual disk that is most of a second per GiB). A thread that calls
    fdatasync each time another stretch has been written lets the disk work while the next
    tensors are read and computed, so the closing fsync finds little left. The thread only waits
    on the disk; a failed flush is left for the closing fsync to report.
    """

    STRETCH = 64 << 20

    def __init__(self, stream) -> None:
        self.stream = stream
        self.written = stream.tell()  # changed by the writing thread only
        self.finished = False
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="musubi-sync", daemon=True)

    def __enter__(self) -> "_SyncAsYouGo":
        self.thread.start()
        return self

    def wrote(self) -> None:
        position = self.stream.tell()
        if position - self.written < self.STRETCH:
            return
        self.stream.flush()
        with self.changed:
            self.written = position
            self.changed.notify()

    def __exit__(self, *exc) -> None:
        with self.changed:
            self.finished = True
            self.changed.notify()
        self.thread.join()

    def _run(self) -> None:
        sync = getattr(os, "fdatasync", os.fsync)
        synced = self.written
        while True:
            with self.changed:
                while not self.finished and self.written == synced:
                    self.changed.wait()
                if self.finished:
                    return
                synced = self.written
            try:
                sync(self.stream.fileno())
            except (OSError, ValueError):
                return


def entries_of(tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, str, tuple[int, ...]]]:
    """The :func:`stream_save_file` entries of tensors held in memory, in their order."""
    return [(name, SAFETENSORS_DTYPES.get(tensor.dtype, str(tensor.dtype)), tuple(tensor.shape))
            for name, tensor in tensors.items()]


def model_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> tuple[str, str]:
    """Return ``(sshs_model_hash, sshs_legacy_hash)`` as LoRA trainers store them in metadata.

    Both hash the safetensors serialisation of ``tensors`` with only the ``ss_*`` metadata keys:
    the model hash is the SHA-256 of the tensor-data region (so metadata never changes it), the
    legacy hash the first 8 hex digits of the SHA-256 of bytes [1 MiB, 1 MiB + 64 KiB) of the whole
    buffer. Building the buffer costs one serialised copy of the tensors, which is small for LoRAs.
    """
    training_metadata = {key: value for key, value in (metadata or {}).items() if key.startswith("ss_")}
    buffer = safetensors.torch.save(dict(tensors), training_metadata)
    data_start = 8 + int.from_bytes(buffer[:8], "little")
    view = memoryview(buffer)
    model_hash = hashlib.sha256(view[data_start:]).hexdigest()
    legacy_hash = hashlib.sha256(view[LEGACY_HASH_START:LEGACY_HASH_START + LEGACY_HASH_LENGTH]).hexdigest()[:8]
    return model_hash, legacy_hash


TEMPORARY_PREFIX = ".musubi-tmp-"  # hidden names of files and folders still being written


def _umask_mode(folder: bool = False) -> int:
    """The permissions ``open()``/``mkdir()`` would give under the current umask (read without changing it)."""
    return (0o777 if folder else 0o666) & ~_current_umask()


def _current_umask() -> int:
    try:  # Linux shows it without changing it (changing it, even briefly, races other threads)
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask



def _temporary_path(path: str) -> str:
    """A hidden sibling of ``path`` (at most 255 bytes, the usual limit of one name); writing into
    a folder is also when the leftovers of killed writers there are cleared."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise MusubiError(f"{path}: the folder {folder} does not exist; create it first.")
    _remove_leftovers_now_and_then(folder)
    name = f"{TEMPORARY_PREFIX}{secrets.token_hex(4)}-{os.path.basename(path)}"
    while len(os.fsencode(name)) > 255:
        name = name[:-1]
    return os.path.join(folder, name)


# --- leftovers of killed writers ------------------------------------------------------------------

# A hidden entry untouched this long cannot belong to a live writer: writing keeps a file's (and,
# through its files, a folder's) modification time fresh, and the one quiet stretch, flushing the
# last written data to disk before the rename, takes seconds to a few minutes even for large
# models on slow disks.
LEFTOVER_AGE_SECONDS = 15 * 60
_SWEEP_INTERVAL_SECONDS = 60.0

# What the writers of this library leave when killed mid-write: the present hidden name (files and
# folders, including a retired folder being replaced) and the names of earlier versions
# (".<name>.<8 hex>.tmp" files, ".<name>.tmp-<8 hex>" and ".<name>.old-<8 hex>" folders).
_CURRENT_LEFTOVER = re.compile(re.escape(TEMPORARY_PREFIX) + r"[0-9a-f]{8}-")
_OLD_FILE_LEFTOVER = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")
_OLD_FOLDER_LEFTOVER = re.compile(r"\..+\.(?:tmp|old)-[0-9a-f]{8}")

_swept_at: dict[str, float] = {}
_swept_lock = threading.Lock()


def is_leftover_name(name: str, *, folder: bool) -> bool:
    """True for the hidden names a killed writer of this library leaves (a folder or a file)."""
    if _CURRENT_LEFTOVER.match(name):
        return True
    pattern = _OLD_FOLDER_LEFTOVER if folder else _OLD_FILE_LEFTOVER
    return pattern.fullmatch(name) is not None


def remove_leftovers(folder: str, *, min_age: float | None = None) -> list[str]:
    """Delete the leftovers of killed writers directly in ``folder``; return what was deleted.

    Only plain files and folders (never links) whose names match :func:`is_leftover_name` and that
    nothing has touched for ``min_age`` seconds go: a folder counts as touched when anything inside
    it changed, so a writer still filling a temporary folder, in this process or another one, keeps
    it. ``min_age`` defaults to LEFTOVER_AGE_SECONDS. Entries that vanish or cannot be deleted
    meanwhile are skipped.
    """
    min_age = LEFTOVER_AGE_SECONDS if min_age is None else min_age
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    now = time.time()
    for name in names:
        if not name.startswith("."):  # every leftover is hidden; skip the rest without a stat
            continue
        path = os.path.join(folder, name)
        try:
            info = os.lstat(path)
        except OSError:
            continue
        is_folder = stat.S_ISDIR(info.st_mode)
        if not (is_folder or stat.S_ISREG(info.st_mode)) or not is_leftover_name(name, folder=is_folder):
            continue
        touched = _last_touched(path, info, is_folder)
        if touched is None or now - touched < min_age:
            continue
        try:
            if is_folder:
                shutil.rmtree(path)
            else:
                os.remove(path)
        except OSError as error:
            logger.debug("could not remove the leftover %s: %s", path, error)
            continue
        logger.info("removed %s, left behind by an interrupted save", path)
        removed.append(path)
    return removed


def _last_touched(path: str, info: os.stat_result, is_folder: bool) -> float | None:
    """The newest modification time of an entry and (for a folder) all it holds; None when it
    cannot be read completely (then it is not old enough to delete)."""
    newest = info.st_mtime
    if not is_folder:
        return newest
    failed = []
    for root, folders, files in os.walk(path, onerror=failed.append):
        for name in folders + files:
            try:
                inner = os.lstat(os.path.join(root, name))
            except OSError:
                return None
            newest = max(newest, inner.st_mtime)
    return None if failed else newest


def _remove_leftovers_now_and_then(folder: str) -> None:
    """Sweep a folder before writing into it, at most once a minute per folder (a cache folder
    receives thousands of files in a row)."""
    now = time.monotonic()
    with _swept_lock:
        last = _swept_at.get(folder)
        if last is not None and now - last < _SWEEP_INTERVAL_SECONDS:
            return
        _swept_at[folder] = now
    remove_leftovers(folder)


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """Have ``write(temporary_path)`` create the file, then move it over ``path`` in one step.

    ``path`` holds either its old content or the complete new one, never a half-written file that
    a loader would choke on: the data goes to a hidden file in the same folder, is flushed to disk,
    gets the permissions the umask gives (some writers create 0600 files), and is renamed into
    place; the rename is flushed too. The temporary file is removed on error.
    """
    temporary = _temporary_path(path)
    try:
        write(temporary)
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.chmod(temporary, _umask_mode())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    _fsync_folder(os.path.dirname(os.path.abspath(path)))


def write_bytes_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`write_atomically`)."""

    def write(temporary: str) -> None:
        with open(temporary, "wb") as stream:
            stream.write(data)

    write_atomically(path, write)


def write_text_atomically(path: str, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`write_atomically`)."""
    write_bytes_atomically(path, text.encode("utf-8"))


def atomic_save_file(tensors: Mapping[str, torch.Tensor], path: str, metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file atomically (see :func:`write_atomically`)."""
    if metadata is not None:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise MusubiError(f"metadata entry {key!r}: safetensors metadata keys and values must be strings.")
        metadata = dict(metadata)
    write_atomically(path, lambda temporary: save_file(dict(tensors), temporary, metadata=metadata))


def write_folder_atomically(path: str, files: Mapping[str, Callable[[str], None]]) -> None:
    """Create folder ``path`` holding ``files`` (name -> writer of that file), all or nothing.

    The files go to a hidden temporary folder next to ``path`` that is renamed into place at the
    end (replacing an earlier folder of that name); a crash before that leaves the earlier folder
    untouched and only a hidden temporary folder behind, which no reader looks at.
    """
    parent = os.path.dirname(os.path.abspath(path))
    temporary = _temporary_path(path)
    os.makedirs(temporary)
    try:
        os.chmod(temporary, _umask_mode(folder=True))
        for file_name, write in files.items():
            file_path = os.path.join(temporary, file_name)
            write(file_path)
            with open(file_path, "rb+") as handle:
                os.fsync(handle.fileno())
            os.chmod(file_path, _umask_mode())
        _fsync_folder(temporary)
        if os.path.exists(path):
            retired = _temporary_path(path)
            os.utime(path)  # the retired folder is a live writer's until deleted: keep it fresh for sweeps
            os.replace(path, retired)
            os.replace(temporary, path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    _fsync_folder(parent)


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable where the platform allows opening folders."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# --- names users give to what is written ----------------------------------------------------------

# One file or folder name may have 255 bytes on common file systems; a user's part stays shorter so
# the suffixes this library appends (".safetensors", "_00001", "-step000100-state") always fit.
MAX_NAME_PART_BYTES = 200
MAX_NAME_BYTES = 1000  # a whole relative name, sub-folders included
_NOT_ON_WINDOWS = '<>:"|?*'
_WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL", *(f"COM{n}" for n in range(1, 10)), *(f"LPT{n}" for n in range(1, 10))}


def path_inside(root: str, name: str, *, where: str, option: str, extension: str | None = None,
                allow_subfolders: bool = True, example: str = "my_name") -> str:
    """The path of a user-given ``name`` inside the folder ``root``, or MusubiError.

    The one rule set for every name a user (or an API client) gives to something the library
    writes, so nothing lands outside ``root`` and no name reaches the file system only to fail
    there with a raw OS error. ``name`` is relative, with ``/`` (or ``\\``) between sub-folders
    when ``allow_subfolders``; ``extension`` is appended (and dropped from ``name`` when already
    there). Refused: empty names, absolute paths, drive letters, ``~``, names ending in ``/``,
    empty, ``.`` and ``..`` parts, hidden parts (a leading ``.``: those names are kept for files
    being written), control characters (NUL included), characters or device names Windows does not
    allow, parts over MAX_NAME_PART_BYTES and names over MAX_NAME_BYTES (UTF-8). The message names
    ``where`` (the node or command) and ``option`` and says what to write instead.
    """
    try:
        parts = _name_parts(name, extension, allow_subfolders)
    except _BadName as problem:
        folders = " (sub-folders such as 'folder/name' are fine; '..', absolute paths and drive letters are not)"
        raise MusubiError(
            f"{where}: {option} {_shown(name)} {problem}. Write a name inside {root}, such as {example!r}"
            f"{folders if allow_subfolders else ' (no folders)'}."
        ) from None
    root = os.path.abspath(root)
    path = os.path.join(root, *parts) + (extension or "")
    if os.path.commonpath([root, path]) != root:  # cannot happen after the checks above; never write outside
        raise MusubiError(f"{where}: {option} {_shown(name)} leaves {root}; write a name inside it.")
    return path


def is_inside(path: str, root: str) -> bool:
    """True when ``path`` is ``root`` or lies under it, compared by their absolute, normalised
    spelling (links are not resolved: a folder its owner linked elsewhere stays usable)."""
    path, root = os.path.normcase(os.path.abspath(path)), os.path.normcase(os.path.abspath(root))
    try:
        return os.path.commonpath([root, path]) == root
    except ValueError:  # different drives on Windows
        return False


class _BadName(Exception):
    """Why a name is refused (a phrase that follows the name in the message)."""


def _name_parts(name, extension: str | None, allow_subfolders: bool) -> list[str]:
    if not isinstance(name, str):
        raise _BadName(f"must be text, got {type(name).__name__}")
    text = name.strip()
    if not text:
        raise _BadName("is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _BadName("is not valid Unicode text") from None
    control = next((char for char in text if unicodedata.category(char) == "Cc"), None)
    if control is not None:
        raise _BadName(f"contains the control character {control!r}")
    text = text.replace("\\", "/")
    if text.startswith("/"):
        raise _BadName("is an absolute path")
    if re.match(r"[A-Za-z]:", text):
        raise _BadName(f"starts with the drive letter {text[:2]!r}")
    if text.startswith("~"):
        raise _BadName("starts with '~' (a home folder)")
    if text.endswith("/"):
        raise _BadName("ends in '/', so it names no file")
    if extension and text.lower().endswith(extension.lower()):
        text = text[: -len(extension)]
        if not text or text.endswith("/"):
            raise _BadName(f"has no name before {extension!r}")
    parts = text.split("/")
    if len(parts) > 1 and not allow_subfolders:
        raise _BadName("contains a folder ('/')")
    for part in parts:
        if not part:
            raise _BadName("has an empty folder name ('//')")
        if part in (".", ".."):
            raise _BadName(f"has a {part!r} part, " + ("which leaves the folder" if part == ".." else "the folder itself"))
        if part.startswith("."):
            raise _BadName(f"has the hidden name {part!r} (a leading '.' is kept for files still being written)")
        bad = next((char for char in part if char in _NOT_ON_WINDOWS), None)
        if bad is not None:
            raise _BadName(f"contains {bad!r}, which Windows does not allow in names")
        if part.split(".")[0].strip().upper() in _WINDOWS_DEVICES:
            raise _BadName(f"uses {part!r}, a device name on Windows")
        size = len(part.encode("utf-8"))
        if size > MAX_NAME_PART_BYTES:
            raise _BadName(f"has a name of {size} bytes; each file or folder name may have at most "
                           f"{MAX_NAME_PART_BYTES} (UTF-8), which leaves room for suffixes such as _00001")
    size = len(text.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        raise _BadName(f"is {size} bytes long; at most {MAX_NAME_BYTES} (UTF-8) are allowed")
    return parts


def _shown(name) -> str:
    """``name`` quoted for a message, cut short when long (the length is what matters then)."""
    if isinstance(name, str) and len(name) > 60:
        return f"{name[:40]!r}… ({len(name)} characters)"
    return repr(name)


def glob_matcher(pattern: str) -> Callable[[str], bool]:
    """A test of ``/``-separated names against a glob: ``*`` and ``?`` stay inside one folder
    (``my_lora/*.safetensors`` does not reach into ``my_lora/old/``), ``**`` spans folders
    (``**/`` also matches no folder at all), ``[abc]`` and ``[!abc]`` are one character but never ``/``.
    Case-insensitive on Windows, like its file names."""
    regex, index = [], 0
    while index < len(pattern):
        char = pattern[index]
        if pattern.startswith("**/", index):
            regex.append(r"(?:[^/]*/)*")
            index += 3
        elif pattern.startswith("**", index):
            regex.append(r".*")
            index += 2
        elif char == "*":
            regex.append(r"[^/]*")
            index += 1
        elif char == "?":
            regex.append(r"[^/]")
            index += 1
        elif char == "[":
            group, index = _glob_group(pattern, index)
            regex.append(group)
        else:
            regex.append(re.escape(char))
            index += 1
    compiled = re.compile("".join(regex), re.DOTALL | (re.IGNORECASE if os.name == "nt" else 0))
    return lambda name: compiled.fullmatch(name) is not None


def _glob_group(pattern: str, start: int) -> tuple[str, int]:
    """The regex of the ``[...]`` group at ``start`` and the index after it (a lone ``[`` is literal)."""
    index = start + 1
    negate = index < len(pattern) and pattern[index] == "!"
    index += negate
    if index < len(pattern) and pattern[index] == "]":
        index += 1  # a "]" right at the start belongs to the group
    end = pattern.find("]", index)
    if end < 0:
        return re.escape("["), start + 1
    body = "".join("\\" + char if char in "\\^[]" else char for char in pattern[start + 1 + negate:end])
    return (f"[^/{body}]" if negate else f"(?!/)[{body}]"), end + 1
