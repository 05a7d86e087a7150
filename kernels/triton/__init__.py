"""memcore.kernels.triton: fused Triton kernels for the torch backend.

One file per primitive that has a fused form, named after it, each ending with its plain torch
``*_ref``: ``selective_scan`` (DESIGN 2.1; ``selective_scan_mamba_ssm`` wraps mamba-ssm's CUDA
function as an optional path), ``leaky_average`` (2.2), ``windowed_readout`` (2.3 with the
store of 2.4 as a source), ``eidetic_store`` (2.4's per-chunk selection and store merge),
``associative_readout`` (2.5); the backward kernels of the scan and the windowed readout are in
``selective_scan_bwd`` and ``windowed_readout_bwd``. ``affine_scan`` holds the step composition
the two scans share, ``softmax_tiles`` the tile steps of the two softmax readouts,
``buffers`` the buffers, dtypes and tile sizes, ``aot`` compiles the kernels for a GPU target on
a machine without one. Kernels take and return tensors and import nothing else of memcore; the
choice of a kernel is made by the torch backend's primitive functions (``implementation=``).
Importing this package does not import triton; the kernel modules do.
"""
