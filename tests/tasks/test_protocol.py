"""The protocol every task shares: disjoint held-out sets, the sweep, selection on validation,
mean +- std; and MQAR's selection through a fake trainer whose validation and test disagree."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memcore.tasks import mqar, mqar_run, protocol
from memcore.tasks.mqar_run import MQARConfig


def test_sweep_checks_and_records_its_shortfalls():
    full = protocol.Sweep((1e-3, 3e-3, 1e-2), (0, 1, 2))
    assert full.deviations() == [] and len(full.runs) == 9 and full.runs[0] == (1e-3, 0)
    short = protocol.Sweep([1e-3], [4])
    assert [d.split()[0] for d in short.deviations()] == ["1", "1"]
    for lrs, seeds, message in (((), (0,), "--lrs must be one or more"),
                                ((0.0,), (0,), "--lrs must be one or more"),
                                ((1e-3,), (1.5,), "--seeds must be"),
                                ((1e-3,), (0, 0), "--seeds must be distinct")):
        with pytest.raises(ValueError, match=message):
            protocol.Sweep(lrs, seeds)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 40), st.integers(1, 40))
def test_held_out_examples_are_never_in_the_excluded_set(seed, n, m):
    rng = np.random.default_rng(seed)

    def draw(k):  # few distinct rows: collisions are the rule
        x = rng.integers(0, 3, size=(k, 2))
        return x, x.sum(1)

    exclude = draw(m)
    try:
        got = protocol.held_out(draw, n, exclude, tries=200)  # no failure by bad luck
    except ValueError as err:  # at most 9 distinct rows exist
        assert "too few distinct examples" in str(err)
        assert n > 9 - len({tuple(r) for r in exclude[0]})
        return
    assert len(got[0]) == n
    protocol.check_disjoint(got, exclude)
    assert len({tuple(r) for r in got[0]}) == n  # and no example twice
    with pytest.raises(ValueError, match="share 1 example"):
        protocol.check_disjoint(got, (got[0][:1], got[1][:1]))


def test_mqar_validation_and_test_share_no_example():
    # a task with few distinct sequences (V=10, L=8, kv=2), so that the draws collide
    cfg = MQARConfig(vocab_size=10, seq_len=8, num_kv_pairs=2, val_examples=60,
                     test_examples=60)
    (xv, yv), (xt, yt) = mqar_run.held_out_sets(cfg)
    assert xv.shape == xt.shape == (60, 8)
    protocol.check_disjoint((xv, yv), (xt, yt))
    # the same sets for every model and seed of a table
    (xv2, _), (xt2, _) = mqar_run.held_out_sets(cfg)
    np.testing.assert_array_equal(xv, xv2)
    np.testing.assert_array_equal(xt, xt2)
    # the test set is its own stream's draw, whatever the training seed
    plain = mqar.generate(60, 10, 8, 2, np.random.default_rng([mqar_run.TEST_STREAM]))[0]
    np.testing.assert_array_equal(xt, plain)


def test_best_evaluation_and_mean_std():
    evals = [(50, 0.2, {"test": 0.1}), (100, 0.9, {"test": 0.3}), (150, 0.9), (200, 0.5)]
    assert protocol.best_evaluation(evals) == (100, 0.9, {"test": 0.3})  # the earliest tie
    assert protocol.best_evaluation([(4, 0.5)]) == (4, 0.5, {})
    m, s = protocol.mean_std([0.5, 0.7, 0.9])
    assert m == pytest.approx(0.7) and s == pytest.approx(np.std([0.5, 0.7, 0.9], ddof=1))
    assert protocol.mean_std([0.4]) == (0.4, 0.0)


# Validation favours 1e-3, the test set 1e-2: the protocol must keep 1e-3 and report its test.
VAL = {1e-3: 0.8, 3e-3: 0.6, 1e-2: 0.4}
TEST = {1e-3: 0.3, 3e-3: 0.5, 1e-2: 0.9}


def _fake(lr, seed):
    return {"lr": lr, "seed": seed, "val_accuracy": VAL[lr] + 0.01 * seed,
            "accuracy": TEST[lr] + 0.02 * seed}


def test_select_picks_on_validation_not_on_test():
    sel = protocol.select([_fake(lr, s) for lr in VAL for s in (0, 1, 2)])
    assert sel["lr"] == 1e-3 and sel["seeds"] == [0, 1, 2]
    assert sel["accuracy"] == pytest.approx(0.32) and sel["val_accuracy"] == pytest.approx(0.81)
    assert sel["accuracy_std"] == pytest.approx(0.02)
    assert [r["lr"] for r in sel["by_lr"]] == list(VAL)
    low = protocol.select([{"lr": lr, "seed": 0, "loss": v, "val_loss": v} for lr, v in
                           VAL.items()], metric="loss", val="val_loss", maximize=False)
    assert low["lr"] == 1e-2  # the lowest validation loss
    with pytest.raises(ValueError, match="the same seeds"):
        protocol.select([_fake(1e-3, 0), _fake(3e-3, 1)])


def test_mqar_run_selects_each_model_on_validation(monkeypatch, tmp_path):
    calls = []

    def fake_run_one(name, cfg, seed, *args):
        calls.append((name, cfg.lr, seed))
        return {**_fake(cfg.lr, seed), "params": 7, "steps": cfg.total_steps,
                "best_step": cfg.total_steps, "stopped": False, "seconds": 1.0,
                "final_loss": 1.0}

    monkeypatch.setattr(mqar_run, "run_one", fake_run_one)
    res = mqar_run.run(["bmojo", "mamba"], lrs=list(VAL), seeds=[0, 1, 2],
                       overrides={"steps": 3}, out_dir=str(tmp_path), quiet=True)
    assert sorted(calls) == sorted((m, lr, s) for m in ("bmojo", "mamba") for lr in VAL
                                   for s in (0, 1, 2))
    for name in ("bmojo", "mamba"):
        r = res["models"][name]
        assert r["lr"] == 1e-3 and r["accuracy"] == pytest.approx(0.32)
        assert r["accuracy_std"] == pytest.approx(0.02) and r["seeds"] == [0, 1, 2]
        assert len(r["runs"]) == 9 and r["budget_steps"] == 3
    # three seeds and a sweep of three: no sweep shortfall among the deviations
    assert not any("seed(s)" in d or "learning rate(s)" in d for d in res["deviations"])
