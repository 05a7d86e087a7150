"""Checkpoints: parameters in a safetensors file, the spec's JSON in its metadata. No pickle.

    memcore.checkpoint.save("model.safetensors", layer)        # any backend, or (spec, params)
    layer = memcore.checkpoint.load("model.safetensors", backend="torch")
    spec, params = memcore.checkpoint.load_params("model.safetensors")

The file is a plain safetensors file, read and written with the ``safetensors`` library. The
header's ``__metadata__`` holds ``format`` ("memcore.checkpoint"), ``format_version``, ``spec``
(the spec's JSON) and ``memcore_version``. Parameters are floating point and keep their dtype:
float16 and bfloat16 are stored as they are.

Before the library sees a file, memcore checks what a crafted one could abuse: only a regular
file is opened; the header is bounded in length and nesting and each entry is checked (a float
dtype, a shape, offsets tiling the data); the spec is bounded, then checked against the
allocation limit (``memcore.set_allocation_limit``) and the tensors' names and shapes. Each
refusal is a ValueError naming the file and the entry. Writes are atomic (``atomic_write``).
"""

from __future__ import annotations

import os
import re

import numpy as np
import safetensors
import safetensors.numpy as st_numpy

from memcore import safetensors_file as sf
from memcore.atomic_files import atomic_write
from memcore.spec import LAYER_KINDS, Model, Spec, from_json
from memcore.spec.params import check_params, param_shapes
from memcore.spec.sizes import check_allocation

__all__ = ["save", "load", "load_params", "atomic_write", "FORMAT", "FORMAT_VERSION"]

FORMAT = "memcore.checkpoint"
FORMAT_VERSION = 1
_MAX_SPEC = 1_000_000  # characters of spec JSON: thousands of layers
_SAVED = ("float64", "float32", "float16", "bfloat16")  # numpy dtype names save accepts


# --- writing -------------------------------------------------------------------------------

def _bfloat16(what: str):
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError(f"{what} is bfloat16, which numpy needs the ml_dtypes package to "
                        f"hold; pip install ml_dtypes") from None
    return ml_dtypes.bfloat16


def _as_array(name: str, value) -> np.ndarray:
    """A numpy array holding one parameter's stored bytes; zero-copy where the source allows."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch, without importing it
        t = value.detach().cpu().contiguous()
        if str(t.dtype) == "torch.bfloat16":
            import torch

            value = t.view(torch.int16).numpy().view(_bfloat16(f"save: parameter {name!r}"))
        else:
            value = t.numpy()
    arr = np.asarray(value)  # JAX arrays come out here, bfloat16 as ml_dtypes.bfloat16
    if arr.dtype.name not in _SAVED:
        raise TypeError(f"save: parameter {name!r} has dtype {arr.dtype}, which a checkpoint "
                        f"cannot hold; expected one of {list(_SAVED)}")
    return arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)


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


def save(path, obj) -> None:
    """Write ``obj``'s spec and parameters to ``path`` (a safetensors file), atomically.

    obj: a realized object of any backend (it has ``.spec``; parameters from ``state_dict()``
    if it has one, else from ``.params``), or a pair ``(spec, params)``.
    """
    import memcore

    path = os.fspath(path)
    spec, params = _spec_and_params(obj)
    check_params(spec, params)
    tensors = {n: _as_array(n, params[n]) for n in sorted(params)}
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "spec": spec.to_json(),
                "memcore_version": memcore.__version__}
    atomic_write(path, lambda tmp: st_numpy.save_file(tensors, tmp, metadata=metadata))



def _metadata_spec(path: str, header: dict) -> Spec:
    meta = header.get("__metadata__")
    where = f"checkpoint {path!r}"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{where} is a safetensors file but not a memcore checkpoint: its "
                         f"metadata has no format={FORMAT!r} (got {sf.short(meta)})")
    odd = next((k for k, v in meta.items() if not isinstance(v, str)), None)
    if odd is not None:
        raise ValueError(f"{where}: __metadata__ must map names to strings; {odd!r} is "
                         f"{sf.short(meta[odd])}")
    version = meta.get("format_version")
    if not (isinstance(version, str) and re.fullmatch(r"[0-9]{1,9}", version)):
        raise ValueError(f"{where}: format_version must be an integer string, got {version!r}")
    if int(version) > FORMAT_VERSION:
        raise ValueError(f"{where} has format_version {version}; this memcore reads up to "
                         f"{FORMAT_VERSION}: upgrade memcore")
    text = meta.get("spec")
    if text is None:
        raise ValueError(f"{where}: the metadata holds no spec")
    try:
        if len(text) > _MAX_SPEC:
            raise ValueError(f"it is {len(text)} characters long, beyond the limit of "
                             f"{_MAX_SPEC}")
        depth = sf.json_depth(text)
        if depth > sf.MAX_DEPTH:
            raise ValueError(f"it nests {depth} levels deep, beyond the limit of {sf.MAX_DEPTH}")
        spec = from_json(text)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: the spec in its metadata does not parse: "
                         f"{sf.clip(str(err), 300)}") from None
    if not isinstance(spec, (Model,) + LAYER_KINDS):
        raise ValueError(f"{where}: the spec in its metadata is a {spec.kind} spec, not a "
                         f"layer or model spec")
    try:
        # Refused before anything is allocated: loading realizes the spec's parameters here
        # and a state later; neither may exceed the limit.
        check_allocation(spec, what="both")
    except ValueError as err:
        raise ValueError(f"{where}: the spec in its metadata is too large: {err}") from None
    return spec



def _check_against_spec(path: str, spec: Spec, entries: dict) -> None:
    # Zero-stride stand-ins carry the stored shapes into the spec's own check, allocating
    # nothing.
    standins = {n: np.broadcast_to(np.float32(0), s) for n, (_, s) in entries.items()}
    try:
        check_params(spec, standins)
    except ValueError as err:
        raise ValueError(f"checkpoint {path!r}: {err}") from None


def _read_tensors(path: str, fd: int, entries: dict) -> dict[str, np.ndarray]:
    """The tensors, read by the safetensors library. On Linux it opens the descriptor already
    checked (through /proc), so the file cannot be swapped for another in between."""
    for name, (code, _) in entries.items():
        if code == "BF16":
            _bfloat16(f"checkpoint {path!r}: tensor {name!r}")
            break
    source = f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else path
    name = None
    try:
        with safetensors.safe_open(source, framework="numpy") as f:
            out = {}
            for name in entries:
                out[name] = f.get_tensor(name)  # copied out of the file: the arrays own it
    except (safetensors.SafetensorError, OSError, ValueError, TypeError) as err:
        entry = "" if name is None else f" tensor {name!r}"
        raise ValueError(f"checkpoint {path!r}: the safetensors library cannot read{entry}: "
                         f"{err}") from None
    return out


def load_params(path, dtype=None) -> tuple[Spec, dict[str, np.ndarray]]:
    """The spec and the parameters (numpy arrays) of a checkpoint.

    Parameters keep their stored dtype (bfloat16 as ``ml_dtypes.bfloat16``) unless ``dtype``
    is given: then every parameter is cast to it (e.g. ``np.float32`` for a backend that cannot
    take numpy bfloat16).

    Raises FileNotFoundError for a missing file, and ValueError naming the path (and the entry)
    for anything else that is wrong: not a regular file; not a safetensors file (corrupt,
    truncated, malformed entries, integer or boolean tensors); no memcore metadata; a spec that
    does not parse or is beyond the allocation limit; parameters that do not match the spec
    (missing, unexpected and misshapen names are listed).
    """
    path = os.fspath(path)
    if dtype is not None:
        dtype = np.dtype(dtype)
        if not np.issubdtype(dtype, np.floating):
            raise TypeError(f"load_params: dtype must be a floating dtype, got {dtype}")
    fd = sf.open_regular(path)
    try:
        header, data_len = sf.read_header(path, fd)
        spec = _metadata_spec(path, header)
        entries = sf.entries(path, header, data_len)
        _check_against_spec(path, spec, entries)
        params = _read_tensors(path, fd, entries)
    finally:
        os.close(fd)
    if dtype is not None:
        params = {k: v.astype(dtype) for k, v in params.items()}
    return spec, params


def load(path, backend: str = "reference", dtype=None, **options):
    """``memcore.realize(spec, backend=backend, params=..., **options)`` on a checkpoint's
    contents; ``dtype`` as in ``load_params``."""
    from memcore.api import realize

    spec, params = load_params(path, dtype=dtype)
    return realize(spec, backend=backend, params=params, **options)
