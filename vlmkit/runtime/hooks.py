"""Every hook point of the vlmkit runtime, in one place.

An *intervention* (a pruner or a decoder) is an object that overrides some of the methods of :class:`Intervention`.
The runtime calls only the hooks an intervention overrides, so an unused hook costs nothing. One generate call runs
one pruner and any number of decoders; they are called in that order (pruner first, decoders in the given order).

===========  ==========================================================  ===============================
hook         called                                                      returns
===========  ==========================================================  ===============================
prepare      once per batch, before the prefill (extra passes)           None
positions    once, on the unpruned sequence (custom, e.g. concentric)     new position ids or None
select_visual  vision side: once per batch, before the LLM               one :class:`Selection` per image
attention    before each LLM layer, prefill and decode                   :class:`AttentionRequest` or None
after_layer  after each LLM layer in the prefill, with the statistics    keep mask ``[B, L]`` or None
edit_residual  after each LLM layer, prefill and decode                  new hidden states or None
edit_logits  after each step's logits, with the hidden states it asked   new logits ``[B, V]`` or None
early_exit   once per batch, after prepare: answer without the model      token ids per row, or None
accept       after the sampler proposed a token                          bool ``[B]`` (accepted) or None
fallback     when ``accept`` rejected every try of some rows             tokens ``[B]`` or None
after_step   once the step's tokens are final (and the beams reordered)  None
===========  ==========================================================  ===============================

Candidate checks (greedy and sampling; beam search never calls them): the sampler proposes a token per row;
``accept`` says which to keep; each rejected token is masked out and the row redrawn, up to
``max_candidate_tries`` checks per step. Rows whose every check failed get ``fallback``'s token (default: the first
candidate). ``early_exit`` skips the model for the whole batch when it returns one answer per row (a small-model
answer, say); with any row left as None the model runs for every row.

Per-row statistics of a method go to ``Generation.stats``: call ``ctx.report(key, values)`` with one value per
sample (name keys ``<method>_<stat>``); the engine copies them when the batch is done (so a list reported early may
still be filled in later). They never replace the engine's own keys.

Speed: the runtime replays the layers at which no hook acts as CUDA graphs (``static_prefill.py``). An intervention
that overrides a layer hook (``attention``, ``after_layer``, ``edit_residual``) says at which prefill layers it may
act with ``prefill_layers``; returning None (the default) or overriding ``edit_logits`` keeps the whole prefill on the
eager walk. ``acts_in_decode`` decides the same for decoding, and ``decode_in_graph`` lets an intervention's decode
hooks into the decode step's CUDA graph (``static_decode.py``) under a contract: during decoding only ``attention``,
``edit_residual`` and ``edit_logits`` act; at every step they issue the same tensor operations and read nothing back
to the host; and every tensor they read that was made outside the step lives at an address that stays fixed from
call to call (keep per-call values in a buffer of your own and copy into it). Python values may differ between calls
only through what the static decoder is keyed by: batch rows, beams per sample, cache capacities, dtype, device.

Positions are never recomputed after pruning: a token that survives keeps the position id (1-D, or 3-D M-RoPE) it had
in the unpruned sequence, and decoding continues from the unpruned sequence's next position. Dropping tokens after
layer ``k`` removes them from the hidden states and from the KV cache of every layer after ``k``; layers ``<= k`` keep
their full cache, so decoding stays consistent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vlmkit.kernels.reference import AttentionStats, MaskMod, ProbsMod

if TYPE_CHECKING:
    from vlmkit.models.base import Adapter


#: every hook, in the order of the table above
HOOKS = ("prepare", "positions", "select_visual", "attention", "after_layer", "edit_residual", "edit_logits",
         "early_exit", "accept", "fallback", "after_step")


@dataclass
class VisualTokens:
    """One image's visual tokens as the language model would receive them, plus what the vision side knows.

    ``features`` is the projector's input, one row per token: the vision encoder's selected layer for LLaVA
    ``[N, D_v]``; for Qwen the merger's input regrouped per merged token ``[N, merge**2 * D_v]``.
    ``attention`` (only when the pruner sets ``needs_vision_attention``) is the [CLS] -> patch attention of the
    encoder layer that produced the features, per head ``[H_v, N]``; None for encoders without a [CLS] token.
    """

    embeds: torch.Tensor  # [N, D_lm] after the projector / merger
    grid: tuple[int, int]  # (rows, cols) of the token grid, N == rows * cols
    image_index: int  # which sample of the batch
    features: torch.Tensor | None = None
    attention: torch.Tensor | None = None


@dataclass
class Selection:
    """The visual tokens of one image that enter the LLM.

    ``keep`` holds sorted indices into the image's ``N`` tokens. ``embeds`` (optional, ``[len(keep), D]``) replaces
    the kept tokens' embeddings, for methods that merge the dropped tokens into the kept ones. Kept tokens keep their
    original position ids.
    """

    keep: torch.Tensor
    embeds: torch.Tensor | None = None


@dataclass
class AttentionRequest:
    """What an intervention wants from one layer's attention.

    ``mass_queries`` is a bool/float ``[B, Lq]`` weight over the layer's query rows (use the helpers on
    :class:`LayerState`); the runtime then hands the per-key mass ``[B, Hq, Lk]`` to ``after_layer``.
    ``key_bias`` (``[B or 1, Hq or 1, Lk]``) is added to the logits. ``key_abs_gain`` (same shape) turns every query
    row's scaled logit ``s`` for each key into ``s + g * |s|`` before the bias is added (PAI). Biases and gains of
    several interventions add up. ``mask_mod`` further restricts the causal mask. ``probs_mod`` edits the softmax
    probabilities ``[B, Hq, Lq, Lk]`` of the call (post-softmax methods, VAR); it runs only on the torch reference
    attention, so a layer that asks for it is not fused. Several compose in order.
    """

    mass_queries: torch.Tensor | None = None
    key_bias: torch.Tensor | None = None
    mask_mod: MaskMod | None = None
    key_abs_gain: torch.Tensor | None = None
    probs_mod: ProbsMod | None = None


def last_visual_index(is_visual: torch.Tensor) -> torch.Tensor:
    """``[B]``: each row's position of its last visual token (-1 for a row without any), from ``is_visual [B, L]``."""
    index = torch.arange(is_visual.shape[1], device=is_visual.device)
    return torch.where(is_visual, index, -1).amax(dim=1)


@dataclass
class LayerState:
    """The sequence as it stands at a layer boundary (prefill or one decode step)."""

    hidden: torch.Tensor  # [B, L, D]
    valid: torch.Tensor  # [B, L] bool: real tokens (False for left padding)
    is_visual: torch.Tensor  # [B, L] bool
    positions: torch.Tensor  # [B, L] (1-D) or [3, B, L] (M-RoPE)
    source_index: torch.Tensor  # [B, L] index of each token in the unpruned, padded prompt (-1 for new padding)
    key_valid: torch.Tensor | None = None  # [B, Lk] validity of this layer's KV cache, set during the layer walk

    @property
    def text_after_visual(self) -> torch.Tensor:
        """[B, L] bool: real text tokens that come after the row's last visual token (the prompt's question)."""
        index = torch.arange(self.valid.shape[1], device=self.valid.device)
        last_visual = last_visual_index(self.is_visual)[:, None]
        return self.valid & ~self.is_visual & (index > last_visual) & (last_visual >= 0)

    @property
    def last_token(self) -> torch.Tensor:
        """[B, L] bool: the last position of each row."""
        mask = torch.zeros_like(self.valid)
        mask[:, -1] = True
        return mask


@dataclass
class GenerationContext:
    """What every hook sees: the model adapter, the batch, the step, and per-intervention scratch space."""

    adapter: Adapter
    prompts: list[str]
    images: list[Any]
    num_beams: int = 1
    step: int = -1  # -1 during the prefill, then the index of the token being decoded
    engine: Any = None  # the runtime Engine, for interventions that run extra passes
    scratch: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int | None = None  # the call's token limit (set by the engine)
    cache: Any = None  # the running LayeredKVCache (set by the engine; read it, never write it), to re-run a step

    def report(self, key: str, values: list) -> None:
        """Per-sample statistic ``key`` (one value per prompt), copied into each ``Generation.stats``."""
        if len(values) != len(self.prompts):
            raise ValueError(f"stat {key!r}: {len(values)} values for {len(self.prompts)} samples")
        self.scratch.setdefault("stats", {})[key] = values


class Intervention:
    """Base class of pruners and decoders. Override only the hooks you need; see the module docstring."""

    name: str = "intervention"

    #: layers whose last-position hidden states ``edit_logits`` receives (negative indices count from the end)
    logit_hidden_layers: tuple[int, ...] = ()
    #: how many candidates ``accept`` checks per step before the runtime asks ``fallback``
    max_candidate_tries: int = 1
    #: whether the method handles batch > 1 (the API raises a clear error otherwise)
    supports_batch: bool = True
    #: whether ``select_visual`` needs ``VisualTokens.attention`` (costs one extra projection in the vision tower)
    needs_vision_attention: bool = False
    #: whether any hook does something while decoding (``ctx.step >= 0``); when no intervention does (or each one
    #: that does keeps ``decode_in_graph``'s contract), the runtime may replay decode steps as a CUDA graph
    acts_in_decode: bool = True
    #: whether the decode hooks keep the contract in the module docstring, so that the graph may capture them
    decode_in_graph: bool = False

    def prefill_layers(self, num_layers: int) -> set[int] | None:
        """The prefill layers at which this intervention's layer hooks may act (``attention`` before the layer,
        ``after_layer`` and ``edit_residual`` after it); at every other layer they must return None, and the runtime
        may skip calling them there. None: any layer."""
        return None

    def prepare(self, ctx: GenerationContext, inputs: Any) -> None:
        """Run extra passes before the prefill (``inputs`` is the prepared batch)."""

    def positions(self, ctx: GenerationContext, positions: torch.Tensor, is_visual: torch.Tensor) -> torch.Tensor | None:
        """Replace the position ids of the unpruned sequence."""

    def select_visual(self, ctx: GenerationContext, tokens: list[VisualTokens]) -> list[Selection] | None:
        """Vision side: choose (or merge) each image's visual tokens before the LLM."""

    def attention(self, ctx: GenerationContext, layer: int, state: LayerState) -> AttentionRequest | None:
        """Ask for attention statistics, logit biases or a mask at ``layer``."""

    def after_layer(
        self, ctx: GenerationContext, layer: int, state: LayerState, attention: AttentionStats | None
    ) -> torch.Tensor | None:
        """Prefill only: return a bool ``[B, L]`` mask of tokens to keep after ``layer`` (text is always kept)."""

    def edit_residual(self, ctx: GenerationContext, layer: int, state: LayerState) -> torch.Tensor | None:
        """Return new hidden states ``[B, L, D]`` after ``layer`` (steering)."""

    def edit_logits(
        self, ctx: GenerationContext, logits: torch.Tensor, hidden_by_layer: dict[int, torch.Tensor]
    ) -> torch.Tensor | None:
        """Return new next-token logits ``[B, V]``; ``hidden_by_layer`` maps each requested layer to ``[B, D]``."""

    def early_exit(self, ctx: GenerationContext, inputs: Any) -> list[list[int] | None] | None:
        """After ``prepare``: token ids that answer each row without running the model. The model is skipped only
        when every row gets an answer."""

    def accept(self, ctx: GenerationContext, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor | None:
        """Return a bool ``[B]``: which proposed ``tokens`` to accept. Rejected ones are masked out and redrawn."""

    def fallback(self, ctx: GenerationContext, logits: torch.Tensor, first: torch.Tensor) -> torch.Tensor | None:
        """Every check of some rows failed: return the tokens ``[B]`` to emit (only those rows' entries are used;
        ``logits`` are the step's unmasked logits). None keeps each row's ``first`` candidate."""

    def after_step(self, ctx: GenerationContext, tokens: torch.Tensor, parents: torch.Tensor) -> None:
        """The step's final tokens ``[B]``; ``parents[i]`` is the row that row ``i`` continues (beam search reorders
        rows; otherwise ``parents`` is ``arange(B)``). For methods that keep their own per-row state."""

    def overrides(self, hook: str) -> bool:
        return getattr(type(self), hook) is not getattr(Intervention, hook)
