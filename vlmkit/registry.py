"""Name -> class registries for pruners and decoders, and the ``name:key=value,...`` spec syntax.

A spec string and ``create(name, **kwargs)`` mean the same thing::

    create_from_spec("fastv:keep=64,layer=2")  ==  create("fastv", keep=64, layer=2)

Values are parsed as int, float, ``true``/``false``, ``none``, or left as strings; ``a|b|c`` is a list.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Generic, TypeVar

from vlmkit.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Methods of one kind (``"pruner"`` or ``"decoder"``), registered by name with a class decorator."""

    def __init__(self, kind: str):
        self.kind = kind
        self._classes: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def decorator(cls: type[T]) -> type[T]:
            if name in self._classes and self._classes[name] is not cls:
                raise ConfigError(f"{self.kind} {name!r} is already registered by {self._classes[name].__qualname__}")
            cls.name = name
            self._classes[name] = cls
            return cls

        return decorator

    def available(self) -> list[str]:
        return sorted(self._classes)

    def get(self, name: str) -> type[T]:
        if name not in self._classes:
            raise ConfigError(f"unknown {self.kind} {name!r}; available: {', '.join(self.available()) or 'none'}")
        return self._classes[name]

    def create(self, name: str, **options) -> T:
        cls = self.get(name)
        accepted = inspect.signature(cls.__init__).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
        unknown = [key for key in options if key not in accepted and not takes_any]
        if unknown:
            known = [p for p in accepted if p not in ("self", "args", "kwargs")]
            raise ConfigError(f"{self.kind} {name!r} has no option {', '.join(unknown)}; its options: {', '.join(known)}")
        try:
            return cls(**options)
        except TypeError as error:
            raise ConfigError(f"bad options for {self.kind} {name!r}: {error}") from None

    def create_from_spec(self, spec: str) -> T:
        name, options = parse_spec(spec)
        return self.create(name, **options)


def parse_spec(spec: str) -> tuple[str, dict[str, object]]:
    """``"name:key=value,key=value"`` -> ``(name, {key: value})``."""
    name, _, rest = spec.strip().partition(":")
    if not name:
        raise ConfigError(f"empty method name in spec {spec!r}")
    options: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"bad option {item!r} in spec {spec!r}; write key=value")
        options[key.strip()] = parse_value(value.strip())
    return name, options


def parse_value(text: str) -> object:
    if "|" in text:
        return [parse_value(part) for part in text.split("|")]
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text
