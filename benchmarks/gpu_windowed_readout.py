"""Section 2 of the GPU benchmark: the windowed readout kernel against sliding-window attention
of the same span (see ``benchmarks/gpu.py``)."""

from __future__ import annotations

import math

import torch

from .gpu_timing import bench, fwd_bwd, rel_err, skip, table


def band_mask(T, span, device):
    i = torch.arange(T, device=device)
    return (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - span)


def attention_section(args):
    """Prints the table; returns the figures: the correctness check's error and one row per
    kernel, with speeds relative to the sliding-window baseline named in "reference"."""
    from memcore.kernels.triton.windowed_readout import windowed_readout

    Bt, T, H, E = args.attn_shape
    W = args.window
    dtype = torch.bfloat16
    print(f"\n2. B'MOJO attention (raw W={W} + fading W={W}) vs a sliding window of span 2W="
          f"{2 * W}; B={Bt} T={T} H={H} E={E} bf16 (milliseconds, medians)")
    g = torch.Generator(device="cuda").manual_seed(1)
    bthe = [torch.randn(Bt, T, H, E, generator=g, device="cuda").to(dtype).requires_grad_()
            for _ in range(5)]
    q, k, v, fk, fv = bthe
    # the baselines' layout [B, H, T, E], made once so no transpose is timed
    bhte = [t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v)]
    Q, K, V = bhte
    F = torch.nn.functional
    mask = band_mask(T, 2 * W, "cuda")
    C, M = args.chunk, args.capacity
    S = triton_cdiv(T, C)
    sk = torch.randn(Bt, H, S, M, E, generator=g, device="cuda").to(dtype).requires_grad_()
    sv = torch.randn(Bt, H, S, M, E, generator=g, device="cuda").to(dtype).requires_grad_()
    # snapshot s holds M positions from before its chunk (empty for the first)
    spos = (torch.arange(S, device="cuda")[:, None] * C - 1 - torch.arange(M, device="cuda")
            * max(C // M, 1))[None].expand(Bt, S, M).contiguous()
    spos = torch.where(spos >= 0, spos, -1)

    skipped = []
    cands = {
        "memcore raw+fading": (lambda: windowed_readout(q, k, v, W, fk, fv), bthe),
        f"memcore raw+fading+store (C={C}, M={M})": (
            lambda: windowed_readout(q, k, v, W, fk, fv, sk, sv, spos, C), bthe + [sk, sv]),
        "SDPA, band mask 2W": (
            lambda: F.scaled_dot_product_attention(Q, K, V, attn_mask=mask), bhte),
        "SDPA causal (flash), full T": (
            lambda: F.scaled_dot_product_attention(Q, K, V, is_causal=True), bhte),
    }
    try:
        from flash_attn import flash_attn_func

        cands[f"flash_attn window ({2 * W - 1}, 0)"] = (
            lambda: flash_attn_func(q, k, v, causal=True, window_size=(2 * W - 1, 0)), bthe[:3])
    except Exception as e:  # noqa: BLE001 - any import failure means no such baseline
        skip("flash_attn row", f"flash_attn not importable ({e!r})", skipped)
    # correctness gate: the last rows against a dense two-source softmax
    with torch.no_grad():
        tail = slice(max(T - 256, 0), T)
        err = rel_err(windowed_readout(q, k, v, W, fk, fv)[:, tail],
                      _two_source_reference(q, k, v, fk, fv, W, tail))
    print(f"  check: memcore vs a dense two-source softmax on the last rows, rel err {err:.2e}")
    rows, base = [], {}
    for name, (fn, inputs) in cands.items():
        try:
            with torch.no_grad():
                t_f = bench(fn)
            t_fb = bench(fwd_bwd(fn, inputs))
        except Exception as e:  # noqa: BLE001 - report and go on with the next row
            skip(name, repr(e), skipped)
            continue
        base[name] = (t_f, t_fb)
        rows.append([name, t_f, t_fb])
    ref = next((n for n in base if n.startswith("flash_attn")), "SDPA, band mask 2W")
    if ref in base and "memcore raw+fading" in base:
        for row in rows:
            row += [base[ref][0] / row[1], base[ref][1] / row[2]]
        print(table(["kernel", "fwd ms", "fwd+bwd ms", f"fwd speed vs {ref}",
                     "fwd+bwd speed vs it"], rows))
    else:
        ref = None
        print(table(["kernel", "fwd ms", "fwd+bwd ms"], rows))
    print("  goal: memcore raw+fading >= 0.8x the sliding-window baseline")
    keys = ["kernel", "fwd_ms", "fwd_bwd_ms", "fwd_speed_vs_reference",
            "fwd_bwd_speed_vs_reference"]
    return dict(shape=dict(B=Bt, T=T, H=H, E=E, W=W, chunk=C, capacity=M), dtype="bfloat16",
                check_rel_err=err, reference=ref,
                rows=[dict(zip(keys, row, strict=False)) for row in rows], skipped=skipped)


def triton_cdiv(a, b):
    return -(-a // b)


def _two_source_reference(q, k, v, fk, fv, W, rows):
    """Dense float32 softmax over raw keys (t-W, t] and fading keys (t-2W, t-W] for some rows."""
    T, E = q.shape[1], q.shape[3]
    i = torch.arange(T, device=q.device)[rows]
    j = torch.arange(T, device=q.device)
    raw = (j[None, :] <= i[:, None]) & (j[None, :] > i[:, None] - W)
    fad = (j[None, :] <= i[:, None] - W) & (j[None, :] > i[:, None] - 2 * W)
    qf = q[:, rows].float().transpose(1, 2)
    s_raw = qf @ k.float().transpose(1, 2).transpose(-1, -2) / math.sqrt(E)
    s_fad = qf @ fk.float().transpose(1, 2).transpose(-1, -2) / math.sqrt(E)
    s = torch.cat([s_raw.masked_fill(~raw, float("-inf")),
                   s_fad.masked_fill(~fad, float("-inf"))], -1)
    p = torch.softmax(s, -1)
    vals = torch.cat([v.float().transpose(1, 2), fv.float().transpose(1, 2)], 2)
    return (p @ vals).transpose(1, 2)
