"""The crafted checkpoint files of test_crafted_files.py: a good file of a small mosaic layer,
written here byte by byte rather than by the safetensors library, so that copies of it can be
wrong in every way the format allows, and the cases built from it (each with the error it must
raise and what the message must name)."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import socket
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import memcore
from memcore import checkpoint as ck

SPEC = memcore.spec.mosaic(8, 2)
PARAMS = memcore.init(SPEC, seed=0)  # 7 float32 tensors, 800 bytes in all


# --- writing files by hand ---------------------------------------------------------------------

def _layout(params: dict) -> tuple[dict, bytes]:
    """Header entries and data of ``params`` stored as F32, in name order."""
    header, chunks, offset = {}, [], 0
    for name in sorted(params):
        raw = np.ascontiguousarray(params[name], "<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(params[name].shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    return header, b"".join(chunks)


def _meta(spec_json: str = SPEC.to_json()) -> dict:
    return {"format": ck.FORMAT, "format_version": "1", "spec": spec_json}


def _good(params: dict = PARAMS, spec_json: str = SPEC.to_json()) -> tuple[dict, bytes]:
    header, data = _layout(params)
    return {"__metadata__": _meta(spec_json), **header}, data


def _blob(header, data: bytes = b"", length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # padded as the library pads
    return struct.pack("<Q", len(text) if length is None else length) + text + data


GOOD = _blob(*_good())
HEADER = len(GOOD) - 8 - 800  # the good file's header length


def _bytes(blob: bytes) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / "crafted.safetensors"
        path.write_bytes(blob)
        return path
    return make


def _edit(change: Callable[[dict], bytes | None]) -> Callable[[Path], Path]:
    """The good file after ``change(header)`` (which edits the header in place and may return
    new data)."""
    header, data = _good()
    new = change(header)
    return _bytes(_blob(header, new if isinstance(new, bytes) else data))


def _entry(name: str, **fields) -> Callable[[Path], Path]:
    """The good file with fields of tensor ``name``'s entry replaced (``...``: removed)."""
    def change(header):
        for key, value in fields.items():
            if value is ...:
                del header[name][key]
            else:
                header[name][key] = value
    return _edit(change)


def _metadata(**fields) -> Callable[[Path], Path]:
    def change(header):
        for key, value in fields.items():
            if value is ...:
                del header["__metadata__"][key]
            else:
                header["__metadata__"][key] = value
    return _edit(change)


def _spec(text: str, params: dict = PARAMS) -> Callable[[Path], Path]:
    return _bytes(_blob(*_good(params, text)))


def _spec_field(spec, **fields) -> str:
    return json.dumps(dict(json.loads(spec.to_json()), **fields))


def _raw_header(text: str) -> Callable[[Path], Path]:
    """The good file's data under a header given as text."""
    return _bytes(_blob(text.encode(), _good()[1]))


def _all_as(code: str) -> Callable[[Path], Path]:
    def change(header):
        for name, info in header.items():
            if name != "__metadata__":
                info["dtype"] = code
    return _edit(change)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _model_nested(depth: int) -> str:
    spec = {"kind": "mosaic", "d_model": 8, "n_heads": 2, "capacity": None}
    for _ in range(depth):
        spec = {"kind": "model", "layers": [spec], "vocab_size": 5}
    return json.dumps(spec)


def _duplicate_key() -> Callable[[Path], Path]:
    header, data = _good()
    text = json.dumps(header)
    again = json.dumps({"k_scale": header["k_scale"]})[1:-1]
    return _bytes(_blob((text[:-1] + ", " + again + "}").encode(), data))


def _without(name: str) -> Callable[[Path], Path]:
    return _bytes(_blob(*_good({k: v for k, v in PARAMS.items() if k != name})))


def _with_extra() -> Callable[[Path], Path]:
    return _bytes(_blob(*_good({**PARAMS, "bias": np.zeros(3, np.float32)})))


def _reshaped() -> Callable[[Path], Path]:
    return _bytes(_blob(*_good({**PARAMS, "k_proj.weight": np.zeros((4, 16), np.float32)})))


def _overlap(name: str, like: str) -> Callable[[Path], Path]:
    def change(header):
        begin = header[like]["data_offsets"][0]
        size = np.diff(header[name]["data_offsets"])[0]
        header[name]["data_offsets"] = [begin, begin + int(size)]
    return _edit(change)


def _gap() -> Callable[[Path], Path]:
    header, data = _good()
    header["v_scale"]["data_offsets"] = [800, 808]
    return _bytes(_blob(header, data + bytes(8)))


def _zip() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": [0.0] * 16}))
    return out.getvalue()


def _npy() -> bytes:
    out = io.BytesIO()
    np.save(out, np.zeros((4, 4), np.float32))
    return out.getvalue()


def _special(kind: str) -> Callable[[Path], Path]:
    """A path that is not a regular file (or not there)."""
    def make(folder: Path) -> Path:
        path = folder / "crafted.safetensors"
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "fifo_link":
            os.mkfifo(folder / "pipe")
            path.symlink_to(folder / "pipe")
        elif kind in ("zero", "null", "urandom"):
            path.symlink_to(f"/dev/{kind}")
        elif kind == "directory":
            path.mkdir()
        elif kind == "directory_link":
            (folder / "sub").mkdir()
            path.symlink_to(folder / "sub")
        elif kind == "dangling":
            path.symlink_to(folder / "nowhere")
        elif kind == "loop":
            path.symlink_to(path)
        elif kind == "socket":
            with socket.socket(socket.AF_UNIX) as s:
                s.bind(str(path))
        elif kind == "missing":
            pass
        return path
    return make


def _link_to_good(folder: Path) -> Path:
    (folder / "real.safetensors").write_bytes(GOOD)
    path = folder / "crafted.safetensors"
    path.symlink_to(folder / "real.safetensors")
    return path


# --- the cases ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[Path], Path]
    error: type | None = ValueError  # None: the file must load
    entry: str | None = None  # the entry the message must name
    words: tuple = ()  # what else the message must say (lower case)


_BIG = "9" * 5000  # a 5000-digit JSON integer
CASES = [
    # Truncations, from nothing to one byte short.
    *[Case(f"truncated_at_{n}", _bytes(GOOD[:n]), words=("too short",)) for n in (0, 1, 4, 7)],
    *[Case(f"truncated_in_header_{n}", _bytes(GOOD[:n]), words=("does not fit",))
      for n in (8, 9, 8 + HEADER // 2, 8 + HEADER - 1)],
    Case("truncated_after_header", _bytes(GOOD[:8 + HEADER]), entry="k_proj.weight",
         words=("truncated",)),
    Case("truncated_in_first_tensor", _bytes(GOOD[:8 + HEADER + 100]), entry="k_proj.weight",
         words=("truncated",)),
    Case("truncated_in_second_tensor", _bytes(GOOD[:8 + HEADER + 260]), entry="k_scale",
         words=("truncated",)),
    Case("truncated_halfway", _bytes(GOOD[:8 + HEADER + 400]), entry="o_proj.weight",
         words=("truncated",)),
    Case("truncated_by_one_byte", _bytes(GOOD[:-1]), entry="v_scale", words=("truncated",)),
    Case("trailing_bytes", _bytes(GOOD + bytes(8)), words=("after the last tensor",)),
    # The header length.
    Case("header_length_2**64-1", _bytes(struct.pack("<Q", 2**64 - 1) + GOOD[8:]),
         words=("limit",)),
    Case("header_length_2**63", _bytes(struct.pack("<Q", 2**63) + GOOD[8:]), words=("limit",)),
    Case("header_length_over_limit", _bytes(struct.pack("<Q", 100_000_001) + GOOD[8:]),
         words=("limit",)),
    Case("header_length_past_end", _bytes(struct.pack("<Q", len(GOOD)) + GOOD[8:]),
         words=("does not fit",)),
    Case("header_length_0", _bytes(struct.pack("<Q", 0) + GOOD[8:]), words=("json",)),
    Case("header_length_short_by_one", _bytes(struct.pack("<Q", HEADER - 1) + GOOD[8:]),
         words=("after the last tensor",)),
    Case("header_length_cuts_json", _bytes(struct.pack("<Q", len(json.dumps(_good()[0])) - 1)
                                           + GOOD[8:]), words=("json",)),
    Case("header_length_into_data", _bytes(struct.pack("<Q", HEADER + 16) + GOOD[8:])),
    # Not JSON, or not a JSON object.
    Case("random_bytes", _bytes(bytes(np.random.default_rng(0).integers(0, 256, 300,
                                                                        dtype=np.uint8)))),
    Case("header_not_json", _raw_header("{nope}"), words=("json",)),
    Case("header_not_utf8", _bytes(_blob(b'{"\xff\xfe": 1}')), words=("utf-8",)),
    Case("header_trailing_garbage", _raw_header(json.dumps(_good()[0]) + " xyz"),
         words=("json",)),
    Case("header_nul_padded", _bytes(_blob(json.dumps(_good()[0]).encode() + bytes(8),
                                           _good()[1])), words=("json",)),
    Case("header_nan_offset", _raw_header(json.dumps(_good()[0]).replace(
        '"data_offsets": [264, 272]', '"data_offsets": [NaN, 272]')), entry="leak"),
    *[Case(f"header_is_{name}", _raw_header(text), words=("not an object",))
      for name, text in (("list", "[]"), ("null", "null"), ("number", "42"),
                         ("string", '"text"'))],
    Case("duplicate_key", _duplicate_key(), entry="k_scale", words=("twice",)),
    # Deep nesting, in the header and in the spec.
    Case("header_nested_200000", _raw_header(_nested(200_000)), words=("deep",)),
    Case("shape_nested", _entry("leak", shape=json.loads(_nested(10))), entry="leak"),
    Case("header_value_nested_1000", _raw_header(
        json.dumps(_good()[0])[:-1] + ', "x": ' + _nested(1000) + "}"), words=("deep",)),
    Case("spec_nested_200000", _spec(_nested(200_000)), entry="spec", words=("deep",)),
    Case("spec_models_nested_40", _spec(_model_nested(40)), entry="spec", words=("deep",)),
    # Malformed tensor entries.
    Case("entry_is_list", _edit(lambda h: h.__setitem__("leak", [1, 2])), entry="leak"),
    Case("entry_is_null", _edit(lambda h: h.__setitem__("leak", None)), entry="leak"),
    Case("entry_without_dtype", _entry("leak", dtype=...), entry="leak"),
    Case("entry_without_shape", _entry("leak", shape=...), entry="leak"),
    Case("entry_without_offsets", _entry("leak", data_offsets=...), entry="leak"),
    Case("entry_with_extra_field", _entry("leak", extra=1), entry="leak"),
    Case("dtype_unknown", _entry("leak", dtype="F33"), entry="leak", words=("f33",)),
    Case("dtype_numpy_name", _entry("leak", dtype="float32"), entry="leak"),
    Case("dtype_number", _entry("leak", dtype=7), entry="leak"),
    Case("dtype_complex", _entry("leak", dtype="C64"), entry="leak"),
    Case("dtype_float8", _entry("leak", dtype="F8_E4M3"), entry="leak"),
    Case("all_tensors_int32", _all_as("I32"), entry="k_proj.weight", words=("integer",)),
    Case("dtype_uint32", _entry("leak", dtype="U32"), entry="leak", words=("integer",)),
    Case("dtype_int64", _entry("leak", dtype="I64"), entry="leak", words=("integer",)),
    Case("dtype_bool", _entry("leak", dtype="BOOL"), entry="leak", words=("boolean",)),
    Case("dtype_disagrees_with_size", _entry("leak", dtype="F16"), entry="leak",
         words=("wrong size",)),
    # Shapes.
    Case("shape_string", _entry("leak", shape="[2]"), entry="leak", words=("shape",)),
    Case("shape_negative", _entry("k_proj.weight", shape=[-32, -32]), entry="k_proj.weight",
         words=("shape",)),
    Case("shape_2**62", _entry("k_proj.weight", shape=[2**62, 4]), entry="k_proj.weight",
         words=("wrong size",)),
    Case("shape_2**64", _entry("k_proj.weight", shape=[2**64, 4]), entry="k_proj.weight",
         words=("shape",)),
    Case("shape_float", _entry("leak", shape=[2.0]), entry="leak", words=("shape",)),
    Case("shape_bool", _entry("leak", shape=[True, 2]), entry="leak", words=("shape",)),
    Case("shape_5000_digits", _raw_header(json.dumps(_good()[0]).replace(
        '"shape": [2], "data_offsets": [264', f'"shape": [{_BIG}], "data_offsets": [264')),
        entry="leak", words=("5000-digit",)),
    Case("shape_100_dims", _entry("leak", shape=[1] * 98 + [2]), entry="leak",
         words=("shape",)),
    Case("shape_too_small", _entry("leak", shape=[1]), entry="leak", words=("wrong size",)),
    # Offsets.
    Case("offsets_strings", _entry("leak", data_offsets=["264", "272"]), entry="leak",
         words=("data_offsets",)),
    Case("offsets_floats", _entry("leak", data_offsets=[264.0, 272.0]), entry="leak",
         words=("data_offsets",)),
    Case("offsets_5000_digits", _raw_header(json.dumps(_good()[0]).replace(
        "[264, 272]", f"[264, {_BIG}]")), entry="leak", words=("5000-digit",)),
    Case("offsets_10**30", _entry("leak", data_offsets=[10**30, 10**30 + 8]), entry="leak"),
    Case("offsets_negative", _entry("leak", data_offsets=[-8, 0]), entry="leak"),
    Case("offsets_reversed", _entry("leak", data_offsets=[272, 264]), entry="leak"),
    Case("offsets_three", _entry("leak", data_offsets=[264, 268, 272]), entry="leak"),
    Case("offsets_one", _entry("leak", data_offsets=[264]), entry="leak"),
    Case("offsets_not_list", _entry("leak", data_offsets=264), entry="leak"),
    Case("offsets_past_data", _entry("leak", data_offsets=[800, 808]), entry="leak",
         words=("outside",)),
    Case("offsets_same_as_another", _overlap("leak", like="k_scale"), entry="leak",
         words=("overlapping",)),
    Case("offsets_overlap_partly", _overlap("o_proj.weight", like="k_scale"),
         entry="o_proj.weight", words=("overlapping",)),
    Case("offsets_leave_gap", _gap(), entry="v_scale", words=("no tensor",)),
    # Metadata and the spec in it.
    Case("no_metadata", _edit(lambda h: h.pop("__metadata__")),
         words=("not a memcore checkpoint",)),
    Case("metadata_is_list", _edit(lambda h: h.__setitem__("__metadata__", [1])),
         words=("not a memcore checkpoint",)),
    Case("metadata_value_number", _metadata(memcore_version=1), entry="memcore_version"),
    Case("metadata_spec_object", _metadata(spec=json.loads(SPEC.to_json())), entry="spec"),
    Case("format_other", _metadata(format="other"), words=("not a memcore checkpoint",)),
    Case("format_version_missing", _metadata(format_version=...), entry="format_version"),
    Case("format_version_word", _metadata(format_version="one"), entry="format_version"),
    Case("format_version_newer", _metadata(format_version="99"), entry="format_version 99",
         words=("upgrade",)),
    Case("spec_missing", _metadata(spec=...), entry="spec"),
    Case("spec_not_json", _spec("{not json"), entry="spec", words=("not valid json",)),
    Case("spec_list", _spec("[1, 2]"), entry="spec"),
    Case("spec_without_kind", _spec('{"d_model": 8}'), entry="spec"),
    Case("spec_kind_list", _spec('{"kind": ["mosaic"]}'), entry="spec"),
    Case("spec_width_string", _spec(_spec_field(SPEC, d_model="8")), entry="d_model"),
    Case("spec_width_float", _spec(_spec_field(SPEC, d_model=8.5)), entry="d_model"),
    Case("spec_width_negative", _spec(_spec_field(SPEC, d_model=-8)), entry="d_model"),
    Case("spec_heads_bool", _spec(_spec_field(SPEC, n_heads=True)), entry="n_heads"),
    Case("spec_unknown_kind", _spec('{"kind": "lstm", "d_model": 8}'), entry="lstm"),
    Case("spec_unknown_field", _spec(_spec_field(SPEC, colour="blue")), entry="colour"),
    Case("spec_primitive_kind", _spec('{"kind": "leaky_average", "n_heads": 2}'),
         entry="spec"),
    Case("spec_5000_digits", _spec(_spec_field(SPEC, d_model=0).replace('"d_model": 0',
                                                                        f'"d_model": {_BIG}')),
         entry="spec"),
    Case("spec_too_long", _spec(SPEC.to_json()[:-1] + " " * 2_000_000 + "}"), entry="spec",
         words=("limit",)),
    Case("spec_width_10**6", _spec(_spec_field(SPEC, d_model=10**6)), entry="d_model"),
    # 3 GiB of state: refused under the 1 GiB limit test_crafted_files.py sets.
    Case("spec_window_5e7", _spec(_spec_field(memcore.spec.transformer(8, 2), window=5 * 10**7),
                                  memcore.init(memcore.spec.transformer(8, 2))),
         entry="window", words=("allocation limit",)),
    Case("spec_window_10**12", _spec(_spec_field(memcore.spec.transformer(8, 2),
                                                 window=10**12),
                                     memcore.init(memcore.spec.transformer(8, 2))),
         entry="window", words=("allocation limit",)),
    Case("spec_capacity_10**12", _spec(_spec_field(SPEC, capacity=10**12)), entry="capacity",
         words=("allocation limit",)),
    # Tensors that are not the spec's parameters.
    Case("tensor_missing", _without("leak"), entry="missing ['leak']"),
    Case("tensor_unexpected", _with_extra(), entry="unexpected ['bias']"),
    Case("tensor_misshapen", _reshaped(), entry="k_proj.weight: expected shape (8, 8)"),
    # Other formats under a checkpoint's name.
    Case("pickle", _bytes(pickle.dumps({"w": [0.0] * 16}, protocol=4)), words=("pickle",)),
    Case("pickle_protocol_2", _bytes(pickle.dumps({"w": [0.0] * 16}, protocol=2)),
         words=("pickle",)),
    Case("zip_like_torch_save", _bytes(_zip()), words=("zip",)),
    Case("npy", _bytes(_npy()), words=(".npy",)),
    Case("gzip", _bytes(gzip.compress(GOOD, mtime=0)), words=("gzip",)),
    Case("text", _bytes(b"hello, this is not a checkpoint\n")),
    # Things that are not regular files.
    Case("fifo", _special("fifo"), words=("fifo",)),
    Case("link_to_fifo", _special("fifo_link"), words=("fifo", "link")),
    Case("link_to_dev_zero", _special("zero"), words=("character device",)),
    Case("link_to_dev_null", _special("null"), words=("character device",)),
    Case("link_to_dev_urandom", _special("urandom"), words=("character device",)),
    Case("directory", _special("directory"), words=("directory",)),
    Case("link_to_directory", _special("directory_link"), words=("directory",)),
    Case("socket", _special("socket"), words=("socket",)),
    Case("dangling_link", _special("dangling"), error=FileNotFoundError, words=("dangling",)),
    Case("missing", _special("missing"), error=FileNotFoundError),
    Case("link_loop", _special("loop"), error=OSError),
    # Controls: files that must load.
    Case("good", _bytes(GOOD), error=None),
    Case("link_to_good", _link_to_good, error=None),
    Case("good_header_after_spaces", _raw_header(" " + json.dumps(_good()[0])), error=None),
]
