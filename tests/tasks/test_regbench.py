"""RegBench: the data sets, the encoding and metrics against their definitions, the in-context
3-gram, the paper's model configurations, deviations, and a tiny run."""

import importlib.util
import json

import numpy as np
import pytest

from memcore import cli
from memcore.tasks import dfa, protocol
from memcore.tasks import regbench as rb

SMALL = rb.RegBenchConfig(train_dfas=12, val_dfas=6, test_dfas=5, max_string_len=6)


def test_splits_are_disjoint_and_do_not_move_with_the_training_set():
    data = rb.make_data(SMALL)
    keys = {k: [d.key for _, d in items] for k, items in data.items()}
    assert [len(keys[k]) for k in ("test", "val", "train")] == [5, 6, 12]
    every = keys["test"] + keys["val"] + keys["train"]
    assert len(set(every)) == len(every)  # disjoint across and within the sets
    for k in ("test", "val"):
        x = rb.encode_batch(data[k])[0]
        assert x.shape[0] == len(data[k])
    protocol.check_disjoint(rb.encode_batch(data["val"])[:2], rb.encode_batch(data["test"])[:2])
    more = rb.make_data(rb.RegBenchConfig(train_dfas=20, val_dfas=6, test_dfas=5,
                                          max_string_len=6))
    for k in ("test", "val"):
        assert [t for t, _ in more[k]] == [t for t, _ in data[k]]
    assert [t for t, _ in more["train"][:12]] == [t for t, _ in data["train"]]
    for tokens, d in data["train"]:
        cuts = [-1] + [i for i, t in enumerate(tokens) if t == rb.SEP] + [len(tokens)]
        words = [tokens[a + 1:b] for a, b in zip(cuts, cuts[1:], strict=False)]
        assert 10 <= len(words) <= 19
        assert all(1 <= len(w) <= 6 and d.accepts(w) for w in words)


def test_encode_batch_labels_and_valid_letters():
    d = dfa.DFA([{0: 1, 1: 2}, {2: 0}, {3: 2}])
    tok = [0, 2, 1, rb.SEP, 1, 3]  # "a c b | b d"
    x, y, valid = rb.encode_batch([(tok, d), (tok[:3], d)])
    assert x.shape == (2, 5) and list(x[1, 2:]) == [rb.PAD] * 3
    assert list(y[0]) == [2, 1, -100, 1, 3]
    assert list(y[1]) == [2, 1, -100, -100, -100]
    # states: after a -> 1 (allows c), after c -> 0 (a, b), after | -> 0, after b -> 2 (d)
    assert [set(np.flatnonzero(v)) for v in valid[0]] == [{2}, {0, 1}, set(), {0, 1}, {3}]


def test_metrics():
    valid = np.zeros((1, 2, rb.LETTERS), dtype=bool)
    valid[0, 0, [1, 2]] = True
    valid[0, 1, [4]] = True
    labels = np.array([[1, 4]])
    p = np.zeros((1, 2, rb.VOCAB))
    p[0, 0, 1] = 1.0  # argmax valid; distribution (1, 0) vs (.5, .5): L1 = 1
    p[0, 1, 5] = 1.0  # argmax invalid; L1 = 2
    acc, tvd = rb.metrics(p, valid, labels)
    assert acc == pytest.approx(0.5) and tvd == pytest.approx(1.5)


def test_in_context_3gram_on_a_hand_checked_instance():
    # one state, letters 0 and 1 both allowed everywhere: "0 1 | 0"
    d = dfa.DFA([{0: 0, 1: 0}])
    tok = [0, 1, rb.SEP, 0, 0]
    acc, tvd = rb.in_context_ngram([(tok, d)])
    # targets: 1 (after "0"), - (|), 0 (after "1 |"), 0 (after "| 0"); letters only scored
    u = 1 / rb.LETTERS
    p0 = np.full(rb.LETTERS, u)  # position 0: only the unigram "0" was seen
    p0 = (np.eye(rb.LETTERS)[0] + p0) / 2
    # position 2 (after "0 1 |"): unigrams {0, 1}; bigram "|" unseen; trigram "1 |" unseen
    p2 = (np.eye(rb.LETTERS)[0] + np.eye(rb.LETTERS)[1] + 2 * np.full(rb.LETTERS, u)) / 4
    # position 3 (after "1 | 0"): unigrams {0, 1, 0}; "0" was followed by 1; "| 0" unseen
    uni = (2 * np.eye(rb.LETTERS)[0] + np.eye(rb.LETTERS)[1] + 2 * u) / 5
    p3 = (np.eye(rb.LETTERS)[1] + uni) / 2
    q = np.zeros(rb.LETTERS)
    q[[0, 1]] = 0.5
    want_tvd = np.mean([np.abs(p - q).sum() for p in (p0, p2, p3)])
    want_acc = np.mean([p.argmax() in (0, 1) for p in (p0, p2, p3)])
    assert acc == pytest.approx(want_acc) and tvd == pytest.approx(want_tvd)


def test_models_are_the_papers_configurations():
    cfg = rb.PAPER
    mosaic = rb.model_spec("mosaic", cfg)
    assert [lay.kind for lay in mosaic.layers] == ["mosaic", "mosaic"]
    assert mosaic.d_model == 128 and mosaic.layers[0].n_heads == 8
    assert mosaic.ffn.slots == 448 and mosaic.norm == "layer"
    assert mosaic.logit_scale == pytest.approx(128 ** -0.5)
    tr = rb.model_spec("transformer", cfg)
    assert tr.ffn == "mlp" and tr.mlp_ratio == 4 and tr.layers[0].positions == "rope"
    assert tr.n_layers == 2 and tr.layers[0].n_heads == 8
    mamba = rb.model_spec("mamba", cfg)
    assert mamba.n_layers == 4 and mamba.ffn is None
    assert cfg.total_steps == 200 * 32 and cfg.warmup == 20 * 32
    with pytest.raises(ValueError, match="unknown model"):
        rb.model_spec("lstm", cfg)


def test_deviations_are_recorded():
    full = protocol.Sweep(rb.LRS, rb.SEEDS)
    paper = rb.deviations(rb.PAPER, full, ["mosaic"])
    assert not any("training steps" in d for d in paper)
    assert any("no dropout" in d for d in paper)
    small = rb.deviations(rb.RegBenchConfig(steps=64, d_model=64), protocol.Sweep([1e-3], [0]),
                          ["transformer"])
    for text in ("64 training steps of batch 32 (2.0 epochs) instead of 200 epochs",
                 "width 64 instead of 128", "1 learning rate", "1 seed", "rotary"):
        assert any(text in d for d in small), text


def test_regbench_tiny_run(tmp_path, capsys):
    out = tmp_path / "rb"
    argv = ["regbench", "--steps", "2", "--batch", "2", "--train-dfas", "4", "--val-dfas", "3",
            "--test-dfas", "3", "--max-string-len", "4", "--d-model", "16", "--models",
            "transformer", "mosaic", "--lrs", "1e-3", "3e-3", "--seed", "0", "--eval-every", "1",
            "--log-every", "0", "--out", str(out)]
    assert cli.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["budget"]["steps"] == 2 and res["deviations"]
    for r in res["models"].values():
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["tvd"] <= 2
        assert r["seeds"] == [0] and r["lr"] in (1e-3, 3e-3)
        for key in ("val_accuracy", "accuracy_std", "val_accuracy_std", "tvd_std"):
            assert key in r
        for run in r["runs"]:
            assert run["best_step"] in (1, 2)
    assert 0 <= res["baselines"]["in-context 3-gram"]["accuracy"] <= 1
    assert "TVD" in capsys.readouterr().out
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "regbench.png").stat().st_size > 0
    assert cli.main(["regbench", "--models", "lstm"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert cli.main([*argv, "--lr", "1e-3"]) == 2
    assert "--lr and --lrs: give one of them" in capsys.readouterr().err
