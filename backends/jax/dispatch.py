"""Where a JAX-backend hot path runs: the Pallas kernels or the plain JAX code.

The decision is ``memcore.kernels.pallas.api.kernels_enabled`` on the call's array (GPU arrays
use the kernels; ``MEMCORE_KERNELS=pallas|jax`` forces either; forced onto a CPU the kernels
run in the Pallas interpreter). Inside jit the array is a tracer, so the decision follows the
default backend. ``realize`` takes it once per call, outside its jitted core, and passes it as
a static argument that ``decided`` installs while the core is traced: a compiled core is then
never reused for the other path.

Routed here: the selective scan of the Mamba block (mamba layers and the fading block of
bmojo_f and bmojo) and the windowed readout with a window (raw, fading and store sources in
one kernel). Full causal attention (window None) and the one-token step forms stay on JAX.
The kernel modules import Pallas, so they are imported only once the kernels are chosen.
"""

from __future__ import annotations

import contextlib
import threading

import jax.numpy as jnp

_decision = threading.local()


def use_kernels(x) -> bool:
    """Whether the call on ``x`` runs the Pallas kernels."""
    flag = getattr(_decision, "flag", None)
    if flag is not None:
        return flag
    from memcore.kernels.pallas.api import kernels_enabled

    return kernels_enabled(x)


@contextlib.contextmanager
def decided(flag: bool):
    """Trace the body with ``use_kernels`` answering ``flag``, a decision taken by the caller."""
    if not isinstance(flag, bool):
        raise TypeError(f"decided: flag must be a bool, got {flag!r}")
    before = getattr(_decision, "flag", None)
    _decision.flag = flag
    try:
        yield
    finally:
        _decision.flag = before


def _interpret(x) -> bool:
    from memcore.kernels.pallas.api import _on_gpu

    return not _on_gpu(x)


def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0):
    """The Pallas selective scan with the arguments and results of
    ``memcore.backends.jax.scan.selective_scan_core``: (y [Bt, Dc, T], h_T [Bt, Dc, N])."""
    from memcore.kernels.pallas.selective_scan import selective_scan as kernel

    return kernel(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                  delta_softplus=delta_softplus, initial_state=h0, return_final_state=True,
                  interpret=_interpret(u))


def windowed_readout(q, pos, window: int, raw, fading=None, snap=None, chunk=None):
    """The windowed layers' readout (raw window, fading window, store) on the B'MOJO kernel.

    q [B, H, T, E] at positions pos .. (pos may be traced); raw = (k, v) [B, H, W + T, E] from
    position pos - W; fading = (k, v) [B, H, 2W + T, E] from pos - 2W; snap: the store
    snapshots of the chunks the call touches (k, v [B, H, nc, M, E], pos [B, nc, M]), snapshot
    s serving chunk pos // chunk + s. Returns o [B, H, T, E] in q's dtype.
    """
    from memcore.kernels.pallas.bmojo_attention import bmojo_attention as kernel

    back = window if fading is None else 2 * window
    k, v = raw
    if fading is not None:
        # One key layout for both sources: the raw cache is front-padded to the fading one's
        # length; those rows lie beyond the raw window, so no raw query ever sees them.
        pad = [(0, 0), (0, 0), (window, 0), (0, 0)]
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    # ring slots before position 0 hold no key yet
    start = jnp.maximum(back - jnp.asarray(pos, jnp.int32), 0)
    seqs = [k, v] + ([] if fading is None else list(fading))
    k, v, *fk = (jnp.swapaxes(a, 1, 2) for a in seqs)
    fk, fv = fk if fk else (None, None)
    store = () if snap is None else (snap["k"], snap["v"], snap["pos"], chunk)
    o = kernel(jnp.swapaxes(q, 1, 2), k, v, window, fk, fv, *store,
               pos=jnp.asarray(pos, jnp.int32), key_start=start, interpret=_interpret(q))
    return jnp.swapaxes(o, 1, 2)
