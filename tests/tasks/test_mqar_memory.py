"""MQAR's models and memory: the accounting of memory from the spec against the real states,
the hybrids' layers, the flags reaching the models, and the memory sweep end to end."""

import importlib.util
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import memcore
from memcore import cli
from memcore.tasks import commands, memory, mqar
from memcore.tasks import mqar_configs as C
from memcore.tasks.stack import state_bytes, task_model

SMALL = replace(C.QUICK, vocab_size=64, seq_len=16, num_kv_pairs=2, d_model=16,
                n_heads=2, d_state=4, window=3, chunk=4, select=2, capacity=5)
VARIANTS = [(name, SMALL) for name in C.MODELS] + [
    ("mosaic", replace(SMALL, mosaic_capacity=6)), ("bmojo", replace(SMALL, capacity=0)),
    ("mamba_swa", replace(SMALL, pattern="MAM", hybrid_window=2))]


def _tensor_bytes(state) -> int:
    if isinstance(state, dict):
        return sum(_tensor_bytes(v) for v in state.values())
    if isinstance(state, (tuple, list)):
        return sum(_tensor_bytes(v) for v in state)
    return state.numel() * state.element_size() if isinstance(state, torch.Tensor) else 0


@pytest.mark.parametrize("name,cfg", VARIANTS, ids=[f"{n}-{i}" for i, (n, _) in
                                                    enumerate(VARIANTS)])
def test_memory_accounting_is_the_real_state(name, cfg):
    spec = C.model_spec(name, cfg)
    assert spec.short_conv == 3  # the tasks' convolution is the spec's
    model = task_model("torch", spec, 0)
    # before any token: what init_state allocates, the convolutions' K-1 inputs included
    init = model.model.init_state(1)
    conv = len(spec.layers) * 2 * spec.d_model * 4
    assert _tensor_bytes(init["conv"]) == conv
    assert memory.memory_bytes(spec, 0) == _tensor_bytes(init)
    # after T tokens: the states the layers return (grown caches included)
    for T in (1, 7, 19):
        x = torch.as_tensor(mqar.generate(1, 64, 16, 2, np.random.default_rng(T))[0])
        x = torch.cat([x, x], 1)[:, :T]
        assert memory.memory_bytes(spec, T) == state_bytes(model, x), (name, T)


def test_memory_accounting_errors():
    with pytest.raises(TypeError, match="model spec"):
        memory.memory_bytes(memcore.spec.mamba(8), 4)
    with pytest.raises(ValueError, match="seq_len must be an int >= 0"):
        memory.memory_bytes(C.model_spec("mamba", SMALL), -1)


def test_the_hybrids_are_what_their_names_say():
    jamba = C.model_spec("jamba", SMALL)
    swa = C.model_spec("mamba_swa", replace(SMALL, hybrid_window=5))
    for spec in (jamba, swa):
        assert [layer.kind for layer in spec.layers] == ["mamba", "transformer"]
        assert spec.layers[0].d_state == SMALL.d_state and spec.ffn is None
    assert jamba.layers[1].window is None and swa.layers[1].window == 5
    three = C.model_spec("mamba_swa", replace(SMALL, pattern="MMA", hybrid_window=5))
    assert [(la.kind, getattr(la, "window", None)) for la in three.layers] == [
        ("mamba", None), ("mamba", None), ("transformer", 5)]


def test_mamba_swa_matches_bmojo_memory_by_default():
    for L, kv in ((64, 4), (128, 8), (256, 16)):
        cfg = replace(C.MEMORY, seq_len=L, num_kv_pairs=kv)
        w = C.matched_window(cfg)
        assert C.model_spec("mamba_swa", cfg).layers[1].window == w

        def mem(spec, L=L, cfg=cfg):
            return memory.memory_bytes(spec, L)

        bmojo = mem(C.model_spec("bmojo", cfg))
        assert mem(C.model_spec("mamba_swa", replace(cfg, hybrid_window=w))) <= bmojo
        if w < L:  # the largest such window
            wider = C.model_spec("mamba_swa", replace(cfg, hybrid_window=w + 1))
            assert mem(wider) > bmojo


def test_every_ssm_has_d_state_16_by_default():
    for mode in ("quick", "memory", "full"):
        variants, _, _ = C.plan(C.MODELS, mode)
        for tag, name, cfg, info in variants:
            if "d_state" in info.get("values", {}):
                continue  # the memory sweep's mamba points sweep it
            for layer in C.model_spec(name, cfg).layers:
                block = layer if layer.kind == "mamba" else getattr(layer, "fading_block", None)
                if block is not None:
                    assert block.d_state == 16, (mode, tag)


def test_the_flags_reach_the_models():
    args = cli.build_parser().parse_args(
        ["mqar", "--quick", "--window", "6", "--capacity", "5", "--select", "3", "--chunk",
         "7", "--d-state", "9", "--pattern", "AM", "--hybrid-window", "11", "--lrs", "1e-3",
         "2e-3", "3e-3", "--seeds", "4", "5"])
    variants, sweep, _ = C.plan(**commands.mqar_arguments(args))
    specs = {name: C.model_spec(name, cfg) for _, name, cfg, _ in variants}
    assert sweep.lrs == (1e-3, 2e-3, 3e-3) and sweep.seeds == (4, 5)
    b = specs["bmojo"].layers[0]
    assert (b.window, b.capacity, b.select, b.chunk, b.d_state) == (6, 5, 3, 7, 9)
    assert (specs["bmojo_f"].layers[0].window, specs["bmojo_f"].layers[0].d_state) == (6, 9)
    assert specs["transformer_window"].layers[0].window == 6
    assert specs["mamba"].layers[0].d_state == 9
    assert [(la.kind, getattr(la, "window", None)) for la in specs["mamba_swa"].layers] == [
        ("transformer", 11), ("mamba", None)]
    assert [la.kind for la in specs["jamba"].layers] == ["transformer", "mamba"]
    assert specs["jamba"].layers[1].d_state == 9 and specs["jamba"].layers[0].window is None


def test_memory_sweep_plan():
    variants, sweep, _ = C.plan(C.MODELS, "memory")
    assert len(sweep.lrs) >= 3 and len(sweep.seeds) >= 3
    grids = {info["grid"] for *_, info in variants}
    assert grids == {"L128-kv8", "L256-kv16"}
    at = [(name, info["values"]) for _, name, _, info in variants if info["grid"] == "L128-kv8"]
    assert {name for name, _ in at} == set(C.MODELS)
    bm = [v for n, v in at if n == "bmojo"]
    assert {(v["window"], v["capacity"]) for v in bm} == {(w, c) for w in (4, 16)
                                                         for c in (4, 8, 16)}
    assert [v for n, v in at if n in ("transformer", "jamba")] == [{}, {}]
    # command-line lists replace the swept values of every family that sweeps them
    args = cli.build_parser().parse_args(["mqar", "--sweep", "memory", "--seq-len", "128",
                                          "--kv", "8", "--window", "2", "5", "--capacity", "3"])
    variants, _, _ = C.plan(**commands.mqar_arguments(args))
    got = {(name, tuple(info["values"].items())) for _, name, _, info in variants}
    assert ("bmojo", (("window", 5), ("capacity", 3))) in got
    assert ("mamba_swa", (("hybrid_window", 2),)) in got
    assert ("mosaic", (("mosaic_capacity", 3),)) in got
    assert ("transformer_window", (("window", 5),)) in got
    # each point's configuration differs from the base only in its swept fields
    base = replace(C.MEMORY, seq_len=128, num_kv_pairs=8, capacity=8)
    for _, name, cfg, info in variants:
        assert replace(cfg, **{k: getattr(base, k) for k in info["values"]}) == base, name


def test_memory_sweep_runs_family_by_family_into_one_folder(tmp_path, capsys):
    tiny = ["mqar", "--sweep", "memory", "--seq-len", "16", "--kv", "2", "--vocab", "64",
            "--d-model", "16", "--batch", "4", "--steps", "2", "--val-examples", "8",
            "--test-examples", "8", "--lrs", "1e-3", "--seeds", "0", "--log-every", "0",
            "--threads", "1", "--out", str(tmp_path)]
    assert cli.main([*tiny, "--models", "transformer_window", "--window", "2", "4"]) == 0
    assert cli.main([*tiny, "--models", "mamba", "--d-state", "2"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["mode"] == "memory" and res["deviations"]
    assert any("1 seed(s)" in d for d in res["deviations"])
    got = [(p["family"], p["values"]) for p in res["points"]]
    assert got == [("mamba", {"d_state": 2}), ("transformer_window", {"window": 2}),
                   ("transformer_window", {"window": 4})]
    for p in res["points"]:
        spec = memcore.spec.from_dict(p["spec"])
        assert p["memory_bytes"] == memory.memory_bytes(spec, 16)
        assert 0.0 <= p["accuracy"] <= 1.0 and p["accuracy_std"] == 0.0
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "mqar.png").stat().st_size > 0
    capsys.readouterr()
    # another configuration into the same folder is refused, by name
    assert cli.main([*tiny, "--models", "mamba", "--batch", "8"]) == 2
    assert "config.batch_size differs" in capsys.readouterr().err
