"""The common training loop: schedule, masked loss, checkpoints in safetensors, exact resume."""

import json
import math

import numpy as np
import pytest
import torch

import memcore
from memcore import spec as S
from memcore.tasks import mqar
from memcore.tasks.stack import TaskModel, task_model
from memcore.tasks.train import (
    CHECKPOINT,
    TrainConfig,
    check_backend,
    check_device,
    lr_at,
    masked_loss,
    train,
)

V, L, KV = 64, 16, 2


def _model(seed=0, conv=3):
    spec = S.model([S.transformer(16, 2), S.transformer(16, 2, window=4)], V, ffn=None,
                   short_conv=conv)
    return task_model("torch", spec, seed)


def _batches(step):
    return mqar.generate(4, V, L, KV, np.random.default_rng([11, step]))


@pytest.mark.parametrize("conv", [0, 3])
def test_task_model_is_the_model_realization(conv):
    spec = S.model([S.bmojo(16, 2, window=4, chunk=4, select=2, capacity=4, d_state=4)] * 2,
                   V, ffn=None, short_conv=conv)
    params = memcore.init(spec, 5)
    ours = task_model("torch", spec, 5)
    assert {k[len("model."):] for k in ours.state_dict()} == set(params)
    for k, v in ours.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), params[k[len("model."):]], err_msg=k)
    ref = memcore.realize(spec, backend="torch", params=params)
    tokens = torch.as_tensor(_batches(0)[0])
    want, _, want_aux = ref.forward_aux(tokens)
    got = ours(tokens)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.aux_loss, want_aux)
    # logits at selected positions are those rows of the full logits
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    mask[0, 3] = mask[2, 7] = True
    torch.testing.assert_close(ours(tokens, mask), want[mask], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        ours(tokens, mask[:1])


def test_masked_loss_uses_labelled_positions_only():
    model = _model()
    x, y = (torch.as_tensor(a) for a in _batches(0))
    _, ce = masked_loss(model, x, y, 0.0)
    logits = model(x)
    m = y != mqar.IGNORE
    want = torch.nn.functional.cross_entropy(logits[m], y[m])
    torch.testing.assert_close(ce, want, rtol=1e-6, atol=1e-6)


def test_cosine_schedule():
    cfg = TrainConfig(steps=100, lr=1e-2, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-3)
    assert lr_at(9, cfg) == pytest.approx(1e-2)
    assert lr_at(10, cfg) == pytest.approx(1e-2)
    assert lr_at(55, cfg) == pytest.approx(1e-3 + 9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, cfg) == pytest.approx(1e-3)


def test_resume_continues_exactly(interrupted_and_resumed):
    cfg = dict(steps=6, lr=3e-3, seed=0, checkpoint_every=3, log_every=0)
    whole, resumed = interrupted_and_resumed(train, _model, _batches, cfg)
    # the resumed run's last 2 steps really ran (not replayed from the file)
    assert resumed["losses"][3:] == whole["losses"][3:]


def test_checkpoint_is_safetensors_with_json_scalars(tmp_path):
    from safetensors import safe_open

    train(_model(), _batches, TrainConfig(steps=2, checkpoint_every=2, out_dir=str(tmp_path),
                                          log_every=1), quiet=True)
    with safe_open(str(tmp_path / CHECKPOINT), framework="pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["train_state"])
    assert meta["step"] == 2 and len(meta["history"]["losses"]) == 2
    assert "rng.torch" in keys and "model.model.embed.weight" in keys
    assert any(k.startswith("optim.") and k.endswith(".exp_avg") for k in keys)
    assert not list(tmp_path.glob(".ckpt-*"))  # no temporary file left behind
    lines = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2] and all("loss" in r for r in lines)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(_model(), _batches, TrainConfig(steps=2, out_dir=str(tmp_path)), resume=True,
              quiet=True)


def test_bad_arguments():
    pytest.importorskip("optax")
    assert check_backend("jax") is None  # the JAX loop trains every task
    with pytest.raises(ValueError, match="--backend must be one of"):
        check_backend("numpy")
    with pytest.raises(ValueError, match="--device must be a torch device"):
        check_device("gpu0")
    with pytest.raises(ValueError, match="steps must be"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="checkpoint_every needs out_dir"):
        TrainConfig(steps=2, checkpoint_every=1)
    with pytest.raises(ValueError, match="short_conv must be"):
        S.model([S.mamba(8)], 16, ffn=None, short_conv=-1)
    with pytest.raises(TypeError, match="TaskModel wraps a realized torch model"):
        TaskModel(torch.nn.Linear(2, 2))


class _Stop(Exception):
    pass


def test_resume_logs_each_step_once_and_seconds_count_on(tmp_path):
    cfg = dict(steps=6, lr=3e-3, checkpoint_every=3, log_every=1, eval_every=2,
               out_dir=str(tmp_path))

    def interrupted(step):
        if step == 5:  # steps 4 and 5 were logged after the checkpoint at step 3
            raise _Stop
        return _batches(step)

    with pytest.raises(_Stop):
        train(_model(), interrupted, TrainConfig(**cfg), eval_fn=lambda m: 0.5, quiet=True)
    before = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in before if "loss" in r] == [1, 2, 3, 4, 5]
    res = train(_model(), _batches, TrainConfig(**cfg), eval_fn=lambda m: 0.5, resume=True,
                quiet=True)
    lines = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in lines if "eval" in r] == [2, 4, 6]
    seconds = [r["seconds"] for r in lines]
    assert seconds == sorted(seconds)  # the resumed records go on from the checkpoint's
    at_ckpt = next(r["seconds"] for r in before if r["step"] == 3 and "loss" in r)
    assert res["seconds"] > at_ckpt and res["evals"] == [(2, 0.5), (4, 0.5), (6, 0.5)]


def test_checkpoint_at_the_end_and_an_early_stop_stays_stopped(tmp_path):
    evals = iter([0.5, 0.995])
    cfg = TrainConfig(steps=8, eval_every=2, early_stop=0.99, checkpoint_at_end=True,
                      out_dir=str(tmp_path), log_every=1)  # no checkpoint_every
    res = train(_model(), _batches, cfg, eval_fn=lambda m: {"val": next(evals), "test": 0.25},
                quiet=True)
    assert res["steps"] == 4 and res["stopped"]
    assert res["evals"] == [(2, 0.5, {"test": 0.25}), (4, 0.995, {"test": 0.25})]
    from safetensors import safe_open

    with safe_open(str(tmp_path / CHECKPOINT), framework="pt") as f:
        meta = json.loads(f.metadata()["train_state"])
    assert meta["step"] == 4 and meta["history"]["stopped"]
    assert meta["spec"]["vocab_size"] == V
    again = train(_model(), _batches, cfg, eval_fn=lambda m: pytest.fail("evaluated again"),
                  resume=True, quiet=True)
    assert again["steps"] == 4 and again["losses"] == res["losses"]  # no step after the stop
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(s)["step"] for s in lines if '"loss"' in s] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="without 'val'"):
        train(_model(), _batches, TrainConfig(steps=1), eval_fn=lambda m: {"test": 1.0},
              quiet=True)


@pytest.mark.parametrize("change,message", [
    (dict(lr=1e-2), "lr differs from the checkpoint's"),
    (dict(seed=3), "seed differs from the checkpoint's"),
    (dict(steps=5), "steps differs from the checkpoint's"),
    (dict(width=8), "the width \\(d_model\\) differs"),
    (dict(vocab=V + 8), "the vocabulary \\(vocab_size\\) differs"),
])
def test_resume_refuses_another_run_by_name(tmp_path, change, message):
    def model(width=16, vocab=V):
        spec = S.model([S.transformer(width, 2)] * 2, vocab, ffn=None, short_conv=3)
        return task_model("torch", spec, 0)

    base = dict(steps=4, lr=3e-3, seed=0, checkpoint_at_end=True, out_dir=str(tmp_path))
    train(model(), _batches, TrainConfig(**base), quiet=True)
    sizes = {k: change.pop(k) for k in ("width", "vocab") if k in change}
    with pytest.raises(ValueError, match=message):
        train(model(**sizes), _batches, TrainConfig(**{**base, **change}), resume=True,
              quiet=True)
