"""from_memory_mosaics: the official Memory Mosaics model (facebookresearch/MemoryMosaics,
StackAssoMem) maps onto a memcore model. The oracle is a plain loop over the paper's equations,
written on the official parameter names and parameterisation."""

from __future__ import annotations

import math

import numpy as np
import pytest

import memcore
from memcore.interop import from_memory_mosaics

V, D, H, L, P = 13, 12, 3, 2, 7
E = D // H


def synthetic_state_dict(rng, n_layers=L, attn_only=False, dtype=np.float64):
    """Names and shapes of StackAssoMem(vocab_size=V, n_head=H, n_embd=D, n_layer=n_layers,
    pmem_size=P) with its defaults (tied head, no bias, kernel-1 key conv)."""
    emb = rng.normal(0, 1, (V, D))
    sd = {"emb.weight": emb, "head.weight": emb.copy(),
          "ln_out.weight": rng.uniform(0.5, 1.5, D)}
    for i in range(n_layers):
        b = f"blocks.{i}."
        sd[b + "ln1.weight"] = rng.uniform(0.5, 1.5, D)
        sd[b + "attn.k_featurizer.conv.weight"] = rng.normal(0, D ** -0.5, (D, D, 1))
        sd[b + "attn.v_featurizer.linear.weight"] = rng.normal(0, D ** -0.5, (D, D))
        sd[b + "attn.v_featurizer.coef"] = rng.uniform(0, 1, H)
        sd[b + "attn.c_proj.weight"] = rng.normal(0, D ** -0.5, (D, D))
        # Signs vary: the official decay uses |p|.
        sd[b + "attn.leaky_key_beta"] = rng.uniform(0.02, 0.5, H) * rng.choice([-1, 1], H)
        sd[b + "attn.kernel_beta"] = rng.uniform(0.0, 0.7, H)  # 0.7 exercises the cap at 5
        sd[b + "attn.value_beta"] = rng.uniform(-0.1, 0.05, H)
        if not attn_only:
            sd[b + "ln2.weight"] = rng.uniform(0.5, 1.5, D)
            sd[b + "pmem.k_featurizer.conv.weight"] = rng.normal(0, D ** -0.5, (D, D, 1))
            sd[b + "pmem.c_proj.weight"] = rng.normal(0, D ** -0.5, (D, D))
            sd[b + "pmem.leaky_key_beta"] = rng.uniform(0.02, 0.5, H) * rng.choice([-1, 1], H)
            sd[b + "pmem.kernel_beta"] = rng.uniform(0.0, 0.3, H)
            sd[b + "pmem.value_beta"] = rng.uniform(-0.1, 0.05, H)
            sd[b + "pmem.pmem.M_k0"] = rng.normal(0, E ** -0.5, (1, H, P, E))
            sd[b + "pmem.pmem.M_v0"] = rng.normal(0, E ** -0.5, (1, H, P, E))
    return {k: np.asarray(v, dtype=dtype) for k, v in sd.items()}


# --- the plain oracle, on the official names -------------------------------------------------

def _layer_norm(x, w):
    return (x - x.mean()) / math.sqrt(x.var() + 1e-5) * w


def _leaky_keys(sd, pre, x, h):
    """Head h's normalised leaky-average keys, with the official (1 - lambda) factor."""
    beta = 10.0 * abs(sd[pre + "leaky_key_beta"][h])
    w = sd[pre + "k_featurizer.conv.weight"][h * E:(h + 1) * E, :, 0]
    kt = [w @ xt for xt in x]
    keys = []
    for t in range(len(x)):
        kbar = sum(math.exp(-beta * (t - i)) * kt[i] for i in range(t + 1))
        kbar = (1.0 - math.exp(-beta)) * kbar
        keys.append(kbar / np.linalg.norm(kbar))
    return keys


def _softmax(s):
    e = np.exp(np.asarray(s) - max(s))
    return e / e.sum()


def _contextual(sd, pre, x):
    T = len(x)
    heads = []
    for h in range(H):
        scale = math.exp(min(10.0 * sd[pre + "kernel_beta"][h], 5.0))
        k = [scale * kk for kk in _leaky_keys(sd, pre, x, h)]
        w = sd[pre + "v_featurizer.linear.weight"][h * E:(h + 1) * E]
        c = sd[pre + "v_featurizer.coef"][h]
        u = [w @ xt for xt in x] + [np.zeros(E)]  # x_{T} is padded with zero
        v = []
        for t in range(T):
            mix = (1.0 - c) * u[t + 1] + c * u[t]
            v.append(math.exp(10.0 * sd[pre + "value_beta"][h]) * mix / np.linalg.norm(mix))
        y = [np.zeros(E)]  # position 0 has no pair to read
        for t in range(1, T):
            a = _softmax([k[t] @ k[j] for j in range(t)])
            y.append(sum(a[j] * v[j] for j in range(t)))
        heads.append(y)
    return [sd[pre + "c_proj.weight"] @ np.concatenate([heads[h][t] for h in range(H)])
            for t in range(T)]


def _persistent(sd, pre, x):
    heads = []
    for h in range(H):
        scale = math.exp(min(10.0 * sd[pre + "kernel_beta"][h], 5.0)) ** 2
        mk, mv = sd[pre + "pmem.M_k0"][0, h], sd[pre + "pmem.M_v0"][0, h]
        out = math.exp(10.0 * sd[pre + "value_beta"][h])
        heads.append([out * (_softmax(mk @ (scale * k)) @ mv)
                      for k in _leaky_keys(sd, pre, x, h)])
    return [sd[pre + "c_proj.weight"] @ np.concatenate([heads[h][t] for h in range(H)])
            for t in range(len(x))]


def official_forward(sd, tokens, n_layers=L, attn_only=False):
    out = []
    for seq in tokens:
        x = [sd["emb.weight"][int(tok)] for tok in seq]
        for i in range(n_layers):
            b = f"blocks.{i}."
            y = _contextual(sd, b + "attn.", [_layer_norm(xt, sd[b + "ln1.weight"]) for xt in x])
            x = [xt + yt for xt, yt in zip(x, y, strict=True)]
            if not attn_only:
                y = _persistent(sd, b + "pmem.",
                                [_layer_norm(xt, sd[b + "ln2.weight"]) for xt in x])
                x = [xt + yt for xt, yt in zip(x, y, strict=True)]
        out.append([sd["head.weight"] @ _layer_norm(xt, sd["ln_out.weight"]) / math.sqrt(D)
                    for xt in x])
    return np.asarray(out)


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


# --- tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("attn_only", [False, True])
def test_mapped_model_matches_official_equations(attn_only):
    rng = np.random.default_rng(0)
    sd = synthetic_state_dict(rng, attn_only=attn_only)
    spec, params = from_memory_mosaics(sd, n_heads=H)
    assert spec.n_layers == L and spec.vocab_size == V and spec.norm == "layer"
    assert spec.logit_scale == 1.0 / math.sqrt(D)
    assert spec.ffn == (None if attn_only else memcore.spec.persistent(D, H, P))
    assert all(layer == memcore.spec.mosaic(D, H) for layer in spec.layers)
    tokens = rng.integers(0, V, size=(2, 9))
    logits, _ = memcore.realize(spec, backend="reference", params=params)(tokens)
    assert _rel(logits, official_forward(sd, tokens, attn_only=attn_only)) <= 1e-9


def test_torch_state_dict_and_wrapper_prefix():
    torch = pytest.importorskip("torch", reason="checks torch tensors as input")
    sd = synthetic_state_dict(np.random.default_rng(1))
    _, want = from_memory_mosaics(sd)
    wrapped = {"_orig_mod." + k: torch.from_numpy(v) for k, v in sd.items()}
    _, got = from_memory_mosaics(wrapped)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # The head is optional in the state dict (tied to the embedding).
    del sd["head.weight"]
    assert set(from_memory_mosaics(sd)[1]) == set(want)


def test_default_sizes_map():
    # The paper's GPT2-small-like default shapes: 12 heads, P = 3.5 d slots, here 1 block.
    rng = np.random.default_rng(2)
    d, h, p = 96, 12, 336
    sd = {"emb.weight": rng.normal(size=(50, d)), "ln_out.weight": np.ones(d),
          "blocks.0.ln1.weight": np.ones(d), "blocks.0.ln2.weight": np.ones(d),
          "blocks.0.attn.k_featurizer.conv.weight": np.zeros((d, d, 1)),
          "blocks.0.attn.v_featurizer.linear.weight": np.zeros((d, d)),
          "blocks.0.attn.v_featurizer.coef": np.zeros(h),
          "blocks.0.attn.c_proj.weight": np.zeros((d, d)),
          "blocks.0.pmem.k_featurizer.conv.weight": np.zeros((d, d, 1)),
          "blocks.0.pmem.c_proj.weight": np.zeros((d, d)),
          "blocks.0.pmem.pmem.M_k0": np.zeros((1, h, p, d // h)),
          "blocks.0.pmem.pmem.M_v0": np.zeros((1, h, p, d // h))}
    for unit in ("attn", "pmem"):
        for name in ("leaky_key_beta", "kernel_beta", "value_beta"):
            sd[f"blocks.0.{unit}.{name}"] = np.zeros(h, np.float32)
    spec, params = from_memory_mosaics(sd)
    assert spec.ffn == memcore.spec.persistent(d, h, p)
    assert params["layers.0.mixer.k_proj.weight"].shape == (d, d)
    assert params["layers.0.ffn.mem_k"].shape == (h, p, d // h)
    memcore.check_params(spec, params)


def test_unknown_and_missing_keys_are_listed():
    sd = synthetic_state_dict(np.random.default_rng(3))
    del sd["blocks.1.attn.kernel_beta"]
    sd["blocks.0.attn.c_proj.bias"] = np.zeros(D)
    sd["blocks.1.ln1.bias"] = np.zeros(D)
    with pytest.raises(ValueError) as err:
        from_memory_mosaics(sd)
    msg = str(err.value)
    assert "missing ['blocks.1.attn.kernel_beta']" in msg
    assert "unknown ['blocks.0.attn.c_proj.bias', 'blocks.1.ln1.bias']" in msg


@pytest.mark.parametrize("change, fragment", [
    (lambda sd: sd.update({"head.weight": sd["head.weight"] + 1.0}), "weight_tying=False"),
    (lambda sd: sd.update({"blocks.0.pmem.pmem.M_k1": sd["blocks.0.pmem.pmem.M_k0"],
                           "blocks.0.pmem.pmem.M_v1": sd["blocks.0.pmem.pmem.M_v0"]}),
     "pmem_count > 1"),
    (lambda sd: sd.update({"blocks.0.attn.k_featurizer.conv.weight": np.zeros((D, D, 2))}),
     "kernel-1 linearconv"),
    (lambda sd: sd.update({"blocks.0.pmem.pmem.M_v0": np.zeros((1, H, P + 1, E))}),
     "layers.0.ffn.mem_v: expected shape"),
    (lambda sd: sd.pop("emb.weight"), "no 'emb.weight'"),
])
def test_refuses_models_memcore_cannot_express(change, fragment):
    sd = synthetic_state_dict(np.random.default_rng(4))
    change(sd)
    with pytest.raises(ValueError, match="from_memory_mosaics") as err:
        from_memory_mosaics(sd)
    assert fragment in str(err.value)


def test_n_heads_must_agree():
    sd = synthetic_state_dict(np.random.default_rng(5))
    with pytest.raises(ValueError, match="n_heads=4 was given but .* has 3 entries"):
        from_memory_mosaics(sd, n_heads=4)
