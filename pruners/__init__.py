"""Visual-token pruners, registered by name: ``create("fastv", keep=64)``, ``available()``."""

from __future__ import annotations

from vlmkit.registry import Registry

from vlmkit.pruners.base import Pruner

REGISTRY: Registry[Pruner] = Registry("pruner")
register = REGISTRY.register
create = REGISTRY.create
create_from_spec = REGISTRY.create_from_spec
available = REGISTRY.available

from vlmkit.pruners import agile, dart, divprune, dyvte, fastervlm, fastv, pdrop, random_keep, sgl, uniform, visionzip, zoo  # noqa: E402  (registration side effects)

__all__ = ["Pruner", "REGISTRY", "available", "create", "create_from_spec", "register"]
