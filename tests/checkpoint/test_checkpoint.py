"""Checkpoints: round trips on every layer kind and two models, atomic writes, and the errors
of a bad file (each names what is wrong)."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import memcore
from memcore import checkpoint as ck

SPECS = {
    "transformer": memcore.spec.transformer(16, 2, window=3),
    "mamba": memcore.spec.mamba(16, d_state=4),
    "bmojo_f": memcore.spec.bmojo_f(16, 2, window=3, d_state=4, tie_fading=False),
    "bmojo": memcore.spec.bmojo(16, 2, window=3, chunk=4, select=2, capacity=3, d_state=4),
    "mosaic": memcore.spec.mosaic(16, 2),
    "persistent": memcore.spec.persistent(16, 2, slots=5),
}
MODELS = {
    "jamba": memcore.spec.jamba(16, 2, pattern="MA", vocab_size=11, d_state=4),
    "mosaics": memcore.spec.model([memcore.spec.mosaic(16, 2)] * 2, vocab_size=11,
                                  ffn=memcore.spec.persistent(16, 2, slots=6), norm="layer",
                                  logit_scale=0.25),
}


def _write_raw(path, tensors, metadata):
    save_file(tensors, str(path), metadata=metadata)


def _meta(spec, version="1"):
    return {"format": ck.FORMAT, "format_version": version, "spec": spec.to_json()}


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_layer_round_trip(tmp_path, kind):
    spec = SPECS[kind]
    layer = memcore.realize(spec, params=memcore.init(spec, seed=1, dtype=np.float64))
    path = tmp_path / f"{kind}.safetensors"
    ck.save(path, layer)
    again = ck.load(path)
    assert again.spec == spec
    assert set(again.params) == set(layer.params)
    for name, value in layer.params.items():
        assert again.params[name].dtype == value.dtype
        np.testing.assert_array_equal(again.params[name], value, err_msg=name)
    x = np.random.default_rng(0).normal(size=(2, 7, spec.d_model))
    y0, s0 = layer(x)
    y1, s1 = again(x)
    np.testing.assert_array_equal(y1, y0)
    yt0, _ = layer.step(x[:, 0], s0)
    yt1, _ = again.step(x[:, 0], s1)
    np.testing.assert_array_equal(yt1, yt0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_round_trip(tmp_path, name):
    spec = MODELS[name]
    params = memcore.init(spec, seed=2, dtype=np.float64)
    path = tmp_path / "model.safetensors"
    ck.save(path, (spec, params))  # the pair form
    model = ck.load(path, backend="reference")
    assert model.spec == spec
    tokens = np.random.default_rng(1).integers(0, spec.vocab_size, size=(2, 9))
    np.testing.assert_array_equal(model(tokens)[0],
                                  memcore.realize(spec, params=params)(tokens)[0])


def test_file_is_plain_safetensors_with_metadata(tmp_path):
    from safetensors import safe_open

    spec = SPECS["mamba"]
    params = memcore.init(spec, seed=0)
    path = tmp_path / "m.safetensors"
    ck.save(path, (spec, params))
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    assert meta["format"] == "memcore.checkpoint"
    assert meta["format_version"] == str(ck.FORMAT_VERSION)
    assert memcore.spec.from_json(meta["spec"]) == spec
    _, mine = ck.load_params(path)
    assert all(a.flags.writeable and a.flags.owndata for a in mine.values())
    stored = load_file(str(path))
    assert set(stored) == set(params)
    for k in params:
        np.testing.assert_array_equal(stored[k], params[k])


def test_half_precision_saved_as_is(tmp_path):
    torch = pytest.importorskip("torch", reason="bfloat16 parameters come from torch here")
    from safetensors.torch import load_file as torch_load_file

    spec = SPECS["transformer"]
    base = memcore.init(spec, seed=3)
    for dtype in (torch.bfloat16, torch.float16):
        params = {k: torch.from_numpy(v).to(dtype) for k, v in base.items()}
        path = tmp_path / f"{dtype}.safetensors"
        ck.save(path, (spec, params))
        back = torch_load_file(str(path))  # the safetensors library's own reader
        for k, v in params.items():
            assert back[k].dtype == dtype
            assert torch.equal(back[k], v), k
        _, mine = ck.load_params(path)
        for k, v in params.items():
            np.testing.assert_array_equal(mine[k].astype(np.float32), v.float().numpy())
        _, cast = ck.load_params(path, dtype=np.float32)
        assert all(a.dtype == np.float32 for a in cast.values())


class _FailingBytes:
    """Makes the third tensor's serialisation fail, after the file has been partly written."""

    def __init__(self, real):
        self.real, self.calls = real, 0

    def __call__(self, name, value):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("disk full (simulated)")
        return self.real(name, value)


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    spec = SPECS["bmojo"]
    path = tmp_path / "c.safetensors"
    ck.save(path, (spec, memcore.init(spec, seed=0)))
    before = path.read_bytes()
    failing = _FailingBytes(ck._tensor_bytes)
    monkeypatch.setattr(ck, "_tensor_bytes", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        ck.save(path, (spec, memcore.init(spec, seed=1)))
    assert failing.calls == 3
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.safetensors"]  # no temporary file left behind
    monkeypatch.undo()
    ck.save(path, (spec, memcore.init(spec, seed=1)))  # a successful write replaces it
    np.testing.assert_array_equal(ck.load_params(path)[1]["q_proj.weight"],
                                  memcore.init(spec, seed=1)["q_proj.weight"])


def test_missing_file(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        ck.load(path)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "tiny", "header_not_json"])
def test_corrupt_file_names_path(tmp_path, damage):
    spec = SPECS["mosaic"]
    path = tmp_path / "bad.safetensors"
    ck.save(path, (spec, memcore.init(spec, seed=0)))
    blob = path.read_bytes()
    if damage == "garbage":
        blob = bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8))
    elif damage == "truncated":
        blob = blob[: len(blob) - 40]
    elif damage == "tiny":
        blob = blob[:5]
    else:
        blob = struct.pack("<Q", 6) + b"{nope}" + blob[14:]
    path.write_bytes(blob)
    with pytest.raises(ValueError, match="bad.safetensors.*not a valid safetensors") as err:
        ck.load(path)
    if damage == "truncated":
        assert "truncated" in str(err.value)


def test_not_a_memcore_checkpoint(tmp_path):
    path = tmp_path / "plain.safetensors"
    _write_raw(path, {"w": np.zeros((2, 2), np.float32)}, None)
    with pytest.raises(ValueError, match="not a memcore checkpoint"):
        ck.load(path)


@pytest.mark.parametrize("bad_spec, fragment", [
    ("{not json", "not valid JSON"),
    (json.dumps({"kind": "lstm", "d_model": 16}), "unknown kind 'lstm'"),
    (json.dumps({"kind": "mosaic", "d_model": 16, "n_heads": 3, "capacity": None}),
     "n_heads"),
])
def test_wrong_spec(tmp_path, bad_spec, fragment):
    spec = SPECS["mosaic"]
    path = tmp_path / "spec.safetensors"
    meta = dict(_meta(spec), spec=bad_spec)
    _write_raw(path, memcore.init(spec, seed=0), meta)
    with pytest.raises(ValueError, match="spec in its metadata does not parse") as err:
        ck.load(path)
    assert fragment in str(err.value)
    assert "spec.safetensors" in str(err.value)


def test_newer_format_version(tmp_path):
    spec = SPECS["mosaic"]
    path = tmp_path / "v.safetensors"
    _write_raw(path, memcore.init(spec, seed=0), _meta(spec, version="99"))
    with pytest.raises(ValueError, match="format_version 99"):
        ck.load(path)


def test_mismatched_names_and_shapes(tmp_path):
    spec = SPECS["persistent"]
    params = memcore.init(spec, seed=0)
    params.pop("leak")
    params["bias"] = np.zeros(3, np.float32)
    params["mem_k"] = np.zeros((2, 4, 8), np.float32)  # 4 slots where the spec says 5
    path = tmp_path / "shapes.safetensors"
    _write_raw(path, params, _meta(spec))
    with pytest.raises(ValueError) as err:
        ck.load_params(path)
    msg = str(err.value)
    assert "shapes.safetensors" in msg
    assert "missing ['leak']" in msg
    assert "unexpected ['bias']" in msg
    assert "mem_k: expected shape (2, 5, 8), got (2, 4, 8)" in msg


def test_spec_of_another_size(tmp_path):
    # Parameters of a 16-wide layer under the spec of a 32-wide one.
    small, big = memcore.spec.transformer(16, 2), memcore.spec.transformer(32, 2)
    path = tmp_path / "size.safetensors"
    _write_raw(path, memcore.init(small, seed=0), _meta(big))
    with pytest.raises(ValueError, match=r"q_proj.weight: expected shape \(32, 32\), got "
                                         r"\(16, 16\)"):
        ck.load(path)


def test_save_rejects_bad_input(tmp_path):
    spec = SPECS["mosaic"]
    with pytest.raises(TypeError, match="realized memcore object"):
        ck.save(tmp_path / "x.safetensors", {"k_proj.weight": np.zeros((16, 16))})
    params = memcore.init(spec, seed=0)
    params.pop("leak")
    with pytest.raises(ValueError, match=r"missing \['leak'\]"):
        ck.save(tmp_path / "x.safetensors", (spec, params))
    params = memcore.init(spec, seed=0)
    params["leak"] = np.array(["a", "b"])
    with pytest.raises(TypeError, match="parameter 'leak' has dtype"):
        ck.save(tmp_path / "x.safetensors", (spec, params))
    assert not os.listdir(tmp_path)


def _backend_or_skip(name):
    try:
        return memcore.get_backend(name)
    except (ImportError, ValueError) as err:
        pytest.skip(f"the {name} backend is not available: {err}")


def _framework_input(name, x):
    if name == "torch":
        import torch

        return torch.from_numpy(x)
    import jax.numpy as jnp

    return jnp.asarray(x)


def _numpy(y):
    return np.asarray(y.detach() if hasattr(y, "detach") else y)


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("kind", ["transformer", "mamba", "mosaic"])
def test_backend_round_trip(tmp_path, backend, kind):
    _backend_or_skip(backend)
    spec = SPECS[kind]
    obj = memcore.realize(spec, backend=backend,
                          params=memcore.init(spec, seed=4, dtype=np.float64))
    path = tmp_path / "b.safetensors"
    ck.save(path, obj)
    again = ck.load(path, backend=backend)
    x = _framework_input(backend, np.random.default_rng(0).normal(size=(1, 5, spec.d_model)))
    np.testing.assert_array_equal(_numpy(again(x, None)[0]), _numpy(obj(x, None)[0]))
    # The same file realizes on the reference backend with the same parameters.
    _, params = ck.load_params(path)
    ref = memcore.realize(spec, params=memcore.init(spec, seed=4, dtype=np.float64))
    for k, v in ref.params.items():
        np.testing.assert_array_equal(params[k].astype(v.dtype), v, err_msg=k)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    from memcore.checkpoint import atomic_write

    path = tmp_path / "sub" / "f.bin"
    atomic_write(path, lambda tmp: open(tmp, "wb").write(b"old"))  # makes the folder too
    assert path.read_bytes() == b"old"

    def broken(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken, prefix=".part-")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.bin"]  # no temporary left
