"""Argument checks of the spec dataclasses (ints, bools, choices, divisibility). Every error
names the argument."""

from __future__ import annotations

import math
from typing import Any


def int_arg(owner: str, name: str, value: Any, *, minimum: int | None = None,
            maximum: int | None = None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    # bool is a subclass of int; `window=True` is a mistake, not a width of 1.
    if isinstance(value, bool) or not isinstance(value, int):
        expected = "an int or None" if allow_none else "an int"
        raise TypeError(f"{owner}: {name} must be {expected}, got {value!r} "
                        f"({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{owner}: {name} must be <= {maximum}, got {value}")


def positive_ints(owner: str, spec: Any, *names: str, allow_none: tuple = ()) -> None:
    """``int_arg(..., minimum=1)`` for each named field of ``spec``."""
    for name in names:
        int_arg(owner, name, getattr(spec, name), minimum=1, allow_none=name in allow_none)


def bool_arg(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be a bool, got {value!r}")


def choice_arg(owner: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {choices}, got {value!r}")


def divisible(owner: str, name: str, value: int, by_name: str, by: int) -> None:
    if by and value % by != 0:
        raise ValueError(f"{owner}: {by_name}={value} is not divisible by {name}={by}")


def float_arg(owner: str, name: str, value: Any, *, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {name} must be a float, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be finite, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{owner}: {name} must be > 0, got {value}")
