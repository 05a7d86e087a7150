"""Checkpoints: round trips on every layer kind and two models, atomic writes, and the errors
of a bad file (each names what is wrong)."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import memcore
from memcore import atomic_files
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
    assert all(a.flags.writeable for a in mine.values())
    # The arrays are copies: rewriting the file afterwards changes none of them.
    before = {k: v.copy() for k, v in mine.items()}
    path.write_bytes(path.read_bytes()[:8] + b" " * (path.stat().st_size - 8))
    for k, v in mine.items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    ck.save(path, (spec, params))
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
        # Realized as stored: numpy bfloat16 (ml_dtypes) counts as floating point.
        layer = ck.load(path)
        x = np.random.default_rng(0).normal(size=(1, 3, 16)).astype(np.float32)
        assert np.isfinite(np.asarray(layer(x)[0], dtype=np.float32)).all()


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    spec = SPECS["bmojo"]
    path = tmp_path / "c.safetensors"
    ck.save(path, (spec, memcore.init(spec, seed=0)))
    before = path.read_bytes()
    real = ck.st_numpy.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        os.truncate(filename, os.path.getsize(filename) // 2)  # part of the file is written
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(ck.st_numpy, "save_file", half_then_fail)
    with pytest.raises(RuntimeError, match="simulated"):
        ck.save(path, (spec, memcore.init(spec, seed=1)))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.safetensors"]  # no temporary file left behind
    monkeypatch.undo()
    ck.save(path, (spec, memcore.init(spec, seed=1)))  # a successful write replaces it
    np.testing.assert_array_equal(ck.load_params(path)[1]["q_proj.weight"],
                                  memcore.init(spec, seed=1)["q_proj.weight"])


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_of_a_killed_save_is_removed(tmp_path):
    spec = SPECS["mosaic"]
    path = tmp_path / "k.safetensors"
    host = atomic_files.host()
    stale = tmp_path / f".k.safetensors.tmp-{host}-{_dead_pid()}-0123456789ab"
    stale.write_bytes(b"half a checkpoint")
    live = tmp_path / f".k.safetensors.tmp-{host}-{os.getppid()}-0123456789ab"  # alive
    live.write_bytes(b"being written")
    other_host = tmp_path / f".k.safetensors.tmp-elsewhere{host}-{_dead_pid()}-00ff"
    other_host.write_bytes(b"another machine's")
    other_file = tmp_path / f".l.safetensors.tmp-{host}-{_dead_pid()}-00ff"
    other_file.write_bytes(b"another target's")
    ck.save(path, (spec, memcore.init(spec, seed=0)))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [path.name, live.name, other_host.name, other_file.name])
    # A caller's prefix (the training loops use one) is cleaned the same way.
    stale_ckpt = tmp_path / f".ckpt-tmp-{host}-{_dead_pid()}-abcdef"
    stale_ckpt.write_bytes(b"x")
    ck.atomic_write(tmp_path / "checkpoint.safetensors",
                    lambda tmp: open(tmp, "wb").write(b"new"), prefix=".ckpt-")
    assert not stale_ckpt.exists() and other_file.exists()


_KILLED_SAVE = """
import os, signal, sys
import memcore
from memcore import checkpoint as ck

real = ck.st_numpy.save_file


def killed(tensors, filename, metadata=None):
    real(tensors, filename, metadata=metadata)
    os.kill(os.getpid(), signal.SIGKILL)  # before the rename


ck.st_numpy.save_file = killed
spec = memcore.spec.mosaic(16, 2)
ck.save(sys.argv[1], (spec, memcore.init(spec, seed=1)))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_killed_save_keeps_the_old_file_and_the_next_save_cleans_up(tmp_path):
    spec = SPECS["mosaic"]
    path = tmp_path / "c.safetensors"
    ck.save(path, (spec, memcore.init(spec, seed=0)))
    before = path.read_bytes()
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(path)], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and left[0].startswith(".c.safetensors.tmp-"), left
    assert path.read_bytes() == before
    ck.save(path, (spec, memcore.init(spec, seed=2)))
    assert os.listdir(tmp_path) == ["c.safetensors"]
    np.testing.assert_array_equal(ck.load_params(path)[1]["leak"],
                                  memcore.init(spec, seed=2)["leak"])


def test_temporary_is_named_for_its_writer(tmp_path):
    seen = []
    ck.atomic_write(tmp_path / "n.bin", lambda tmp: seen.append(tmp)
                    or open(tmp, "wb").write(b"x"))
    (tmp,) = seen
    folder, name = os.path.split(tmp)
    assert name == "n.bin" and os.path.dirname(folder) == str(tmp_path)
    assert os.path.basename(folder).startswith(f".n.bin.tmp-{atomic_files.host()}-{os.getpid()}-")
    assert os.listdir(tmp_path) == ["n.bin"]
    assert (tmp_path / "n.bin").read_bytes() == b"x"


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="file modes are POSIX")
def test_file_mode(tmp_path):
    spec = SPECS["mosaic"]
    path = tmp_path / "m.safetensors"
    umask = os.umask(0o022)
    try:
        ck.save(path, (spec, memcore.init(spec, seed=0)))
        assert path.stat().st_mode & 0o777 == 0o644  # what open() would make
        os.chmod(path, 0o640)
        ck.save(path, (spec, memcore.init(spec, seed=1)))
        assert path.stat().st_mode & 0o777 == 0o640  # an overwrite keeps the old mode
    finally:
        os.umask(umask)


DATA = os.path.join(os.path.dirname(__file__), "data")
# Written by memcore 0.1.0's own safetensors writer (before checkpoints went through the
# library): (file, spec, init seed, dtype the parameters were stored in).
OLD_FILES = [
    ("v1_mosaic_float32.safetensors", memcore.spec.mosaic(8, 2), 5, "float32"),
    ("v1_transformer_bfloat16.safetensors", memcore.spec.transformer(8, 2, window=3), 6,
     "bfloat16"),
    ("v1_jamba_float64.safetensors",
     memcore.spec.jamba(8, 2, pattern="MA", vocab_size=5, d_state=2), 7, "float64"),
]


@pytest.mark.parametrize("name, spec, seed, dtype", OLD_FILES, ids=[f[0] for f in OLD_FILES])
def test_files_of_the_first_writer_still_load(name, spec, seed, dtype):
    loaded_spec, params = ck.load_params(os.path.join(DATA, name))
    assert loaded_spec == spec
    want = memcore.init(spec, seed=seed, dtype=np.float64)
    assert set(params) == set(want)
    for k, v in want.items():
        assert params[k].dtype.name == dtype, k
        # The stored values are init's, rounded once to the stored dtype.
        np.testing.assert_array_equal(params[k], v.astype(params[k].dtype), err_msg=k)


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
    with pytest.raises(TypeError, match=r"'leak'.* dtype <U1"):
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
