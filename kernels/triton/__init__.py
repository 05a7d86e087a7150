"""memcore.kernels.triton: fused Triton kernels for the torch backend.

One module per kernel, each ending with its plain torch ``*_ref``: ``selective_scan`` (DESIGN
2.1), ``leaky_average`` (2.2), ``bmojo_attention`` (2.3 and 2.4). ``api`` picks the kernels or
the torch path per call (``kernels_enabled``). Importing this package does not import triton;
the kernel modules do.
"""
