"""Where a torch-backend hot path runs: the Triton kernels or the plain torch code.

The decision is taken per call from the tensor by ``memcore.kernels.triton.api.kernels_enabled``
(CUDA tensors with triton installed use the kernels; ``MEMCORE_KERNELS=triton|torch`` forces
either). Kernel modules import triton, so they are imported only once the kernels are chosen:
a CPU-only install never imports triton. Routed here: the selective scan (mamba and fading
blocks) and the leaky average (mosaic and persistent key extractors). The windowed readout and
the mosaic readout stay on the torch path: their state layout does not map onto the kernels'
whole-sequence entry points without copies.
"""

from __future__ import annotations


def use_kernels(x) -> bool:
    """Whether the call on ``x`` runs the Triton kernels."""
    from memcore.kernels.triton.api import kernels_enabled

    return kernels_enabled(x)


def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                   return_final_state):
    """The Triton selective scan (same arguments and results as the torch one)."""
    from memcore.kernels.triton.selective_scan import selective_scan as kernel

    return kernel(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                  delta_softplus=delta_softplus, initial_state=initial_state,
                  return_final_state=return_final_state)


def leaky_average(k, log_decay, initial_state, return_final_state):
    """The Triton leaky average (same arguments and results as the torch one)."""
    from memcore.kernels.triton.leaky_average import leaky_average as kernel

    return kernel(k, log_decay, initial_state=initial_state,
                  return_final_state=return_final_state)
