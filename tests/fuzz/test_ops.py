"""Bad input to ``memcore.ops`` on numpy (the reference), torch and JAX arrays: integer and
boolean arrays, None, lists, arrays of two libraries in one call, wrong ranks and shapes, bad
windows, capacities and entry sets. Each case names the argument at fault."""

from __future__ import annotations

import numpy as np
import pytest

from memcore import ops

LIBS = ["numpy", "torch", "jax"]
RNG = np.random.default_rng(0)


def to(lib, a):
    """``a`` (numpy) as an array of ``lib``."""
    if lib == "torch":
        import torch

        return torch.from_numpy(np.array(a))
    if lib == "jax":
        import jax.numpy as jnp

        return jnp.asarray(a)
    return np.array(a)


def f(*shape):
    return RNG.standard_normal(shape)


def scan_args(lib, **change):
    """selective_scan's arguments: Bt=2, Dc=4, T=5, N=3; ``change`` replaces some (numpy
    values are moved to ``lib``; other values are passed as they are)."""
    args = dict(u=f(2, 4, 5), delta=f(2, 4, 5), A=-np.abs(f(4, 3)), B=f(2, 3, 5), C=f(2, 3, 5),
                D=f(4), z=f(2, 4, 5), delta_bias=f(4), initial_state=f(2, 4, 3))
    args.update(change)
    return {k: to(lib, v) if isinstance(v, np.ndarray) else v for k, v in args.items()}


def step_args(lib, **change):
    args = dict(state=f(2, 4, 3), u=f(2, 4), delta=f(2, 4), A=-np.abs(f(4, 3)), B=f(2, 3),
                C=f(2, 3))
    args.update(change)
    return {k: to(lib, v) if isinstance(v, np.ndarray) else v for k, v in args.items()}


def qkv(lib, T=5, **change):
    args = dict(q=f(2, T, 2, 3), k=f(2, T, 2, 3), v=f(2, T, 2, 3))
    args.update(change)
    return {k: to(lib, v) if isinstance(v, np.ndarray) else v for k, v in args.items()}


def entries(lib, S=4, **change):
    e = dict(k=f(2, 2, S, 3), v=f(2, 2, S, 3), score=f(2, S),
             pos=np.arange(2 * S).reshape(2, S))
    e.update(change)
    return {k: to(lib, v) if isinstance(v, np.ndarray) else v for k, v in e.items()}


def readout_state(lib, window=3, batch=2):
    q = to(lib, f(batch, 1, 2, 3))
    return ops.windowed_readout_state(q, window)


def call(op, **kwargs):
    return lambda: getattr(ops, op)(**kwargs)


def lazy(op, build):
    """A case whose arguments are built when it runs (inside the memory cap)."""
    return lambda: getattr(ops, op)(**build())


def _per_lib(lib):
    I64, BOOL = np.int64, np.bool_
    other = "torch" if lib != "torch" else "numpy"
    return [
        # --- 2.1 selective scan --------------------------------------------------------------
        ("scan-u-int", lazy("selective_scan", lambda: scan_args(lib, u=np.ones((2, 4, 5), I64))),
         TypeError, r"selective_scan: u must be a floating-point array, got dtype .*int64"),
        ("scan-delta-bool",
         lazy("selective_scan", lambda: scan_args(lib, delta=np.ones((2, 4, 5), BOOL))),
         TypeError, r"delta must be a floating-point array, got dtype .*bool"),
        ("scan-A-int", lazy("selective_scan", lambda: scan_args(lib, A=np.ones((4, 3), I64))),
         TypeError, r"A must be a floating-point array"),
        ("scan-B-int", lazy("selective_scan", lambda: scan_args(lib, B=np.ones((2, 3, 5), I64))),
         TypeError, r"B must be a floating-point array"),
        ("scan-D-int", lazy("selective_scan", lambda: scan_args(lib, D=np.ones(4, I64))),
         TypeError, r"D must be a floating-point array"),
        ("scan-initial-state-int",
         lazy("selective_scan", lambda: scan_args(lib, initial_state=np.ones((2, 4, 3), I64))),
         TypeError, r"initial_state must be a floating-point array"),
        ("scan-u-list", lazy("selective_scan", lambda: scan_args(lib, u=[[[1.0]]])),
         TypeError, r"selective_scan: u must be an array \(numpy, torch or JAX\), got list"),
        ("scan-A-None", lazy("selective_scan", lambda: scan_args(lib, A=None)),
         TypeError, r"selective_scan: A must be an array, got None"),
        ("scan-mixed-libraries",
         lazy("selective_scan", lambda: dict(scan_args(lib),
                                            delta=to(other, f(2, 4, 5)))),
         TypeError, rf"delta is a {other} array but u is a {lib} array"),
        ("scan-u-rank", lazy("selective_scan", lambda: scan_args(lib, u=f(2, 4))),
         ValueError, r"u must be \[batch, channels, T\], got shape \(2, 4\)"),
        ("scan-delta-shape", lazy("selective_scan", lambda: scan_args(lib, delta=f(2, 4, 6))),
         ValueError, r"delta must have u's shape \(2, 4, 5\)"),
        ("scan-A-channels", lazy("selective_scan", lambda: scan_args(lib, A=f(5, 3))),
         ValueError, r"A must be \[channels=4, d_state\]"),
        ("scan-C-state", lazy("selective_scan", lambda: scan_args(lib, C=f(2, 2, 5))),
         ValueError, r"C must be \[batch=2, d_state=3, T\]"),
        ("scan-initial-state-batch",
         lazy("selective_scan", lambda: scan_args(lib, initial_state=f(1, 4, 3))),
         ValueError, r"initial_state must be \[batch=2, channels=4, d_state=3\]"),
        ("scan-softplus-not-bool",
         lazy("selective_scan", lambda: scan_args(lib, delta_softplus="yes")),
         TypeError, r"delta_softplus must be a bool, got 'yes'"),
        ("state-update-state-int",
         lazy("selective_state_update", lambda: step_args(lib, state=np.ones((2, 4, 3), I64))),
         TypeError, r"selective_state_update: state must be a floating-point array"),
        ("state-update-state-None",
         lazy("selective_state_update", lambda: step_args(lib, state=None)),
         TypeError, r"selective_state_update: state must be an array, got None"),
        ("state-update-state-shape",
         lazy("selective_state_update", lambda: step_args(lib, state=f(2, 4, 2))),
         ValueError, r"state must be \[batch=2, channels=4, d_state=3\]"),
        # --- 2.2 leaky average ---------------------------------------------------------------
        ("leaky-k-int", lazy("leaky_average", lambda: dict(k=to(lib, np.ones((2, 5, 2, 3), I64)),
                                                           log_decay=to(lib, f(2)))),
         TypeError, r"leaky_average: k must be a floating-point array"),
        ("leaky-decay-bool",
         lazy("leaky_average", lambda: dict(k=to(lib, f(2, 5, 2, 3)),
                                            log_decay=to(lib, np.ones(2, BOOL)))),
         TypeError, r"log_decay must be a floating-point array"),
        ("leaky-decay-shape",
         lazy("leaky_average", lambda: dict(k=to(lib, f(2, 5, 2, 3)), log_decay=to(lib, f(3)))),
         ValueError, r"log_decay must be \[heads=2\]"),
        ("leaky-k-rank",
         lazy("leaky_average", lambda: dict(k=to(lib, f(2, 5, 6)), log_decay=to(lib, f(2)))),
         ValueError, r"leaky_average: k must be \[batch, T, heads, head_dim\]"),
        ("leaky-step-state-None",
         lazy("leaky_average_step", lambda: dict(k_t=to(lib, f(2, 2, 3)),
                                                 log_decay=to(lib, f(2)), state=None)),
         TypeError, r"leaky_average_step: state must be an array, got None"),
        ("leaky-state-shape",
         lazy("leaky_average", lambda: dict(k=to(lib, f(2, 5, 2, 3)), log_decay=to(lib, f(2)),
                                            initial_state=to(lib, f(2, 2, 4)))),
         ValueError, r"initial_state must be \[batch=2, heads=2, head_dim=3\]"),
        # --- 2.3 windowed readout ------------------------------------------------------------
        ("readout-window-negative", lazy("windowed_readout", lambda: qkv(lib, window=-3)),
         ValueError, r"windowed_readout: window must be >= 1, got -3"),
        ("readout-window-zero", lazy("windowed_readout", lambda: qkv(lib, window=0)),
         ValueError, r"windowed_readout: window must be >= 1, got 0"),
        ("readout-window-float", lazy("windowed_readout", lambda: qkv(lib, window=2.5)),
         TypeError, r"windowed_readout: window must be an int or None, got 2.5"),
        ("readout-window-bool", lazy("windowed_readout", lambda: qkv(lib, window=True)),
         TypeError, r"window must be an int or None, got True"),
        ("readout-q-int",
         lazy("windowed_readout", lambda: qkv(lib, q=np.ones((2, 5, 2, 3), I64), window=2)),
         TypeError, r"windowed_readout: q must be a floating-point array"),
        ("readout-v-None", lazy("windowed_readout", lambda: qkv(lib, v=None, window=2)),
         TypeError, r"windowed_readout: v must be an array, got None"),
        ("readout-k-shape", lazy("windowed_readout", lambda: qkv(lib, k=f(2, 4, 2, 3))),
         ValueError, r"k must have q's shape \(2, 5, 2, 3\)"),
        ("readout-fading-half",
         lazy("windowed_readout", lambda: qkv(lib, window=2, fading_k=to(lib, f(2, 5, 2, 3)))),
         ValueError, r"give both fading_k and fading_v"),
        ("readout-fading-no-window",
         lazy("windowed_readout", lambda: qkv(lib, fading_k=f(2, 5, 2, 3),
                                              fading_v=f(2, 5, 2, 3))),
         ValueError, r"window must be an int when fading keys are given"),
        ("readout-state-list",
         lazy("windowed_readout", lambda: qkv(lib, window=3, initial_state=[1, 2])),
         TypeError, r"initial_state must be a state dict"),
        ("readout-state-other-batch",
         lazy("windowed_readout", lambda: qkv(lib, window=3,
                                              initial_state=readout_state(lib, 3, batch=1))),
         ValueError, r"initial_state\['k'\] has shape \(1, 2, 3, 3\), expected \(2, 2, 3, 3\)"),
        ("readout-state-other-window",
         lazy("windowed_readout", lambda: qkv(lib, window=2,
                                              initial_state=readout_state(lib, 3))),
         ValueError, r"initial_state\['k'\] has shape \(2, 2, 3, 3\), expected \(2, 2, 2, 3\)"),
        ("readout-state-bad-pos",
         lazy("windowed_readout", lambda: qkv(lib, window=3, initial_state=dict(
             readout_state(lib, 3), pos=-2))),
         ValueError, r"initial_state\['pos'\] must be a non-negative int, got -2"),
        ("readout-return-final-not-bool",
         lazy("windowed_readout", lambda: qkv(lib, window=3, return_final_state="no")),
         TypeError, r"return_final_state must be a bool"),
        ("readout-step-state-None",
         lazy("windowed_readout_step", lambda: dict(q_t=to(lib, f(2, 2, 3)),
                                                    k_t=to(lib, f(2, 2, 3)),
                                                    v_t=to(lib, f(2, 2, 3)), state=None,
                                                    window=3)),
         TypeError, r"windowed_readout_step: state must be a state dict"),
        ("readout-step-window-negative",
         lazy("windowed_readout_step", lambda: dict(q_t=to(lib, f(2, 2, 3)),
                                                    k_t=to(lib, f(2, 2, 3)),
                                                    v_t=to(lib, f(2, 2, 3)),
                                                    state=readout_state(lib, 3), window=-1)),
         ValueError, r"windowed_readout_step: window must be >= 1, got -1"),
        ("readout-state-window-negative",
         lazy("windowed_readout_state", lambda: dict(q=to(lib, f(2, 1, 2, 3)), window=-3)),
         ValueError, r"windowed_readout_state: window must be >= 1, got -3"),
        ("readout-state-fading-no-window",
         lazy("windowed_readout_state", lambda: dict(q=to(lib, f(2, 1, 2, 3)), window=None,
                                                     fading=True)),
         ValueError, r"windowed_readout_state: window must be an int when fading=True"),
        # --- 2.5 / 2.6 -----------------------------------------------------------------------
        ("associative-capacity-zero",
         lazy("associative_readout", lambda: dict(k=to(lib, f(2, 5, 2, 3)),
                                                  v=to(lib, f(2, 5, 2, 3)), capacity=0)),
         ValueError, r"associative_readout: capacity must be >= 1, got 0"),
        ("associative-capacity-float",
         lazy("associative_readout", lambda: dict(k=to(lib, f(2, 5, 2, 3)),
                                                  v=to(lib, f(2, 5, 2, 3)), capacity=1.5)),
         TypeError, r"associative_readout: capacity must be an int or None, got 1.5"),
        ("associative-k-int",
         lazy("associative_readout", lambda: dict(k=to(lib, np.ones((2, 5, 2, 3), I64)),
                                                  v=to(lib, f(2, 5, 2, 3)))),
         TypeError, r"associative_readout: k must be a floating-point array"),
        ("associative-v-shape",
         lazy("associative_readout", lambda: dict(k=to(lib, f(2, 5, 2, 3)),
                                                  v=to(lib, f(2, 4, 2, 3)))),
         ValueError, r"associative_readout: k and v must be \[B, T, H, E\] of one shape"),
        ("persistent-mem-int",
         lazy("persistent_readout", lambda: dict(k=to(lib, f(2, 5, 2, 3)),
                                                 mem_k=to(lib, np.ones((2, 4, 3), I64)),
                                                 mem_v=to(lib, f(2, 4, 3)))),
         TypeError, r"persistent_readout: mem_k must be a floating-point array"),
        ("persistent-mem-shape",
         lazy("persistent_readout", lambda: dict(k=to(lib, f(2, 5, 2, 3)),
                                                 mem_k=to(lib, f(2, 4, 2)),
                                                 mem_v=to(lib, f(2, 4, 2)))),
         ValueError, r"mem_k and mem_v must be \[H=2, P, E=3\]"),
        # --- 2.4 eidetic store ---------------------------------------------------------------
        ("store-top-missing-field",
         lazy("store_top", lambda: dict(entries={k: v for k, v in entries(lib).items()
                                                 if k != "score"}, n=2)),
         TypeError, r"store_top: entries must be an entry set"),
        ("store-top-n-negative", lazy("store_top", lambda: dict(entries=entries(lib), n=-1)),
         ValueError, r"store_top: n must be >= 0, got -1"),
        ("store-top-pos-float",
         lazy("store_top", lambda: dict(entries=entries(lib, pos=f(2, 4)), n=2)),
         TypeError, r"store_top: entries\['pos'\] must be an integer array"),
        ("store-top-k-int",
         lazy("store_top", lambda: dict(entries=entries(lib, k=np.ones((2, 2, 4, 3), I64)),
                                        n=2)),
         TypeError, r"store_top: entries\['k'\] must be a floating-point array"),
        ("store-top-score-shape",
         lazy("store_top", lambda: dict(entries=entries(lib, score=f(2, 3)), n=2)),
         ValueError, r"entries\['score'\] must be \[B, S\] = \(2, 4\)"),
        ("store-merge-heads",
         lazy("store_merge", lambda: dict(a=entries(lib), b=entries(lib, k=f(2, 3, 4, 3),
                                                                     v=f(2, 3, 4, 3)), n=2)),
         ValueError, r"store_merge: a\['k'\] .* and b\['k'\] .* must agree"),
        ("store-merge-b-None", lazy("store_merge", lambda: dict(a=entries(lib), b=None, n=2)),
         TypeError, r"store_merge: b must be an entry set"),
        ("innovation-x-int",
         lazy("innovation_scores", lambda: dict(x=to(lib, np.ones((2, 5, 4), I64)),
                                                s_prev=None, pred_weight=None)),
         TypeError, r"innovation_scores: x must be a floating-point array"),
        ("innovation-weight-shape",
         lazy("innovation_scores", lambda: dict(x=to(lib, f(2, 5, 4)), s_prev=to(lib, f(2, 5, 4)),
                                                pred_weight=to(lib, f(4, 3)))),
         ValueError, r"innovation_scores: pred_weight must be \[4, 4\]"),
        ("innovation-half-predictor",
         lazy("innovation_scores", lambda: dict(x=to(lib, f(2, 5, 4)), s_prev=to(lib, f(2, 5, 4)),
                                                pred_weight=None)),
         ValueError, r"innovation_scores: give both s_prev and pred_weight"),
    ]


CASES = [pytest.param(fn, exc, pattern, id=f"{lib}-{name}")
         for lib in LIBS for name, fn, exc, pattern in _per_lib(lib)]


@pytest.mark.parametrize("fn,exc,pattern", CASES)
def test_bad_op_input(fn, exc, pattern, limited):
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    limited(fn, exc, pattern)


@pytest.mark.parametrize("lib", LIBS)
def test_empty_sequences_give_empty_outputs(lib):
    """T = 0 in, T = 0 out, and the state as it was (the ops that take a sequence)."""
    args = scan_args(lib, u=f(2, 4, 0), delta=f(2, 4, 0), B=f(2, 3, 0), C=f(2, 3, 0),
                     z=f(2, 4, 0))
    y, h = ops.selective_scan(**args, return_final_state=True)
    assert tuple(y.shape) == (2, 4, 0)
    np.testing.assert_array_equal(np.asarray(h), np.asarray(args["initial_state"]))
    k = to(lib, f(2, 0, 2, 3))
    assert tuple(ops.leaky_average(k, to(lib, f(2))).shape) == (2, 0, 2, 3)
    assert tuple(ops.associative_readout(k, k).shape) == (2, 0, 2, 3)
