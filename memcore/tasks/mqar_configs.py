"""The configurations MQAR trains: ``MQARConfig``, the models (``model_spec``), the quick
configuration, Zoology's Figure-2 grid, the memory sweep, what each mode plans, and the
departures of a configuration from Zoology's protocol (``deviations``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from itertools import product

import numpy as np

from memcore import spec as S
from memcore.tasks import memory, mqar, protocol, runs

MODELS = ("bmojo", "mamba", "transformer", "transformer_window", "bmojo_f", "mosaic", "jamba",
          "mamba_swa")
MODES = ("quick", "full", "memory")


@dataclass(frozen=True)
class MQARConfig:
    """One MQAR training run: the data (Zoology's generator), the 2-layer model and its training
    (``steps`` 0: ``epochs`` passes over ``train_examples``). The defaults are Zoology's
    Figure-2 values where Zoology has one."""

    vocab_size: int = 8192
    seq_len: int = 64
    num_kv_pairs: int = 4
    d_model: int = 64
    n_heads: int = 1
    d_state: int = 16  # every SSM: mamba, the hybrids' Mamba layers, the B'MOJO fading blocks
    window: int = 8  # bmojo's and bmojo_f's raw window; also transformer_window's
    chunk: int = 16  # bmojo's store: chunk length, tokens kept per chunk, capacity
    select: int = 8
    capacity: int = 32
    pattern: str = "MA"  # the hybrids' layers, one per letter: M Mamba, A attention
    hybrid_window: int = 0  # mamba_swa's attention window (0: matched to bmojo's memory)
    mosaic_capacity: int = 0  # pairs the associative memory keeps (0: all)
    short_conv: int = 0  # width of the causal depthwise conv before each mixer (0: none)
    batch_size: int = 512
    steps: int = 0  # 0: epochs * train_examples / batch_size
    epochs: int = 64
    train_examples: int = 100_000  # 0: fresh samples every step
    val_examples: int = 1_000
    test_examples: int = 3_000
    lr: float = 1e-3  # this run's; the protocol's sweep sets it
    weight_decay: float = 0.1
    aux_weight: float = 0.1
    early_stop: float = 0.99
    eval_every: int = 0
    random_non_queries: bool = False

    def __post_init__(self):
        mqar.check_config(self.vocab_size, self.seq_len, self.num_kv_pairs)
        runs.check_counts("mqar", self, ("d_model", "n_heads", "d_state", "window", "chunk",
                                         "batch_size", "val_examples", "test_examples"))
        for name in ("select", "capacity", "hybrid_window", "mosaic_capacity", "steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"mqar: {name} must be an int >= 0, got {v!r}")
        if not isinstance(self.pattern, str) or not self.pattern or \
                set(self.pattern) - {"M", "A"}:
            raise ValueError(f"mqar: pattern must be letters M (Mamba) and A (attention), "
                             f"got {self.pattern!r}")

    @property
    def total_steps(self) -> int:
        if self.steps:
            return self.steps
        if not self.train_examples:
            raise ValueError("MQARConfig: with fresh samples (train_examples=0) give steps")
        return self.epochs * -(-self.train_examples // self.batch_size)


ZOOLOGY = MQARConfig()
ZOOLOGY_BATCH = {64: 512, 128: 512, 256: 256, 512: 128}
# Zoology's Figure 2 (iclr24_zoology_figure2/configs.py): (L, kv, batch), widths and LRs.
FULL_GRID = [(64, 4, 512), (128, 8, 512), (256, 16, 256), (512, 64, 128)]
FULL_WIDTHS = (64, 128, 256, 512)
FULL_LRS = tuple(float(x) for x in np.logspace(-4, -2, 4))
SEEDS = (0, 1, 2)

# L=64, kv=4 (a point of Zoology's grid): the keys sit at positions 0..7 and the median query
# slot offset is about 4, so most queries come 9 or more tokens after their pair; a raw window
# of 4 misses them (recall then needs the store or the fading memory). The store's first chunk
# is exactly the 8 context tokens. The models that recall here pass 0.95 within 150 steps of
# batch 32 at their best learning rate, so 250 steps let every model run three learning rates
# within the quick job's time. At this length full attention's KV cache is about B'MOJO's
# memory; the memory sweep (L 128 and 256) shows where they part.
QUICK = MQARConfig(vocab_size=512, seq_len=64, num_kv_pairs=4, d_model=64, n_heads=1,
                   d_state=16, window=4, chunk=8, select=8, capacity=16, short_conv=3,
                   batch_size=32, steps=250, train_examples=0, val_examples=256,
                   test_examples=256, eval_every=50)
QUICK_LRS = (1e-3, 3e-3, 1e-2)
QUICK_SEEDS = (0,)

# The memory sweep: (L, kv) points of Zoology's grid and the configuration around the swept
# values. A chunk of 16 keeps 8 tokens: the 2 kv context tokens fill kv / 8 chunks, so a store
# of kv slots can hold one token per pair and the capacity sweep shows where recall saturates.
MEMORY_GRID = ((128, 8), (256, 16))
MEMORY = replace(QUICK, chunk=16, select=8, steps=800, test_examples=512)


def memory_values(kv: int) -> dict:
    """Each family's swept fields and their default values at ``kv`` pairs (capacity 0 of
    mosaic: unbounded); every other field stays the memory configuration's."""
    return {"bmojo": {"window": (4, 16), "capacity": (kv // 2, kv, 2 * kv)},
            "bmojo_f": {"window": (4, 16)},
            "transformer_window": {"window": (8, 16, 32, 64)},
            "mamba_swa": {"hybrid_window": (16, 32, 64)},
            "mamba": {"d_state": (8, 16, 32)},
            "mosaic": {"mosaic_capacity": (kv, 4 * kv, 0)},
            "transformer": {}, "jamba": {}}


# A command-line list replaces the values of every family that sweeps one of these fields.
SWEPT_BY_FLAG = {"window": ("window", "hybrid_window"),
                 "capacity": ("capacity", "mosaic_capacity"), "d_state": ("d_state",)}


def matched_window(cfg: MQARConfig) -> int:
    """mamba_swa's attention window with at most bmojo's memory at ``cfg.seq_len`` (the
    B'MOJO paper's hybrid baseline at matched memory): the largest such window, at least 1."""
    target = memory.memory_bytes(model_spec("bmojo", cfg), cfg.seq_len)
    one = memory.memory_bytes(_hybrid(cfg, 1), cfg.seq_len)
    per_token = cfg.pattern.count("A") * 2 * cfg.d_model * memory.FLOAT_BYTES
    if not per_token:
        return 1
    return int(min(cfg.seq_len, max(1, 1 + (target - one) // per_token)))


def _hybrid(cfg: MQARConfig, window: int | None):
    return replace(S.jamba(cfg.d_model, cfg.n_heads, pattern=cfg.pattern,
                           n_layers=len(cfg.pattern), vocab_size=cfg.vocab_size,
                           d_state=cfg.d_state, window=window, ffn=None),
                   short_conv=cfg.short_conv)


def model_spec(name: str, cfg: MQARConfig):
    """The MLP-free model spec for ``name``: 2 layers, or one per letter of ``cfg.pattern``
    for the hybrids (jamba: Mamba + full attention; mamba_swa: Mamba + sliding-window
    attention)."""
    d, h, V = cfg.d_model, cfg.n_heads, cfg.vocab_size
    if name == "bmojo":
        layer = S.bmojo(d, h, window=cfg.window, chunk=cfg.chunk, select=cfg.select,
                        capacity=cfg.capacity, d_state=cfg.d_state)
    elif name == "bmojo_f":
        layer = S.bmojo_f(d, h, window=cfg.window, d_state=cfg.d_state)
    elif name == "mamba":
        layer = S.mamba(d, d_state=cfg.d_state)
    elif name == "transformer":
        layer = S.transformer(d, h)
    elif name == "transformer_window":
        layer = S.transformer(d, h, window=cfg.window)
    elif name == "mosaic":
        layer = S.mosaic(d, h, capacity=cfg.mosaic_capacity or None)
    elif name == "jamba":
        return _hybrid(cfg, None)
    elif name == "mamba_swa":
        return _hybrid(cfg, cfg.hybrid_window or matched_window(cfg))
    else:
        raise ValueError(f"unknown model {name!r}; choose among {list(MODELS)}")
    return S.model([layer, layer], V, ffn=None, short_conv=cfg.short_conv)


def check_models(names) -> list:
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"--models: unknown model(s) {unknown}; choose among {list(MODELS)}")
    return list(names)


def plan(models, mode: str = "quick", overrides: dict | None = None, lrs=None, seeds=None,
         swept: dict | None = None) -> tuple[list, protocol.Sweep, MQARConfig]:
    """What a mode trains: ([(tag, model, config, info)], the sweep, the base configuration).
    ``overrides`` replace configuration fields (None: not given); ``swept`` (memory mode)
    replaces swept values, by ``SWEPT_BY_FLAG`` flag."""
    if mode not in MODES:
        raise ValueError(f"--sweep / mode must be one of {list(MODES)}, got {mode!r}")
    models = check_models(models)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - {f.name for f in fields(MQARConfig)})
    if unknown:
        raise ValueError(f"mqar: unknown configuration fields {unknown}")
    swept = {k: tuple(v) for k, v in (swept or {}).items() if v is not None}
    if swept and mode != "memory":
        raise ValueError(f"mqar: several values of {sorted(swept)} only with --sweep memory")
    variants = []
    if mode == "quick":
        cfg = replace(QUICK, **overrides)
        if "steps" in overrides and "eval_every" not in overrides:
            cfg = replace(cfg, eval_every=min(QUICK.eval_every, cfg.steps))
        variants = [(name, name, cfg, {}) for name in models]
        sweep = protocol.Sweep(lrs or QUICK_LRS, seeds or QUICK_SEEDS)
    elif mode == "full":
        cfg = None
        for (L, kv, batch), d, name in product(FULL_GRID, FULL_WIDTHS, models):
            c = replace(MQARConfig(), seq_len=L, num_kv_pairs=kv, d_model=d, batch_size=batch,
                        window=max(8, L // 16), chunk=16, select=8, capacity=2 * kv,
                        eval_every=-(-100_000 // batch))  # a store for every context token
            c = replace(c, **overrides)
            cfg = cfg or c
            tag = f"{name}-L{c.seq_len}-d{c.d_model}"
            if tag not in {v[0] for v in variants}:  # an override may collapse the grid
                variants.append((tag, name, c, {"grid": f"L{c.seq_len}-kv{c.num_kv_pairs}",
                                                "family": name,
                                                "values": {"d_model": c.d_model}}))
        sweep = protocol.Sweep(lrs or FULL_LRS, seeds or SEEDS)
    else:
        grid = MEMORY_GRID
        if "seq_len" in overrides or "num_kv_pairs" in overrides:
            grid = ((overrides.get("seq_len", MEMORY.seq_len),
                     overrides.get("num_kv_pairs", MEMORY.num_kv_pairs)),)
        rest = {k: v for k, v in overrides.items() if k not in ("seq_len", "num_kv_pairs")}
        cfg = None
        for L, kv in grid:
            base = replace(replace(MEMORY, seq_len=L, num_kv_pairs=kv, capacity=kv), **rest)
            cfg = cfg or base
            values = memory_values(kv)
            for name in models:
                grid_values = {f: swept.get(next((k for k, fs in SWEPT_BY_FLAG.items()
                                                  if f in fs), f), vs)
                               for f, vs in values[name].items()}
                for combo in product(*grid_values.values()):
                    point = dict(zip(grid_values, combo, strict=True))
                    tag = "-".join([name, f"L{L}"] + [f"{k}{v}" for k, v in point.items()])
                    variants.append((tag, name, replace(base, **point),
                                     {"grid": f"L{L}-kv{kv}", "family": name, "values": point}))
        sweep = protocol.Sweep(lrs or QUICK_LRS, seeds or SEEDS)
    return variants, sweep, cfg


def deviations(cfg: MQARConfig, sweep: protocol.Sweep, models, mode: str) -> list[str]:
    """Every departure of this run from Zoology's protocol (Figure 2: arXiv 2312.04927,
    HazyResearch/zoology), from its configuration."""
    z, out = ZOOLOGY, []
    V, L, kv = cfg.vocab_size, cfg.seq_len, cfg.num_kv_pairs
    if V != z.vocab_size:
        out.append(f"vocabulary {V} instead of {z.vocab_size} (keys [1, {V // 2}), values "
                   f"[{V // 2}, {V}))")
    if mode != "full":
        out.append(f"one point (L, kv, d_model) = ({L}, {kv}, {cfg.d_model}) per table instead "
                   f"of the grid L 64..512 x d_model 64..512")
    if not cfg.train_examples:
        out.append(f"fresh samples every step: {cfg.total_steps} steps of batch "
                   f"{cfg.batch_size} ({cfg.total_steps * cfg.batch_size:,} sequences) instead "
                   f"of {z.epochs} epochs over a fixed set of {z.train_examples:,}")
    elif cfg.train_examples != z.train_examples or cfg.steps or cfg.epochs != z.epochs:
        out.append(f"{cfg.total_steps} steps over {cfg.train_examples:,} fixed examples instead "
                   f"of {z.epochs} epochs over {z.train_examples:,}")
    if cfg.batch_size != ZOOLOGY_BATCH.get(L):
        out.append(f"batch {cfg.batch_size} instead of Zoology's "
                   f"{ZOOLOGY_BATCH.get(L, 'grid (L is off it)')}")
    if cfg.test_examples != z.test_examples:
        out.append(f"{cfg.test_examples} test examples instead of {z.test_examples}")
    if cfg.d_state != z.d_state:
        out.append(f"SSM state size d_state {cfg.d_state} instead of {z.d_state} (Mamba's "
                   f"default in Zoology)")
    if cfg.short_conv:
        out.append(f"a causal depthwise convolution of width {cfg.short_conv} before every "
                   f"mixer of every model (the Based paper's short-convolution hybrids); none "
                   f"in Zoology's Figure 2")
    if cfg.n_heads != z.n_heads:
        out.append(f"{cfg.n_heads} attention heads instead of 1")
    if cfg.random_non_queries:
        out.append("random filler tokens instead of 0 (Figure 2)")
    if cfg.early_stop != z.early_stop:
        out.append(f"early stop above {cfg.early_stop} instead of 0.99")
    if set(sweep.lrs) != set(FULL_LRS):
        out.append(f"learning rates {list(sweep.lrs)} instead of Zoology's logspace(-4, -2, 4)")
    out += sweep.deviations()
    out += [f"early stop, checkpoint and learning rate chosen on {cfg.val_examples} validation "
            f"examples disjoint from the test set, checked every "
            f"{cfg.eval_every or cfg.total_steps} steps (Zoology stops on its test set after "
            f"each epoch and reports the best test accuracy over learning rates)",
            f"test accuracy reported as mean +- std over seeds {list(sweep.seeds)} at the "
            f"selected learning rate (Zoology: one run, seed 123)",
            "attention uses rotary positions (memcore's default) instead of learned absolute "
            "ones; no dropout (Zoology: 0.1 on embeddings and attention)",
            "gradient-norm clipping at 1.0; weight decay on matrices only; cosine decay per "
            "step (Zoology: no clipping, decay on every parameter, cosine per epoch)"]
    if "bmojo" in models and cfg.aux_weight:
        out.append(f"bmojo's innovation loss added with weight {cfg.aux_weight} (B'MOJO: not "
                   f"published)")
    return out
