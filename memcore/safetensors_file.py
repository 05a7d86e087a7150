"""A safetensors file as memcore opens it, before the safetensors library reads it: only a
regular file, never blocking; a header bounded in length and nesting, parsed without recursion;
every tensor entry checked (a float dtype, a shape, byte ranges tiling the data). Each refusal
is a ValueError naming the file and the entry."""

from __future__ import annotations

import json
import math
import os
import re
import stat

import numpy as np

# A header larger than this is not a plausible checkpoint (the safetensors library's own limit).
_MAX_HEADER = 100_000_000
MAX_DEPTH = 16  # JSON nesting: a header needs 3 levels, a model spec 4
_MAX_NDIM = 64  # numpy's limit
_NOT_FILES = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
              (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
              (stat.S_ISSOCK, "a socket"))
FLOAT_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
# The first bytes of files that are often mistaken for checkpoints.
_MAGIC = {b"PK\x03\x04": "a zip archive (torch.save writes these)", b"\x93NUMPY": "a .npy file",
          b"\x1f\x8b": "a gzip file", **{bytes([128, v]): "a pickle" for v in range(2, 6)}}


def clip(text: str, keep: int = 100) -> str:
    return text if len(text) <= keep + 20 else f"{text[:keep]}... ({len(text)} characters)"


def short(value) -> str:
    return clip(repr(value))


class _BigInt:
    """Stands for a JSON integer too long to be an offset or a size (and to parse cheaply)."""

    def __init__(self, text: str):
        self.digits = len(text.lstrip("-"))

    def __repr__(self) -> str:
        return f"<a {self.digits}-digit integer>"


def _parse_int(text: str):
    return int(text) if len(text) <= 24 else _BigInt(text)


def _no_duplicates(pairs: list) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {short(key)} appears twice")
        out[key] = value
    return out


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_OPEN, _CLOSE = np.zeros(256, np.int8), np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_CLOSE[[ord("]"), ord("}")]] = 1


def json_depth(text: str) -> int:
    """The deepest nesting of brackets outside strings, counted without recursion and in
    chunks, so a 100 MB header of "[" costs neither the stack nor gigabytes."""
    rest = np.frombuffer(_STRING.sub("", text).encode(), np.uint8)
    deepest = level = 0
    for i in range(0, len(rest), 1 << 20):
        chunk = rest[i:i + (1 << 20)]
        levels = level + np.cumsum(_OPEN[chunk] - _CLOSE[chunk], dtype=np.int64)
        if len(levels):
            deepest, level = max(deepest, int(levels.max())), int(levels[-1])
    return deepest


def parse_json(text: str, what: str):
    depth = json_depth(text)
    if depth > MAX_DEPTH:
        raise ValueError(f"{what} nests {depth} levels deep, beyond the limit of {MAX_DEPTH}")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_int=_parse_int)
    except ValueError as err:  # JSONDecodeError, a duplicate key
        raise ValueError(f"{what} is not valid JSON ({err})") from None


def open_regular(path: str) -> int:
    """A descriptor of ``path``, which must be a regular file; never blocks (a FIFO is refused
    from its stat, before any open)."""
    where = f"checkpoint {path!r}"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        link = " (a dangling symbolic link)" if os.path.islink(path) else ""
        raise FileNotFoundError(f"{where} does not exist{link}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in _NOT_FILES if test(st.st_mode)), "not a plain file")
        link = " behind a symbolic link" if os.path.islink(path) else ""
        raise ValueError(f"{where} is {kind}{link}, not a regular file")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    now = os.fstat(fd)
    if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise ValueError(f"{where} was replaced while being opened")
    return fd


def read_header(path: str, fd: int) -> tuple[dict, int]:
    """The parsed header of the open file and the number of data bytes after it."""
    bad = f"checkpoint {path!r} is not a valid safetensors file"
    size = os.fstat(fd).st_size
    with os.fdopen(os.dup(fd), "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{bad}: {len(head)} byte{'s' * (len(head) != 1)}, too short for "
                             f"a header (empty or truncated?)")
        n = int.from_bytes(head, "little")
        kind = next((k for m, k in _MAGIC.items() if head.startswith(m)), None)
        hint = f"; it looks like {kind}" if kind else ""
        if n > _MAX_HEADER:
            raise ValueError(f"{bad}: header length {n} is beyond the {_MAX_HEADER}-byte "
                             f"limit{hint or ' (not a safetensors file, or corrupt)'}")
        if 8 + n > size:
            raise ValueError(f"{bad}: header length {n} does not fit in the file's {size} "
                             f"bytes{hint or ' (truncated or corrupt)'}")
        raw = f.read(n)
    if len(raw) != n:
        raise ValueError(f"{bad}: the file shrank while being read")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{bad}: the header is not UTF-8 text ({err})") from None
    try:
        header = parse_json(text, "the header")
    except ValueError as err:
        raise ValueError(f"{bad}: {err}") from None
    if not isinstance(header, dict):
        kind = {list: "array", str: "string", type(None): "null"}.get(type(header), "number")
        raise ValueError(f"{bad}: the header is a JSON {kind}, not an object")
    return header, size - 8 - n



def _is_count(x) -> bool:
    return type(x) is int and 0 <= x < 2**63


def dtype_problem(code) -> str:
    floats = ", ".join(FLOAT_SIZES)
    if isinstance(code, str) and re.fullmatch(r"BOOL|[IU](8|16|32|64)", code):
        kind = "boolean" if code == "BOOL" else "integer"
        return f"has {kind} dtype {code}; parameters are floating point ({floats})"
    return f"has dtype {short(code)}, not one of a checkpoint's dtypes ({floats})"


def entries(path: str, header: dict, data_len: int) -> dict[str, tuple[str, tuple]]:
    """name -> (dtype code, shape) of every tensor entry, each checked; the tensors must tile
    the data exactly, as the format requires (no overlap, gap or tail)."""
    bad = f"checkpoint {path!r} is not a valid safetensors file"
    out, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        what = f"{bad}: tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"{what} must be an object of exactly dtype, shape and "
                             f"data_offsets, got {short(info)}")
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if code not in FLOAT_SIZES:
            raise ValueError(f"{what} {dtype_problem(code)}")
        if not (isinstance(shape, list) and len(shape) <= _MAX_NDIM
                and all(_is_count(d) for d in shape)):
            raise ValueError(f"{what}: shape must be a list of at most {_MAX_NDIM} integers in "
                             f"[0, 2**63), got {short(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(_is_count(o) for o in offsets)):
            raise ValueError(f"{what}: data_offsets must be [begin, end], two integers in "
                             f"[0, 2**63), got {short(offsets)}")
        (begin, end), size = offsets, math.prod(shape) * FLOAT_SIZES[code]
        if not begin <= end <= data_len or end - begin != size:
            raise ValueError(f"{what} ({code}, shape {tuple(shape)}: {size} bytes) has byte "
                             f"range [{begin}, {end}), outside the {data_len} data bytes or of "
                             f"the wrong size (truncated or corrupt)")
        spans.append((begin, end, name))
        out[name] = (code, tuple(shape))
    reached, last = 0, None
    for begin, end, name in sorted(spans):
        if begin < reached:
            raise ValueError(f"{bad}: tensor {name!r} starts at byte {begin}, inside tensor "
                             f"{last!r} (overlapping data)")
        if begin > reached:
            raise ValueError(f"{bad}: data bytes [{reached}, {begin}) before tensor {name!r} "
                             f"belong to no tensor")
        reached, last = end, name
    if reached != data_len:
        tail = data_len - reached
        raise ValueError(f"{bad}: {tail} byte{'s' * (tail > 1)} after the last tensor")
    return out

