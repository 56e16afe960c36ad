"""A second decoding branch, shared by the contrastive decoders (``vcd``: a noised image; ``pai``: no image).

The branch decodes the same answer as the main run, in lockstep, from another input: its own prefill and KV cache,
then one decode step per generated token, fed the tokens the main run chose. It runs on the unmodified model (no
pruner, no other decoder), like the extra passes of ``vista`` and ``gift``. The decoder drives it from three hooks:

* ``prepare``: ``Branch(ctx, state, next_position)`` runs the prefill (``state`` from :meth:`Branch.image_state` or
  :meth:`Branch.text_state`) and keeps the last position's logits;
* ``after_step``: :meth:`Branch.follow` takes the step's final tokens (under beam search the cache and positions
  first follow the beams, as the main cache does);
* ``edit_logits``: :meth:`Branch.logits` feeds the pending tokens and returns the branch's next-token logits
  ``[B, V]``. A step runs only when its logits are used, so the main run's last step costs no branch step.

Finished rows are fed the same padding token as in the main run, so every row stays in step.
"""

from __future__ import annotations

import torch

from vlmkit.models.base import PreparedBatch
from vlmkit.runtime.cache import LayeredKVCache
from vlmkit.runtime.hooks import GenerationContext, LayerState


class Branch:
    def __init__(self, ctx: GenerationContext, state: LayerState, next_position: torch.Tensor):
        from vlmkit.runtime.engine import Engine  # the runtime imports the decoders: import it lazily

        adapter = ctx.adapter
        self.engine = Engine(adapter, [], attention_backend=ctx.engine.attention_backend)
        self.ctx = GenerationContext(adapter=adapter, prompts=ctx.prompts, images=ctx.images, engine=self.engine)
        self.cache = self.ctx.cache = LayeredKVCache(len(adapter.layers))
        self.next_position = next_position
        state, collected, _ = self.engine.run_layers(self.ctx, state, self.cache, set())
        self._logits = self.engine._logits(self.ctx, state.hidden[:, -1], collected)
        self.pending: torch.Tensor | None = None
        self.beams = 1

    @staticmethod
    def image_state(ctx: GenerationContext, inputs: PreparedBatch) -> tuple[LayerState, torch.Tensor]:
        """The prompts with their images as ``inputs`` gives them (e.g. noised pixels): every visual token kept."""
        from vlmkit.runtime.engine import Engine

        bare = Engine(ctx.adapter, [], attention_backend=ctx.engine.attention_backend)
        pass_ctx = GenerationContext(adapter=ctx.adapter, prompts=ctx.prompts, images=ctx.images, engine=bare)
        state, next_position, _ = bare.initial_state(pass_ctx, inputs)
        return state, next_position

    @staticmethod
    def text_state(ctx: GenerationContext, inputs: PreparedBatch) -> tuple[LayerState, torch.Tensor]:
        """The prompts without their images: the image placeholder tokens (and Qwen's ``<|vision_start|>`` /
        ``<|vision_end|>``) removed, positions recomputed (``vista``'s negative context)."""
        from vlmkit.decoders.vista import Vista

        positions, _ = ctx.adapter.position_ids(inputs)
        state = Vista.text_only_state(ctx, inputs, mrope=positions.dim() == 3)
        return state, state.valid.long().sum(dim=1)

    def follow(self, ctx: GenerationContext, tokens: torch.Tensor, parents: torch.Tensor) -> None:
        """The main run's final tokens of this step (``after_step``)."""
        if ctx.num_beams > 1:
            if self.beams == 1:  # the first beam step: expand the rows to beams, as the main decoder does
                self.beams = ctx.num_beams
                expand = torch.arange(self.next_position.shape[0], device=parents.device)
                expand = expand.repeat_interleave(self.beams)
                self.cache.reorder(expand)
                self.next_position = self.next_position.index_select(0, expand)
            self.cache.reorder(parents)
        self.pending = tokens.clone()

    def logits(self, ctx: GenerationContext) -> torch.Tensor:
        """The branch's logits ``[B, V]`` for the token the main run is about to choose (``edit_logits``)."""
        if self.pending is not None:
            self.ctx.step, self.ctx.num_beams = ctx.step, ctx.num_beams
            positions = ctx.adapter.decode_positions(self.next_position, ctx.step)
            self._logits = self.engine.decode_step(self.ctx, self.cache, self.pending, positions)
            self.pending = None
        return self._logits
