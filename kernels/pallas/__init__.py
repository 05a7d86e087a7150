"""memcore.kernels.pallas: Pallas kernels for the JAX backend, one file per primitive.

selective_scan.py         chunked selective scan (DESIGN 2.1), ending with ``selective_scan_ref``
selective_scan_bwd.py     its reverse-time backward kernel, ending with ``backward_ref``
windowed_readout.py       the windowed readout over raw, fading and store sources (2.3, 2.4),
                          ending with ``windowed_readout_ref``
windowed_readout_bwd.py   its backward kernels (raw and fading sources), with ``backward_ref``
device.py                 ``on_gpu``: compiled on a GPU, interpreted elsewhere

Kernels take and return arrays and import nothing else of memcore; the JAX backend's primitive
functions (``memcore.backends.jax.<primitive>``) choose them with ``implementation=``.
"""
