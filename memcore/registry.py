"""Backend registry. Backends are found through the ``memcore.backends`` entry-point group, so
a third party can add one from its own distribution; ``register_backend`` adds one at run time.

A backend is a callable ``factory(spec, params=None, seed=0, **options)`` that returns the
backend's native realized object.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points

GROUP = "memcore.backends"
_RUNTIME: dict[str, Callable] = {}


def _entry_points() -> dict:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def available_backends() -> list[str]:
    """Names of every registered backend (whether or not its framework is installed)."""
    return sorted(set(_entry_points()) | set(_RUNTIME))


def register_backend(name: str, factory: Callable) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_backend: name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"register_backend: factory must be callable, got {factory!r}")
    _RUNTIME[name] = factory


def get_backend(name: str) -> Callable:
    if name in _RUNTIME:
        return _RUNTIME[name]
    eps = _entry_points()
    if name not in eps:
        raise ValueError(f"backend must be one of {available_backends()}, got {name!r}")
    try:
        return eps[name].load()
    except ImportError as err:
        raise ImportError(f"backend {name!r} is registered but cannot be imported ({err}); "
                          f"install its extra: pip install 'memcore[{name}]'") from err
