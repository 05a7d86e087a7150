"""The selective scan's streaming form (DESIGN 2.1): one token of mamba-ssm's
``selective_state_update``, functional or written into the state. ``selective_scan.py`` exports
it with the parallel form."""

from __future__ import annotations

import torch
from memcore.spec.validate import check_scan_args

from .numerics import acc_dtype, cast, silu, softplus


def _expand_streaming(M, Dc: int):
    if M.ndim == 2:
        return M[:, None]
    Bt, G, N = M.shape
    return M[:, :, None].expand(Bt, G, Dc // G, N).reshape(Bt, Dc, N)


def selective_state_update(state, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                           delta_softplus=False, *, inplace: bool = False):
    """One token: state [Bt, Dc, N]; u, delta, z [Bt, Dc]; B, C [Bt, N] or [Bt, G, N].
    Returns (y [Bt, Dc] in u's dtype, new state in the accumulation dtype). With ``inplace``
    (every argument already in the accumulation dtype, ``state`` a buffer of its own) the new
    state is written into ``state``."""
    if inplace:
        return _state_update_(state, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    check_scan_args(u, delta, A, B, C, D, z, delta_bias, state, streaming=True)
    acc = acc_dtype(u.dtype)
    u_, dt, A_, B_, C_, D_, z_, db, h = cast(acc, u, delta, A, B, C, D, z, delta_bias, state)
    Dc = u.shape[1]
    if db is not None:
        dt = dt + db[None, :]
    if delta_softplus:
        dt = softplus(dt)
    B_ = _expand_streaming(B_, Dc)
    C_ = _expand_streaming(C_, Dc)
    h = torch.exp(dt[:, :, None] * A_[None]) * h + (dt * u_)[:, :, None] * B_
    y = (h * C_).sum(2)
    if D_ is not None:
        y = y + D_[None, :] * u_
    if z_ is not None:
        y = y * silu(z_)
    return y.to(u.dtype), h


def _state_update_(h, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """``selective_state_update`` written into ``h`` [B, Dc, N]. Returns (y [B, Dc], h)."""
    dt = delta if delta_bias is None else delta + delta_bias[None, :]
    if delta_softplus:
        dt = softplus(dt)
    Dc = u.shape[1]
    h.mul_(torch.exp(dt[:, :, None] * A[None]))
    h.addcmul_((dt * u)[:, :, None], B[:, None, :] if B.ndim == 2 else _expand_streaming(B, Dc))
    Cm = C[:, :, None] if C.ndim == 2 else _expand_streaming(C, Dc)[..., None]
    y = torch.matmul(h, Cm)[:, :, 0] if C.ndim == 2 else torch.matmul(
        h[:, :, None], Cm)[:, :, 0, 0]
    if D is not None:
        y = y + D[None, :] * u
    if z is not None:
        y = y * silu(z)
    return y, h
