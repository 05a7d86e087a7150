"""The JAX training loop: the torch loop's trajectory on the same model, exact resume,
safetensors checkpoints and the same logs, clear errors. Every test trains the same tiny model
on batches of one shape, so the step compiles once for the file."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("jax")
pytest.importorskip("equinox")
pytest.importorskip("optax")

from memcore.tasks import jax_train, mqar, mqar_configs  # noqa: E402
from memcore.tasks.jax_stack import logits_at, state_dict  # noqa: E402
from memcore.tasks.stack import task_model  # noqa: E402
from memcore.tasks.train import CHECKPOINT, TrainConfig, check_backend, lr_at, train  # noqa: E402

V, L, KV = 64, 16, 2
# The model and batch shape of `memcore mqar` in test_jax_tasks.py: one compiled step serves
# both files when they run in one process.
SPEC = mqar_configs.model_spec("transformer", replace(mqar_configs.QUICK, vocab_size=V, seq_len=L,
                                                  num_kv_pairs=KV, d_model=16))
CLIP = 1.0  # bites: the first gradient norms are about 3


def _cfg(**kw):
    return TrainConfig(grad_clip=CLIP, **kw)


def _jax_model(seed=0):
    return task_model("jax", SPEC, seed)


def _batches(step):
    return mqar.generate(4, V, L, KV, np.random.default_rng([11, step]))


def test_trains_like_the_torch_loop(tmp_path):
    """Same weights, batches, AdamW, warmup + cosine schedule, weight decay and clipping: the
    two backends follow one trajectory (float32 rounding apart)."""
    # The clip threshold is compiled into the step: every test uses the same.
    cfg = dict(steps=5, lr=3e-3, warmup=2, min_lr_ratio=0.1, weight_decay=0.1, grad_clip=CLIP,
               log_every=1)
    assert SPEC.short_conv == 3  # the convolution trains on both sides
    ref = task_model("torch", SPEC, 2)
    want = train(ref, _batches, TrainConfig(out_dir=str(tmp_path / "t"), **cfg), quiet=True)
    got = jax_train.train(_jax_model(seed=2), _batches,
                          TrainConfig(out_dir=str(tmp_path / "j"), **cfg), quiet=True)
    np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-5)
    assert got["losses"][-1] < got["losses"][0]
    sd = state_dict(got["model"])
    assert set(sd) == set(ref.state_dict())
    for k, v in ref.state_dict().items():
        v = v.detach().numpy()
        err = np.sqrt(np.mean((sd[k] - v) ** 2) / np.mean(v ** 2))
        assert err <= 1e-5, (k, err)
    # the same log lines, learning rates from the same schedule
    logs = [[json.loads(s) for s in (tmp_path / d / "log.jsonl").read_text().splitlines()]
            for d in ("t", "j")]
    assert [sorted(r) for r in logs[0]] == [sorted(r) for r in logs[1]]
    assert [r["lr"] for r in logs[1]] == [lr_at(s, TrainConfig(**cfg)) for s in range(5)]


def test_resume_continues_exactly(interrupted_and_resumed):
    cfg = dict(steps=6, lr=3e-3, seed=0, checkpoint_every=3, log_every=0, warmup=1,
               grad_clip=CLIP)
    whole, resumed = interrupted_and_resumed(jax_train.train, _jax_model, _batches, cfg)
    a, b = state_dict(whole["model"]), state_dict(resumed["model"])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_checkpoint_is_safetensors_with_json_scalars(tmp_path):
    from safetensors import safe_open

    evals = iter([0.5, 0.995])
    res = jax_train.train(_jax_model(), _batches,
                          _cfg(steps=6, checkpoint_every=5, out_dir=str(tmp_path),
                                      log_every=1, eval_every=2, early_stop=0.99),
                          eval_fn=lambda m: next(evals), quiet=True)
    assert res["steps"] == 4 and res["evals"] == [(2, 0.5), (4, 0.995)]  # stopped early
    with safe_open(str(tmp_path / CHECKPOINT), framework="numpy") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["train_state"])
    assert meta["step"] == 4 and meta["backend"] == "jax"  # written at the early stop
    assert len(meta["history"]["losses"]) == 4 and meta["config"]["steps"] == 6
    assert {f"model.{k}" for k in state_dict(res["model"])} <= keys
    assert any(k.startswith("optim") and ".mu" in k for k in keys)  # Adam's moments
    assert not list(tmp_path.glob(".ckpt-*"))
    lines = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in lines if "eval" in r] == [2, 4]


def test_bad_arguments(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        jax_train.train(_jax_model(), _batches, _cfg(steps=2, out_dir=str(tmp_path)),
                        resume=True, quiet=True)
    # a torch checkpoint is not silently loaded into the JAX loop
    train(task_model("torch", SPEC, 0), _batches,
          _cfg(steps=1, checkpoint_every=1, out_dir=str(tmp_path), log_every=0),
          quiet=True)
    with pytest.raises(ValueError, match="written by the torch backend"):
        jax_train.train(_jax_model(), _batches, _cfg(steps=2, out_dir=str(tmp_path)),
                        resume=True, quiet=True)
    with pytest.raises(ValueError, match="--device must be 'cpu', 'cuda' or 'cuda:N'"):
        jax_train.jax_device("tpu0")
    with pytest.raises(ValueError, match="time_multiple must be an int >= 1"):
        jax_train.train(_jax_model(), _batches, _cfg(steps=1), time_multiple=0)

    def unlabelled(step):
        x, y = _batches(step)
        return x, np.full_like(y, mqar.IGNORE)
    with pytest.raises(ValueError, match="without any labelled position"):
        jax_train.train(_jax_model(), unlabelled, _cfg(steps=1), quiet=True)
    with pytest.raises(ValueError, match="tokens must lie in"):
        jax_train.train(_jax_model(), lambda s: (_batches(s)[0] + V, _batches(s)[1]),
                        _cfg(steps=1), quiet=True)
    check_backend("jax")  # installed here: accepted
    with pytest.raises(ValueError, match="--backend must be one of"):
        check_backend("numpy")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="WORLD_SIZE=2.*--backend torch"):
        check_backend("jax")
    monkeypatch.delenv("WORLD_SIZE")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "optax" else real(n, *a))
    with pytest.raises(ValueError, match="--backend jax needs jax, equinox and optax.*optax"):
        check_backend("jax")


def test_torch_tensors_are_not_needed():
    # The JAX loop takes numpy batches and never builds torch tensors for the model.
    res = jax_train.train(_jax_model(), _batches, _cfg(steps=1, log_every=0), quiet=True)
    assert all(not isinstance(v, torch.Tensor) for v in state_dict(res["model"]).values())


def test_logits_at_labelled_positions_are_rows_of_the_full_logits():
    model = _jax_model(seed=4)
    x, y = _batches(1)
    mask = y != mqar.IGNORE
    full = np.asarray(model(jax_numpy().asarray(x))[0])
    got = logits_at(model, x, mask)
    assert got.shape == (int(mask.sum()), V)
    np.testing.assert_allclose(got, full[mask], rtol=1e-5, atol=1e-6)


def jax_numpy():
    import jax.numpy as jnp

    return jnp
