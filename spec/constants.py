"""Numerical constants of the spec, the same in every tree (reference, torch, JAX, kernels)."""

NORM_EPS = 1e-5  # rms_norm and layer_norm: x / sqrt(mean + eps)
L2_EPS = 1e-12  # l2 normalisation floor, as torch.nn.functional.normalize
ROPE_BASE = 10000.0  # rotary embedding: inv_freq_i = ROPE_BASE ** (-2i / E)
