"""Checkpoints: parameters in a safetensors file, the spec's JSON in its metadata. No pickle.

    memcore.checkpoint.save("model.safetensors", layer)        # any backend, or (spec, params)
    layer = memcore.checkpoint.load("model.safetensors", backend="torch")
    spec, params = memcore.checkpoint.load_params("model.safetensors")

The file is a plain safetensors file (readable by the ``safetensors`` library): an 8-byte
little-endian header length, a JSON header, then the raw tensor bytes. The header's
``__metadata__`` holds ``format`` ("memcore.checkpoint"), ``format_version``, ``spec`` (the spec's
JSON) and ``memcore_version``. Tensors keep their dtype: float16 and bfloat16 are stored as they
are. The file is written atomically: a failure while writing leaves any previous file intact.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile

import numpy as np

from memcore.spec import Spec, from_json
from memcore.spec.params import check_params, param_shapes

__all__ = ["save", "load", "load_params", "FORMAT", "FORMAT_VERSION"]

FORMAT = "memcore.checkpoint"
FORMAT_VERSION = 1
# A header larger than this is not a plausible checkpoint (the safetensors library's own limit).
_MAX_HEADER = 100_000_000

_NUMPY_CODES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
}
_CODE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


# --- turning parameters of any framework into (code, shape, bytes) -------------------------

def _as_array(name: str, value) -> tuple[str, np.ndarray]:
    """(safetensors dtype code, a numpy array holding the stored bytes) of one parameter;
    zero-copy where the source allows it."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch, without importing it
        t = value.detach().cpu().contiguous()
        if str(t.dtype) == "torch.bfloat16":
            # numpy has no bfloat16: the raw 16-bit patterns are the stored bytes.
            import torch

            return "BF16", t.view(torch.int16).numpy().view(np.uint16)
        value = t.numpy()
    arr = np.asarray(value)  # JAX arrays come out here, bfloat16 as ml_dtypes.bfloat16
    code = _NUMPY_CODES.get(arr.dtype.name)
    if code is None:
        raise TypeError(f"save: parameter {name!r} has dtype {arr.dtype}, which a checkpoint "
                        f"cannot hold; expected one of {sorted(_NUMPY_CODES)}")
    if code == "BF16":
        arr = arr.view(np.uint16)
    return code, arr


def _tensor_bytes(name: str, value) -> bytes:
    _, arr = _as_array(name, value)
    arr = np.ascontiguousarray(arr)
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def _spec_and_params(obj) -> tuple[Spec, dict]:
    """The spec and the parameter dict of a realized object or of a (spec, params) pair."""
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], Spec):
        spec, params = obj
        if not isinstance(params, dict):
            raise TypeError(f"save: obj[1] must be a dict of parameters, got "
                            f"{type(params).__name__}")
        return spec, dict(params)
    spec = getattr(obj, "spec", None)
    if not isinstance(spec, Spec):
        raise TypeError(f"save: obj must be a realized memcore object (with a .spec) or a "
                        f"(spec, params) pair, got {type(obj).__name__}")
    if callable(getattr(obj, "state_dict", None)):
        # A module's state_dict may also hold buffers; a checkpoint keeps the spec's parameters.
        wanted = param_shapes(spec)
        params = {k: v for k, v in obj.state_dict().items() if k in wanted}
    elif isinstance(getattr(obj, "params", None), dict):
        params = dict(obj.params)
    else:
        raise TypeError(f"save: {type(obj).__name__} has a .spec but neither state_dict() nor "
                        f"a .params dict")
    return spec, params


# --- writing -------------------------------------------------------------------------------

def _header(spec: Spec, records: list) -> bytes:
    import memcore

    header: dict = {"__metadata__": {
        "format": FORMAT, "format_version": str(FORMAT_VERSION), "spec": spec.to_json(),
        "memcore_version": memcore.__version__,
    }}
    offset = 0
    for name, (code, shape, size) in records:
        header[name] = {"dtype": code, "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    # Pad with spaces to 8 bytes, as the safetensors library does, so tensors stay aligned.
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _fsync_dir(directory: str) -> None:
    # Makes the rename durable; not every platform lets a directory be opened.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_mode(path: str) -> int:
    try:
        return os.stat(path).st_mode & 0o777  # overwriting keeps the old file's mode
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def save(path, obj) -> None:
    """Write ``obj``'s spec and parameters to ``path`` (a safetensors file), atomically.

    obj: a realized object of any backend (it has ``.spec``; parameters from ``state_dict()``
    if it has one, else from ``.params``), or a pair ``(spec, params)``.
    """
    path = os.fspath(path)
    spec, params = _spec_and_params(obj)
    check_params(spec, params)
    names = sorted(params)
    # The header needs every shape and size before any data; bytes are made one at a time.
    described = []
    for n in names:
        code, arr = _as_array(n, params[n])
        described.append((n, (code, tuple(arr.shape), arr.nbytes)))
    header = _header(spec, described)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(header)
            for n in names:
                f.write(_tensor_bytes(n, params[n]))

    atomic_write(path, write)


def atomic_write(path, write, prefix: str | None = None) -> None:
    """Make ``path`` by ``write(tmp)`` into a temporary file beside it, flushed to disk, then
    moved into place (``os.replace``): a reader sees the old file or the whole new one, and a
    failure leaves the old file as it was and no temporary behind. ``prefix`` names the
    temporary (default: ``.<name>.``)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    prefix = "." + os.path.basename(path) + "." if prefix is None else prefix
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):
            # mkstemp makes the file private; give it the mode a plain open() would.
            os.fchmod(fd, _file_mode(path))
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


# --- reading -------------------------------------------------------------------------------

def _read_file(path: str) -> tuple[dict, memoryview]:
    """The parsed header and the data bytes of a safetensors file, with errors naming path."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    with open(path, "rb") as f:
        blob = f.read()
    bad = f"checkpoint {path!r} is not a valid safetensors file"
    if len(blob) < 8:
        raise ValueError(f"{bad}: {len(blob)} bytes, too short for a header (truncated?)")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > _MAX_HEADER or 8 + n > len(blob):
        raise ValueError(f"{bad}: header length {n} does not fit in the file's {len(blob)} "
                         f"bytes (truncated or corrupt)")
    try:
        header = json.loads(blob[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{bad}: the header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{bad}: the header is not a JSON object")
    return header, memoryview(blob)[8 + n:]  # a view: tensors are copied out once


def _metadata_spec(path: str, header: dict) -> Spec:
    meta = header.get("__metadata__")
    where = f"checkpoint {path!r}"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{where} is a safetensors file but not a memcore checkpoint: its "
                         f"metadata has no format={FORMAT!r} (got {meta!r})")
    version = meta.get("format_version")
    if not (isinstance(version, str) and version.isdigit()):
        raise ValueError(f"{where}: format_version must be an integer string, got {version!r}")
    if int(version) > FORMAT_VERSION:
        raise ValueError(f"{where} has format_version {version}; this memcore reads up to "
                         f"{FORMAT_VERSION}: upgrade memcore")
    if "spec" not in meta:
        raise ValueError(f"{where}: the metadata holds no spec")
    try:
        return from_json(meta["spec"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: the spec in its metadata does not parse: {err}") from None


def _tensors(path: str, header: dict, data: memoryview) -> dict[str, np.ndarray]:
    bad = f"checkpoint {path!r} is not a valid safetensors file"
    out, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            count = int(np.prod(shape, dtype=np.int64))
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{bad}: tensor {name!r} has a malformed entry {info!r}") from None
        if code not in _CODE_SIZES:
            raise ValueError(f"{bad}: tensor {name!r} has unknown dtype {code!r}")
        if not (0 <= begin <= end <= len(data)) or end - begin != count * _CODE_SIZES[code]:
            raise ValueError(f"{bad}: tensor {name!r} ({code}, shape {shape}) has byte range "
                             f"[{begin}, {end}), outside the {len(data)} data bytes or of the "
                             f"wrong size (truncated or corrupt)")
        spans.append((begin, end, name))
        out[name] = _decode(path, name, code, shape, data[begin:end])
    # The tensors tile the data exactly, as the format requires: no overlap, gap or tail.
    reached = 0
    for begin, end, name in sorted(spans):
        if begin != reached:
            raise ValueError(f"{bad}: tensor {name!r} starts at byte {begin}, expected {reached} "
                             f"(overlapping or missing data)")
        reached = end
    if reached != len(data):
        raise ValueError(f"{bad}: {len(data) - reached} bytes after the last tensor")
    return out


def _decode(path: str, name: str, code: str, shape: tuple, raw: memoryview) -> np.ndarray:
    if code == "BF16":
        try:
            import ml_dtypes
        except ImportError:
            raise TypeError(f"checkpoint {path!r}: tensor {name!r} is bfloat16, which numpy "
                            f"needs the ml_dtypes package to hold; pip install ml_dtypes") from None
        return np.frombuffer(raw, dtype="<u2").reshape(shape).view(ml_dtypes.bfloat16).copy()
    dtype = {"BOOL": np.dtype(bool)}.get(code)
    if dtype is None:
        kind = {"F": "f", "I": "i", "U": "u"}[code[0]]
        dtype = np.dtype(f"<{kind}{_CODE_SIZES[code]}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def load_params(path, dtype=None) -> tuple[Spec, dict[str, np.ndarray]]:
    """The spec and the parameters (numpy arrays) of a checkpoint.

    Parameters keep their stored dtype (bfloat16 as ``ml_dtypes.bfloat16``) unless ``dtype``
    is given: then every floating parameter is cast to it (e.g. ``np.float32`` for a backend
    that cannot take numpy bfloat16).

    Raises FileNotFoundError for a missing file, and ValueError naming the path for a file that
    is not a safetensors file (corrupt or truncated), has no memcore metadata, holds a spec
    that does not parse, or holds parameters that do not match the spec (missing, unexpected
    and misshapen names are listed).
    """
    path = os.fspath(path)
    header, data = _read_file(path)
    spec = _metadata_spec(path, header)
    params = _tensors(path, header, data)
    if dtype is not None:
        dtype = np.dtype(dtype)
        if not np.issubdtype(dtype, np.floating):
            raise TypeError(f"load_params: dtype must be a floating dtype, got {dtype}")
        params = {k: v.astype(dtype) if v.dtype.kind in "fV" else v for k, v in params.items()}
    try:
        check_params(spec, params)
    except ValueError as err:
        raise ValueError(f"checkpoint {path!r}: {err}") from None
    return spec, params


def load(path, backend: str = "reference", dtype=None, **options):
    """``memcore.realize(spec, backend=backend, params=..., **options)`` on a checkpoint's
    contents; ``dtype`` as in ``load_params``."""
    from memcore.api import realize

    spec, params = load_params(path, dtype=dtype)
    return realize(spec, backend=backend, params=params, **options)
