"""Model adapters, chosen by the HF model class."""

from __future__ import annotations

from transformers import PreTrainedModel, ProcessorMixin

from vlmkit.errors import ModelNotSupported
from vlmkit.models.base import Adapter, PreparedBatch
from vlmkit.models.llava import LlavaAdapter
from vlmkit.models.qwen2_vl import Qwen2VLAdapter

ADAPTERS: tuple[type[Adapter], ...] = (LlavaAdapter, Qwen2VLAdapter)


def adapter_for(model: PreTrainedModel, processor: ProcessorMixin) -> Adapter:
    name = type(model).__name__
    for adapter in ADAPTERS:
        if name in adapter.model_classes:
            return adapter(model, processor)
    supported = ", ".join(c for a in ADAPTERS for c in a.model_classes)
    raise ModelNotSupported(f"vlmkit has no adapter for {name}; supported model classes: {supported}")


__all__ = ["ADAPTERS", "Adapter", "PreparedBatch", "adapter_for"]
