"""The vlmkit runtime: prefill and decode loops over a stock HF model, with the hook points of ``hooks``."""

from vlmkit.runtime.hooks import (
    AttentionRequest,
    GenerationContext,
    Intervention,
    LayerState,
    Selection,
    VisualTokens,
)

__all__ = ["AttentionRequest", "GenerationContext", "Intervention", "LayerState", "Selection", "VisualTokens"]
