"""memcore.kernels.triton: fused Triton kernels for the torch backend.

One module per kernel, each ending with its plain torch ``*_ref``: ``selective_scan`` (DESIGN
2.1), ``leaky_average`` (2.2), ``bmojo_attention`` (2.3 and 2.4), ``associative_readout``
(2.5), ``innovation_select`` (2.4's selection and store); ``affine_scan`` holds the step
composition the two scans share. ``api`` picks the kernels or the
torch path per call (``kernels_enabled``) and, for the scan, the Triton kernel or mamba-ssm's
CUDA function (``scan_path``, ``mamba_ssm_scan``). ``aot`` compiles the kernels for a GPU target
on a machine without one. Importing this package does not import triton; the kernel modules do.
"""
