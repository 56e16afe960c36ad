"""Base class of decoding-time hallucination corrections."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmkit.runtime.hooks import Intervention, LayerState


class Decoder(Intervention):
    """A decoder overrides any of ``prepare``, ``positions``, ``attention``, ``edit_residual``, ``edit_logits`` and
    ``accept``. Every decoder takes a strength option; at strength 0 it must reproduce greedy decoding exactly."""


def over_current_keys(prompt_values: torch.Tensor, state: LayerState) -> torch.Tensor:
    """Per-key values a method saved over a layer's prompt keys in the prefill (``[B, ..., L_prompt]``), laid over
    the layer's current keys (``[rows, ..., Lk]``): each sample's row repeated for its beams, zero (False) for the
    generated tokens cached after the prompt."""
    rows, keys = state.key_valid.shape
    values = prompt_values.repeat_interleave(rows // prompt_values.shape[0], dim=0)
    return F.pad(values, (0, keys - values.shape[-1]))
