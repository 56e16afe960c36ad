"""Base class of visual-token pruners."""

from __future__ import annotations

import math

from vlmkit.errors import ConfigError
from vlmkit.runtime.hooks import Intervention


class Pruner(Intervention):
    """A pruner keeps ``keep`` visual tokens per image (an int count, or a float fraction in (0, 1]).

    Vision-side pruners override ``select_visual``; in-LLM pruners override ``attention`` and ``after_layer`` and say
    at which layers those act (``prefill_layers``), so that the layers in between replay as CUDA graphs.
    Pruners act in the prefill only, so decoding may run as a CUDA graph (``acts_in_decode``).
    """

    acts_in_decode = False

    def __init__(self, keep: int | float = 64):
        if isinstance(keep, bool) or not isinstance(keep, (int, float)):
            raise ConfigError(f"keep must be a token count or a fraction, got {keep!r}")
        if keep <= 0 or (isinstance(keep, float) and keep > 1.0):
            raise ConfigError(f"keep must be a positive token count or a fraction in (0, 1], got {keep}")
        self.keep = keep

    def budget(self, available: int) -> int:
        """How many of ``available`` visual tokens to keep; a count larger than ``available`` is an error."""
        if isinstance(self.keep, float):
            return max(1, math.floor(self.keep * available))
        if self.keep > available:
            raise ConfigError(
                f"{self.name}: budget keep={self.keep} is larger than the {available} visual tokens available"
            )
        return self.keep
