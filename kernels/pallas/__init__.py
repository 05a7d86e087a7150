"""memcore.kernels.pallas: Pallas kernels for the JAX backend.

selective_scan.py   chunked selective scan (DESIGN 2.1), with ``selective_scan_ref``
selective_scan_bwd.py   its reverse-time backward kernel, with ``backward_ref``
bmojo_attention.py  B'MOJO attention over raw, fading and store sources (2.3, 2.4), with
                    ``bmojo_attention_ref``
bmojo_attention_bwd.py  its backward kernels (raw and fading sources), with ``backward_ref``
api.py              entry points choosing the kernels (GPU arrays) or the JAX backend

The JAX backend calls the kernels from ``memcore.backends.jax.dispatch`` (the Mamba block's scan
and the windowed layers' readout) when ``api.kernels_enabled`` says so.
"""
