"""The affine pairs that the scan kernels combine: (a, b) stands for one step h -> a h + b.

``combine`` composes two steps for ``tl.associative_scan`` (a prefix scan gives every h_t in
closed form); ``suffix_scan`` runs the reverse-time recurrence of the backward kernels.
"""

import triton
import triton.language as tl


@triton.jit
def combine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2) as one step of h = a h + b
    return a1 * a2, a2 * b1 + b2


@triton.jit
def suffix_scan(a, b, AXIS: tl.constexpr):
    """g_t = b_t + a_t g_{t+1} along AXIS (and the products of a from t on), as a forward
    scan of the flipped tiles. Not ``associative_scan(reverse=True)``: with a combine that
    does not commute, its order of arguments on GPUs has not matched the interpreter's, whose
    reverse is exactly this flip, scan, flip (triton#4362, triton#8412)."""
    a_c, b_c = tl.associative_scan((tl.flip(a, AXIS), tl.flip(b, AXIS)), AXIS, combine)
    return tl.flip(a_c, AXIS), tl.flip(b_c, AXIS)


@triton.jit
def restart_combine(a1, b1, f1, a2, b2, f2):
    # As ``combine``, for steps that may restart the state (f > 0: a restart lies in the
    # span; its a is then unused). Selected, not multiplied by a zero decay, so a non-finite
    # state before a restart stays out of what follows it.
    restart = f2 > 0
    return (tl.where(restart, a2, a1 * a2), tl.where(restart, b2, a2 * b1 + b2),
            tl.maximum(f1, f2))


@triton.jit
def restart_suffix_scan(a, b, f, AXIS: tl.constexpr):
    """``suffix_scan`` where f_t > 0 cuts the recurrence after t (g_t = b_t there). Returns
    (products of a, g, whether a cut lies from t on)."""
    a_c, b_c, f_c = tl.associative_scan((tl.flip(a, AXIS), tl.flip(b, AXIS), tl.flip(f, AXIS)),
                                        AXIS, restart_combine)
    return tl.flip(a_c, AXIS), tl.flip(b_c, AXIS), tl.flip(f_c, AXIS)
