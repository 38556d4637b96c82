"""Reading, hashing and atomically writing files (safetensors and any other).

A safetensors file is an 8-byte little-endian header length ``n``, a JSON header of ``n`` bytes
(tensor name -> dtype, shape, byte offsets, plus an optional ``__metadata__`` map of strings) and
then the raw tensor bytes. Reading only the header lets callers validate many files cheaply
before loading any tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping

import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import MusubiError

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

    data_size = file_size - 8 - header_length
    tensor_infos: dict[str, TensorInfo] = {}
    for name, info in header.items():
        try:
            dtype = info["dtype"]
            shape = tuple(int(size) for size in info["shape"])
            begin, end = (int(offset) for offset in info["data_offsets"])
        except (TypeError, KeyError, ValueError) as error:
            raise _not_safetensors(path, f"the header entry of tensor '{name}' is malformed") from error
        if not isinstance(dtype, str) or not 0 <= begin <= end <= data_size:
            raise _not_safetensors(path, f"tensor '{name}' lies outside the file (truncated download?)")
        tensor_infos[name] = (dtype, shape)
    return tensor_infos, dict(metadata)


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


def iter_tensors(path: str, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` of a file one tensor at a time, so only one is loaded at once.

    ``names`` restricts (and orders) what is read; by default every tensor in file order.
    """
    try:
        with safe_open(path, framework="pt", device="cpu") as file:
            for name in list(file.keys()) if names is None else names:
                yield name, file.get_tensor(name)
    except (OSError, safetensors.SafetensorError) as error:
        raise MusubiError(f"{path}: cannot read tensors ({error}).") from error


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
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise MusubiError(f"{path}: the folder {folder} does not exist; create it first.")
    return os.path.join(folder, f"{TEMPORARY_PREFIX}{secrets.token_hex(4)}-{os.path.basename(path)}"[:255])


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
