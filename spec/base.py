"""Base class of every spec: frozen, hashable, validated on construction, JSON round trip."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, ClassVar

_KINDS: dict[str, type[Spec]] = {}


class Spec:
    """Mixin for frozen spec dataclasses.

    Subclasses set ``kind`` (the JSON tag) and implement ``_validate``.
    """

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.kind:
            if cls.kind in _KINDS and _KINDS[cls.kind].__qualname__ != cls.__qualname__:
                raise RuntimeError(f"spec kind {cls.kind!r} registered twice")
            _KINDS[cls.kind] = cls

    def __post_init__(self):
        self._validate()

    def _validate(self) -> None:  # pragma: no cover - every concrete spec overrides
        raise NotImplementedError

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self):
            out[f.name] = _encode(getattr(self, f.name))
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def spec_id(self) -> str:
        """A short stable fingerprint; states carry it so a state from another spec is caught."""
        return hashlib.sha1(self.to_json().encode()).hexdigest()[:16]


def _encode(value: Any) -> Any:
    if isinstance(value, Spec):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_encode(v) for v in value]
    return value


def from_dict(data: dict[str, Any]) -> Spec:
    if not isinstance(data, dict) or "kind" not in data:
        raise ValueError(f"spec JSON must be an object with a 'kind' field, got {data!r}")
    kind = data["kind"]
    if kind not in _KINDS:
        raise ValueError(f"spec JSON: unknown kind {kind!r}; known kinds: {sorted(_KINDS)}")
    cls = _KINDS[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    extra = set(data) - names - {"kind"}
    if extra:
        raise ValueError(f"spec JSON for {kind!r}: unknown fields {sorted(extra)}")
    kwargs = {}
    for name, value in data.items():
        if name == "kind":
            continue
        if isinstance(value, dict) and "kind" in value:
            value = from_dict(value)
        elif isinstance(value, list):
            value = tuple(from_dict(v) if isinstance(v, dict) else v for v in value)
        kwargs[name] = value
    return cls(**kwargs)


def from_json(text: str) -> Spec:
    """Inverse of ``Spec.to_json``; validates the result."""
    if not isinstance(text, (str, bytes, bytearray)):
        raise TypeError(f"spec JSON must be a str, got {type(text).__name__}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"spec JSON is not valid JSON: {err}") from None
    return from_dict(data)
