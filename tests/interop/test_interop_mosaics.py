"""from_memory_mosaics: the official Memory Mosaics model (facebookresearch/MemoryMosaics,
StackAssoMem, both versions) maps onto a memcore model, and options memcore cannot say are
refused by name. The oracle is a plain loop over the paper's equations, written on the official
parameter names and parameterisation; for the eft version (the one the official training
script trains) its key extractor is the recurrence of that version's CUDA scan, run in
float64."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest

import memcore
from memcore.interop import from_memory_mosaics

V, D, H, L, P = 13, 12, 3, 2, 7
E = D // H
# The options a state dict does not record, at the values memcore maps.
CONFIG = {"pre_ln": True, "v_shift": 1}
# model_args of a checkpoint of Library/train_memory_mosaics.py (its argparse options plus
# vocab_size), at these sizes and the script's defaults.
TRAIN_ARGS = {
    "seed": 1337, "out_dir": "results/debug", "backend": "nccl", "device": "cuda",
    "dtype": "float16", "compile": True, "eval_interval": 1000, "batch_size": 8,
    "learning_rate": 5e-3, "max_iters": 80000, "weight_decay": 0.1, "block_size": 512,
    "n_layer": L, "n_head": H, "n_embd": D, "v_shift": 1, "att_shift": 0, "pmem_size": P,
    "pmem_count": 1, "ic_dropout": 0.0, "hd_dropout": 0.0, "bias": False,
    "weight_tying": True, "pre_ln": True, "k_kernel_size": 1, "v_kernel_size": 2,
    "k_fe_type": "linearconv", "v_fe_type": "lowrlinearconv", "skip_tokens": 0,
    "v_leaky": False, "gradient_accumulation_steps": 1, "attn_only": False, "vocab_size": V,
}


def _key_extractor(rng, sd, unit, version):
    """One unit's key projection and decay parameters, under the version's names."""
    beta = rng.uniform(0.02, 0.5, H) * rng.choice([-1, 1], H)  # signs vary: decay uses |p|
    if version == "plain":
        sd[unit + "k_featurizer.conv.weight"] = rng.normal(0, D ** -0.5, (D, D, 1))
        sd[unit + "leaky_key_beta"] = beta
    else:  # LeakyAverageCuda: one parameter under two names (sep_w_on_t=False)
        sd[unit + "leaky_average.linear.weight"] = rng.normal(0, D ** -0.5, (D, D))
        sd[unit + "leaky_average.leaky_beta_w_under"] = beta
        sd[unit + "leaky_average.leaky_beta_u_under"] = beta.copy()


def synthetic_state_dict(rng, n_layers=L, attn_only=False, dtype=np.float64, version="plain"):
    """Names and shapes of StackAssoMem(vocab_size=V, n_head=H, n_embd=D, n_layer=n_layers,
    pmem_size=P) with its defaults (tied head, no bias, kernel-1 key conv), of the plain
    version (memory_mosaics) or the eft one (memory_mosaics_eft)."""
    emb = rng.normal(0, 1, (V, D))
    sd = {"emb.weight": emb, "head.weight": emb.copy(),
          "ln_out.weight": rng.uniform(0.5, 1.5, D)}
    for i in range(n_layers):
        b = f"blocks.{i}."
        sd[b + "ln1.weight"] = rng.uniform(0.5, 1.5, D)
        _key_extractor(rng, sd, b + "attn.", version)
        sd[b + "attn.v_featurizer.linear.weight"] = rng.normal(0, D ** -0.5, (D, D))
        sd[b + "attn.v_featurizer.coef"] = rng.uniform(0, 1, H)
        sd[b + "attn.c_proj.weight"] = rng.normal(0, D ** -0.5, (D, D))
        sd[b + "attn.kernel_beta"] = rng.uniform(0.0, 0.7, H)  # 0.7 exercises the cap at 5
        sd[b + "attn.value_beta"] = rng.uniform(-0.1, 0.05, H)
        if not attn_only:
            sd[b + "ln2.weight"] = rng.uniform(0.5, 1.5, D)
            _key_extractor(rng, sd, b + "pmem.", version)
            sd[b + "pmem.c_proj.weight"] = rng.normal(0, D ** -0.5, (D, D))
            sd[b + "pmem.kernel_beta"] = rng.uniform(0.0, 0.3, H)
            sd[b + "pmem.value_beta"] = rng.uniform(-0.1, 0.05, H)
            sd[b + "pmem.pmem.M_k0"] = rng.normal(0, E ** -0.5, (1, H, P, E))
            sd[b + "pmem.pmem.M_v0"] = rng.normal(0, E ** -0.5, (1, H, P, E))
    return {k: np.asarray(v, dtype=dtype) for k, v in sd.items()}


# --- the plain oracle, on the official names -------------------------------------------------

def _layer_norm(x, w):
    return (x - x.mean()) / math.sqrt(x.var() + 1e-5) * w


def _scan_channel(v, w, u):
    """The eft version's scan for one channel (its CUDA kernel's recurrence with the gate k = 0,
    decay w, current-token bonus u), in float64: running sums p and q kept divided by exp(o)."""
    p, q, o, y = 0.0, 0.0, -1e38, []
    for vt in v:
        no = max(o, u)
        a, b = math.exp(o - no), math.exp(u - no)
        y.append((a * p + b * vt) / (a * q + b))
        no = max(w + o, 0.0)
        a, b = math.exp(w + o - no), math.exp(-no)
        p, q, o = a * p + b * vt, a * q + b, no
    return y


def _leaky_keys(sd, pre, x, h):
    """Head h's normalised leaky-average keys: the plain version's dense average with its
    (1 - lambda) factor, or the eft version's scan per channel."""
    if pre + "leaky_key_beta" in sd:
        beta = 10.0 * abs(sd[pre + "leaky_key_beta"][h])
        w = sd[pre + "k_featurizer.conv.weight"][h * E:(h + 1) * E, :, 0]
        kt = [w @ xt for xt in x]
        kbars = [(1.0 - math.exp(-beta))
                 * sum(math.exp(-beta * (t - i)) * kt[i] for i in range(t + 1))
                 for t in range(len(x))]
    else:
        la = pre + "leaky_average."
        w = sd[la + "linear.weight"][h * E:(h + 1) * E]
        decay = -10.0 * abs(sd[la + "leaky_beta_w_under"][h])
        bonus = 10.0 * abs(sd[la + "leaky_beta_u_under"][h])
        kt = np.asarray([w @ xt for xt in x])  # [T, E]
        kbars = np.stack([_scan_channel(kt[:, c], decay, bonus) for c in range(E)], axis=1)
    return [kbar / np.linalg.norm(kbar) for kbar in kbars]


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
    spec, params = from_memory_mosaics(sd, n_heads=H, config=CONFIG)
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
    _, want = from_memory_mosaics(sd, config=CONFIG)
    wrapped = {"_orig_mod." + k: torch.from_numpy(v) for k, v in sd.items()}
    _, got = from_memory_mosaics(wrapped, config=CONFIG)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # The head is optional in the state dict (tied to the embedding).
    del sd["head.weight"]
    assert set(from_memory_mosaics(sd, config=CONFIG)[1]) == set(want)


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
    spec, params = from_memory_mosaics(sd, config=CONFIG)
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
        from_memory_mosaics(sd, config=CONFIG)
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
        from_memory_mosaics(sd, config=CONFIG)
    assert fragment in str(err.value)


def test_n_heads_must_agree():
    sd = synthetic_state_dict(np.random.default_rng(5))
    with pytest.raises(ValueError, match="n_heads=4 was given but .* has 3 entries"):
        from_memory_mosaics(sd, n_heads=4, config=CONFIG)


# --- the eft version and the training script's checkpoints -----------------------------------

@pytest.mark.parametrize("attn_only", [False, True])
def test_eft_model_matches_its_scan(attn_only):
    """memory_mosaics_eft (LeakyAverageCuda keys): the mapped model equals the float64 loop
    whose key extractor runs that version's scan recurrence."""
    rng = np.random.default_rng(6)
    sd = synthetic_state_dict(rng, attn_only=attn_only, version="eft")
    spec, params = from_memory_mosaics(sd, config=CONFIG)
    assert all(layer == memcore.spec.mosaic(D, H) for layer in spec.layers)
    assert spec.ffn == (None if attn_only else memcore.spec.persistent(D, H, P))
    tokens = rng.integers(0, V, size=(2, 9))
    logits, _ = memcore.realize(spec, backend="reference", params=params)(tokens)
    assert _rel(logits, official_forward(sd, tokens, attn_only=attn_only)) <= 1e-9


def test_scan_is_the_normalised_leaky_average():
    """The oracle's scan is the leaky sum over its weights (so the key norm removes the divisor
    and the mapping is exact); checked on one channel against the closed form."""
    v = np.random.default_rng(7).normal(size=11)
    lam = math.exp(-10 * 0.23)
    want = [sum(lam ** (t - i) * v[i] for i in range(t + 1))
            / sum(lam ** (t - i) for i in range(t + 1)) for t in range(len(v))]
    np.testing.assert_allclose(_scan_channel(v, -2.3, 2.3), want, rtol=1e-12)


def test_training_checkpoint_imports_with_its_model_args():
    """A checkpoint of Library/train_memory_mosaics.py: {"model": compiled model's state dict,
    "model_args": options, ...} imports as its state dict with its options."""
    torch = pytest.importorskip("torch", reason="checks torch tensors as input")
    sd = synthetic_state_dict(np.random.default_rng(8), version="eft")
    ckpt = {"model": {"_orig_mod." + k: torch.from_numpy(v) for k, v in sd.items()},
            "optimizer": {}, "model_args": dict(TRAIN_ARGS), "iter_num": 1000}
    spec, got = from_memory_mosaics(ckpt)
    want_spec, want = from_memory_mosaics(sd, config=argparse.Namespace(**TRAIN_ARGS))
    assert spec == want_spec and set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    with pytest.raises(ValueError, match="do not give config= as well"):
        from_memory_mosaics(ckpt, config=CONFIG)


def test_config_is_required():
    sd = synthetic_state_dict(np.random.default_rng(9))
    with pytest.raises(ValueError, match=r"config= is required.*pre_ln and v_shift"):
        from_memory_mosaics(sd)
    with pytest.raises(ValueError, match=r"config lacks \['pre_ln', 'v_shift'\]"):
        from_memory_mosaics(sd, config={"n_head": H})
    with pytest.raises(ValueError, match=r"config lacks \['v_shift'\]"):
        from_memory_mosaics(sd, config={"pre_ln": True})
    with pytest.raises(TypeError, match="config must be a mapping"):
        from_memory_mosaics(sd, config=[("pre_ln", True)])


# (option, value, versions it applies to, fragment of the error)
REFUSED = [
    ("pre_ln", False, ("plain", "eft"), "post-norm blocks"),
    ("pre_ln", "yes", ("plain", "eft"), "config['pre_ln']='yes' is not supported"),
    ("v_shift", 2, ("plain", "eft"), "looks exactly one ahead"),
    ("v_shift", 0, ("plain", "eft"), "config['v_shift']=0 is not supported"),
    ("v_shift", True, ("plain", "eft"), "config['v_shift']=True is not supported"),
    ("bias", True, ("plain", "eft"), "biases in the LayerNorm and Linear layers"),
    ("weight_tying", False, ("plain", "eft"), "an output head of its own"),
    ("pmem_count", 2, ("plain", "eft"), "several persistent-memory softmax readouts"),
    ("v_fe_type", "linearconv", ("plain", "eft"), "another value featurizer"),
    ("v_kernel_size", 3, ("plain", "eft"), "another value featurizer width"),
    ("k_fe_type", "lowrlinearconv", ("plain",), "another key featurizer"),
    ("k_kernel_size", 2, ("plain",), "a key convolution wider than one token"),
    ("n_head", 4, ("plain", "eft"), "config['n_head']=4 but the state dict's shapes give 3"),
    ("n_embd", 16, ("plain", "eft"), "config['n_embd']=16 but"),
    ("n_layer", 3, ("plain", "eft"), "config['n_layer']=3 but"),
    ("vocab_size", 50304, ("plain", "eft"), "config['vocab_size']=50304 but"),
    ("pmem_size", 2048, ("plain", "eft"), "config['pmem_size']=2048 but"),
    ("attn_only", True, ("plain", "eft"), "config['attn_only']=True but the state dict's shapes "
                                          "give False"),
]


@pytest.mark.parametrize("version", ["plain", "eft"])
@pytest.mark.parametrize("option, value, versions, fragment", REFUSED,
                         ids=[f"{o}={v!r}" for o, v, _, _ in REFUSED])
def test_unmappable_options_are_refused_by_name(option, value, versions, fragment, version):
    """Each option's other values build a model memcore cannot say (or contradict the shapes):
    refused with the option's name, also when the rest of the options are the training
    script's defaults."""
    sd = synthetic_state_dict(np.random.default_rng(10), version=version)
    config = dict(TRAIN_ARGS, **{option: value})
    if version not in versions:  # the eft version builds no key featurizer from these
        assert from_memory_mosaics(sd, config=config)[0].n_layers == L
        return
    with pytest.raises(ValueError, match="from_memory_mosaics") as err:
        from_memory_mosaics(sd, config=config)
    assert fragment in str(err.value)
    assert f"config[{option!r}]" in str(err.value)


def test_eft_decays_must_be_one_per_head_and_tied():
    sd = synthetic_state_dict(np.random.default_rng(11), version="eft")
    u = "blocks.1.pmem.leaky_average.leaky_beta_u_under"
    sd[u] = -sd[u]  # the same magnitude: the model takes |u|, so this is the same function
    from_memory_mosaics(sd, config=CONFIG)
    sd[u] = sd[u] * 1.5
    with pytest.raises(ValueError, match=r"leaky_beta_u_under'\] differs .* sep_w_on_t=True"):
        from_memory_mosaics(sd, config=CONFIG)
    sd = synthetic_state_dict(np.random.default_rng(11), version="eft")
    for name in ("w", "u"):
        sd[f"blocks.0.attn.leaky_average.leaky_beta_{name}_under"] = np.full(D, 0.1)
    with pytest.raises(ValueError, match=r"one decay per head, leaky_per_head=True"):
        from_memory_mosaics(sd, config=CONFIG)


def test_versions_do_not_mix():
    sd = synthetic_state_dict(np.random.default_rng(12), version="eft")
    sd["blocks.0.attn.k_featurizer.conv.weight"] = np.zeros((D, D, 1))
    with pytest.raises(ValueError, match=r"\(eft version\).*unknown \['blocks.0.attn.k_featurizer"):
        from_memory_mosaics(sd, config=CONFIG)
    del sd["blocks.0.attn.k_featurizer.conv.weight"]
    del sd["blocks.1.attn.leaky_average.leaky_beta_u_under"]
    with pytest.raises(ValueError, match=r"missing \['blocks.1.attn.leaky_average.leaky_beta_u"):
        from_memory_mosaics(sd, config=CONFIG)
