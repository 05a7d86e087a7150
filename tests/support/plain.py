"""Plain, loop-by-loop numpy versions of DESIGN's primitives and realizations, written from the
text of DESIGN.md without the reference's code: the reductions tests compare against them."""

from __future__ import annotations

import math

import numpy as np


def softplus(x):
    return np.logaddexp(0.0, x)


def silu(x):
    return x / (1.0 + np.exp(-x))


def l2n(v):
    return v / max(np.linalg.norm(v), 1e-12)


def softmax_readout(scores, values):
    """scores [S], values [S, E] -> [E]; zero when S = 0."""
    if len(scores) == 0:
        return np.zeros(values.shape[-1])
    w = np.exp(np.asarray(scores) - np.max(scores))
    return (w / w.sum()) @ np.asarray(values)


def rope_vec(v, p, base=10000.0):
    """Rotate-half RoPE of one head vector v [E] at position p; an odd last coordinate stays."""
    E = len(v)
    half = E // 2
    out = v.copy()
    for i in range(half):
        theta = p * base ** (-2.0 * i / (2 * half))
        c, s = math.cos(theta), math.sin(theta)
        out[i] = v[i] * c - v[i + half] * s
        out[i + half] = v[i + half] * c + v[i] * s
    return out


def attention(x, p, H, window=None, rope=True):
    """Causal softmax attention (sliding when ``window``), x [B, T, D] -> [B, T, D]."""
    B, T, D = x.shape
    E = D // H
    q = x @ p["q_proj.weight"].T
    k = x @ p["k_proj.weight"].T
    v = x @ p["v_proj.weight"].T
    o = np.zeros_like(x)
    for b in range(B):
        for h in range(H):
            sl = slice(h * E, (h + 1) * E)
            for t in range(T):
                qt = rope_vec(q[b, t, sl], t) if rope else q[b, t, sl]
                js = [j for j in range(t + 1) if window is None or j > t - window]
                scores = []
                for j in js:
                    kj = rope_vec(k[b, j, sl], j) if rope else k[b, j, sl]
                    scores.append(qt @ kj / math.sqrt(E))
                o[b, t, sl] = softmax_readout(scores, v[b, js, sl])
    return o @ p["o_proj.weight"].T


def selective_scan(u, delta, A, Bm, Cm, D=None, z=None, delta_bias=None, delta_softplus=False,
                   h0=None):
    """DESIGN 2.1 one time step at a time. u, delta, z [Bt, Dc, T]; A [Dc, N];
    B, C [Bt, N, T] or [Bt, G, N, T]. Returns (y [Bt, Dc, T], h_T [Bt, Dc, N])."""
    Bt, Dc, T = u.shape
    N = A.shape[1]
    y = np.zeros((Bt, Dc, T))
    hT = np.zeros((Bt, Dc, N))
    for b in range(Bt):
        for d in range(Dc):
            h = np.zeros(N) if h0 is None else h0[b, d].copy()
            for t in range(T):
                if Bm.ndim == 4:
                    G = Bm.shape[1]
                    g = d // (Dc // G)  # channels are split into G consecutive groups
                    bt, ct = Bm[b, g, :, t], Cm[b, g, :, t]
                else:
                    bt, ct = Bm[b, :, t], Cm[b, :, t]
                dt = delta[b, d, t] + (0.0 if delta_bias is None else delta_bias[d])
                if delta_softplus:
                    dt = softplus(dt)
                h = np.exp(dt * A[d]) * h + dt * u[b, d, t] * bt
                out = h @ ct + (0.0 if D is None else D[d] * u[b, d, t])
                if z is not None:
                    out = out * silu(z[b, d, t])
                y[b, d, t] = out
            hT[b, d] = h
    return y, hT


def mamba_block(spec, p, x, conv0=None, h0=None):
    """mamba-ssm's Mamba block, one token at a time. x [B, T, D] -> y [B, T, D]."""
    B, T, D = x.shape
    Di, K, N, R = spec.d_inner, spec.d_conv, spec.d_state, spec.dt_rank_value
    A = -np.exp(p["A_log"])
    y = np.zeros((B, T, D))
    for b in range(B):
        hist = [np.zeros(Di) for _ in range(K - 1)] if conv0 is None else [
            conv0[b, :, i].copy() for i in range(K - 1)]
        h = np.zeros((Di, N)) if h0 is None else h0[b].copy()
        for t in range(T):
            xz = p["in_proj.weight"] @ x[b, t]
            xi, z = xz[:Di], xz[Di:]
            hist.append(xi)
            win = hist[len(hist) - K:]  # the K most recent inputs, oldest first
            conv = p["conv1d.bias"].copy()
            for j in range(K):
                conv = conv + p["conv1d.weight"][:, 0, j] * win[j]
            xc = silu(conv)
            dbl = p["x_proj.weight"] @ xc
            dt = softplus(p["dt_proj.weight"] @ dbl[:R] + p["dt_proj.bias"])
            Bt, Ct = dbl[R:R + N], dbl[R + N:R + 2 * N]
            h = np.exp(dt[:, None] * A) * h + (dt * xc)[:, None] * Bt[None, :]
            out = (h @ Ct + p["D"] * xc) * silu(z)
            y[b, t] = p["out_proj.weight"] @ out
    return y


def leaky(ktilde, lam, k0=None):
    """kbar_t = ktilde_t + lam * kbar_{t-1}, by a loop over t. ktilde [T, E]."""
    out = np.zeros_like(ktilde)
    acc = np.zeros(ktilde.shape[1]) if k0 is None else k0.copy()
    for t in range(ktilde.shape[0]):
        acc = ktilde[t] + lam * acc
        out[t] = acc
    return out


def mosaic(spec, p, x):
    """DESIGN 2.5: contextual memory unit. x [B, T, D] -> [B, T, D]."""
    B, T, D = x.shape
    H, E, M = spec.n_heads, spec.head_dim, spec.capacity
    y = np.zeros((B, T, D))
    for b in range(B):
        kt_all = x[b] @ p["k_proj.weight"].T
        u_all = x[b] @ p["v_proj.weight"].T
        for h in range(H):
            sl = slice(h * E, (h + 1) * E)
            lam = math.exp(-10.0 * abs(p["leak"][h]))
            kbar = leaky(kt_all[:, sl], lam)
            a_phi = math.exp(min(10.0 * p["k_scale"][h], 5.0))
            a_psi = math.exp(10.0 * p["v_scale"][h])
            c = p["v_mix"][h]
            keys = [a_phi * l2n(kbar[t]) for t in range(T)]
            # v_j needs x_{j+1}; only j <= T - 2 is ever read inside the sequence.
            vals = [a_psi * l2n((1 - c) * u_all[j + 1, sl] + c * u_all[j, sl])
                    for j in range(T - 1)]
            for t in range(1, T):
                js = [j for j in range(t) if M is None or j >= t - M]
                scores = [keys[t] @ keys[j] for j in js]  # no 1/sqrt(E)
                y[b, t, sl] = softmax_readout(scores, np.array([vals[j] for j in js]))
    return y @ p["o_proj.weight"].T


def persistent(spec, p, x):
    """DESIGN 2.6: persistent memory unit. x [B, T, D] -> [B, T, D]."""
    B, T, D = x.shape
    H, E = spec.n_heads, spec.head_dim
    y = np.zeros((B, T, D))
    for b in range(B):
        kt_all = x[b] @ p["k_proj.weight"].T
        for h in range(H):
            sl = slice(h * E, (h + 1) * E)
            kbar = leaky(kt_all[:, sl], math.exp(-10.0 * abs(p["leak"][h])))
            alpha = math.exp(min(10.0 * p["k_scale"][h], 5.0))
            for t in range(T):
                k = alpha ** 2 * l2n(kbar[t])
                w = softmax_readout(p["mem_k"][h] @ k, p["mem_v"][h])
                y[b, t, sl] = w * math.exp(10.0 * p["out_scale"][h])
    return y @ p["o_proj.weight"].T


def windowed_layer(spec, p, x, stores=None):
    """DESIGN 2.3 for transformer, bmojo_f and bmojo, one query at a time. ``stores[c]`` lists
    the positions in the store after chunk c (bmojo only). x [B, T, D] -> [B, T, D]."""
    B, T, D = x.shape
    H, E, W = spec.n_heads, spec.head_dim, spec.window
    rope = spec.positions == "rope"
    fading = getattr(spec, "fading", False)
    C = spec.store.chunk if stores is not None else None
    y = np.zeros((B, T, D))
    for b in range(B):
        q, k, v = (x[b] @ p[f"{n}_proj.weight"].T for n in "qkv")
        if fading:
            sub = {n[len("fading."):]: a for n, a in p.items() if n.startswith("fading.")}
            s = mamba_block(spec.fading_block, sub, x[b:b + 1])[0]
            kname = "k_proj.weight" if spec.tie_fading else "k_fading_proj.weight"
            vname = "v_proj.weight" if spec.tie_fading else "v_fading_proj.weight"
            fk, fv = s @ p[kname].T, s @ p[vname].T
        for h in range(H):
            sl = slice(h * E, (h + 1) * E)

            def rot(vec, j):
                return rope_vec(vec, j) if rope else vec

            for t in range(T):
                keys, vals = [], []
                for j in range(t + 1):
                    if W is None or j > t - W:
                        keys.append(rot(k[j, sl], j))
                        vals.append(v[j, sl])
                if fading:
                    for j in range(max(0, t - 2 * W + 1), t - W + 1):
                        keys.append(rot(fk[j, sl], j))
                        vals.append(fv[j, sl])
                if stores is not None and t // C >= 1:
                    for j in stores[b][t // C - 1]:
                        if j <= t - W:
                            keys.append(rot(k[j, sl], j))
                            vals.append(v[j, sl])
                qt = rot(q[t, sl], t)
                y[b, t, sl] = softmax_readout([qt @ kk / math.sqrt(E) for kk in keys],
                                              np.array(vals))
    return y @ p["o_proj.weight"].T
