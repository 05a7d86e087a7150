"""The Array API reference: every primitive and realization in parallel and streaming form.

Runs unchanged on numpy, torch and JAX arrays (through ``array_api_compat``); it is the oracle
every backend is tested against and a portable fallback. One file per primitive of DESIGN
section 2 (``selective_scan``, ``leaky_average``, ``windowed_readout``, ``eidetic_store``,
``associative_readout``, ``persistent_readout``), the layers in ``layers/``, the model in
``model``.
"""

from .layers import check_state, forward, forward_aux, init_state, step, step_aux

__all__ = ["forward", "step", "forward_aux", "step_aux", "init_state", "check_state"]
