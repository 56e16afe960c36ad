"""Base class of decoding-time hallucination corrections."""

from __future__ import annotations

from vlmkit.runtime.hooks import Intervention


class Decoder(Intervention):
    """A decoder overrides any of ``prepare``, ``positions``, ``attention``, ``edit_residual``, ``edit_logits`` and
    ``accept``. Every decoder takes a strength option; at strength 0 it must reproduce greedy decoding exactly."""
