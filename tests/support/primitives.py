"""The primitive functions of the reference and of the torch backend by name (each defined in
its tree's file of that primitive), for tests that compare one against the other."""

from __future__ import annotations

from types import SimpleNamespace

NAMES = {
    "selective_scan": ("selective_scan", "selective_state_update"),
    "leaky_average": ("leaky_average", "leaky_average_step"),
    "windowed_readout": ("windowed_readout", "windowed_readout_step", "windowed_readout_state"),
    "eidetic_store": ("store_top", "store_merge", "innovation_scores"),
    "associative_readout": ("associative_readout",),
    "persistent_readout": ("persistent_readout",),
}


def _collect(package: str) -> SimpleNamespace:
    import importlib

    fns = {}
    for primitive, names in NAMES.items():
        mod = importlib.import_module(f"{package}.{primitive}")
        fns.update({n: getattr(mod, n) for n in names})
    return SimpleNamespace(**fns)


REF = _collect("memcore.spec.reference")
TORCH = _collect("memcore.backends.torch")
