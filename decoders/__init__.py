"""Decoding-time hallucination corrections, registered by name: ``create("vista")``, ``available()``."""

from __future__ import annotations

from vlmkit.registry import Registry

from vlmkit.decoders.base import Decoder

REGISTRY: Registry[Decoder] = Registry("decoder")
register = REGISTRY.register
create = REGISTRY.create
create_from_spec = REGISTRY.create_from_spec
available = REGISTRY.available

from vlmkit.decoders import cca, gift, locore, pai, sgrs, var, vcd, vista  # noqa: E402  (registration side effects)

__all__ = ["Decoder", "REGISTRY", "available", "create", "create_from_spec", "register"]
