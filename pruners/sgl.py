"""``sgl``: small-VLM guidance (SGP pruning + SEE early exit).

Paper: Zhao et al., "A Stitch in Time Saves Nine: Small VLM is a Precise Guidance for Accelerating Large VLMs"
(CVPR 2025, arXiv 2412.03324); code ``NUS-HPC-AI-Lab/SGL`` (InternVL2 only). Spec: pruners.md §4.

**SGP.** A small VLM that shares the large model's visual-token grid answers the prompt first (greedy). Its
attention to the visual tokens, summed over all layers, heads, the prompt rows from the last visual token on and the
rows of its generated tokens (the raw sum of the code), ranks the large model's visual tokens index-to-index. The
large model keeps the top ``keep`` of them from layer ``K = floor(layer * L)`` on (``layer`` may also be an int K;
``K = 0`` prunes before the LLM); kept tokens keep their positions.

**SEE.** With ``exit_threshold`` set, the small model's answer is returned and the large model is skipped when
``min(confidence, consistency) >= exit_threshold``: confidence is the geometric mean of the small model's max
next-token probability over its answer; consistency is the product of the probabilities the small model gives its
own answer when it sees only ``consistency_keep`` (5 %) of the visual tokens, chosen by its own ranking. This is an
online decision (the engine's ``early_exit`` hook); the batch exits only when every sample passes, so generate one
sample at a time for per-sample exits. ``Generation.stats`` gets ``sgl_exit``, ``sgl_confidence``,
``sgl_consistency`` (None unless early exit is on) and ``sgl_small_s`` (the small model's time, for the batch).

Deviations:

* The attention mass comes from one teacher-forced pass of the small model over prompt + answer (the kernel's
  attention statistics; causal, so it equals the per-step sum of the code) rather than from every decode step.
* The rows start right after the last visual token (the code's span also holds the last visual token's own row).
* Fusing confidence and consistency with ``min`` and the threshold are our choices: the code logs both signals and
  decides offline (pruners.md §4(a)3, §4(e)1).
* Per-row normalisation (pruners.md §4(f)) would rescale one sample's scores uniformly and not change its ranking,
  so it is not offered. The small model's cost is in ``sgl_small_s``; the large model's stats do not include it.

``small`` is a model path, ``builtin:NAME``, a :class:`vlmkit.VLM` or a ``(model, processor)`` pair. The pair must
have the same number and grid of visual tokens per image (``ConfigError`` otherwise) and, for early exit, the same
vocabulary.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from vlmkit.errors import ConfigError
from vlmkit.models.base import PreparedBatch
from vlmkit.pruners import register
from vlmkit.pruners.base import Pruner
from vlmkit.pruners.select import raster_index, top_indices, top_visual, visual_counts
from vlmkit.runtime.cache import LayeredKVCache
from vlmkit.runtime.hooks import (AttentionRequest, GenerationContext, Intervention, LayerState, Selection,
                                  VisualTokens, last_visual_index)


class _Grids(Intervention):
    """Records each image's visual-token grid (no selection)."""

    acts_in_decode = False  # the guide's own answer may decode as a CUDA graph
    grids: list[tuple[int, int]] = []

    def select_visual(self, ctx: GenerationContext, tokens: list[VisualTokens]) -> None:
        self.grids = [t.grid for t in tokens]


class _VisualMass(Intervention):
    """Sums, over every layer and head, the attention the rows after the last visual token give each key."""

    def __init__(self):
        self.mass: torch.Tensor | None = None

    def attention(self, ctx: GenerationContext, layer: int, state: LayerState) -> AttentionRequest:
        index = torch.arange(state.valid.shape[1], device=state.valid.device)
        return AttentionRequest(mass_queries=state.valid & (index > last_visual_index(state.is_visual)[:, None]))

    def after_layer(self, ctx, layer: int, state: LayerState, attention) -> None:
        mass = attention.key_mass.sum(dim=1)
        self.mass = mass if self.mass is None else self.mass + mass


class _KeepTop(Intervention):
    """Keeps each image's ``budgets[i]`` highest-``scores`` tokens before the LLM."""

    def __init__(self, scores: list[torch.Tensor], budgets: list[int]):
        self.scores, self.budgets = scores, budgets

    def select_visual(self, ctx: GenerationContext, tokens: list[VisualTokens]) -> list[Selection]:
        return [Selection(keep=top_indices(s, k)) for s, k in zip(self.scores, self.budgets)]


def with_answers(batch: PreparedBatch, answers: list[list[int]], pad: int) -> PreparedBatch:
    """``batch`` with each row's answer tokens appended, left-padded again (family extras of shape [B, L] get 0)."""
    width = max(len(a) for a in answers)
    rows, length = batch.input_ids.shape
    device = batch.input_ids.device

    def extend(tensor: torch.Tensor, fill, tails: list[list]) -> torch.Tensor:
        out = tensor.new_full((rows, length + width), fill)
        for b, tail in enumerate(tails):
            start = width - len(tail)
            out[b, start:start + length] = tensor[b]
            out[b, start + length:] = torch.tensor(tail, dtype=tensor.dtype, device=device)
        return out

    extra = {k: extend(v, 0, [[0] * len(a) for a in answers])
             if isinstance(v, torch.Tensor) and v.shape == (rows, length) else v for k, v in batch.extra.items()}
    return PreparedBatch(
        input_ids=extend(batch.input_ids, pad, answers),
        attention_mask=extend(batch.attention_mask, 0, [[1] * len(a) for a in answers]),
        is_visual=extend(batch.is_visual, False, [[False] * len(a) for a in answers]),
        vision_inputs=batch.vision_inputs, extra=extra,
    )


@register("sgl")
class SmallGuidance(Pruner):
    def __init__(self, small: Any = None, keep: int | float = 0.4, layer: int | float = 0.4,
                 exit_threshold: float | None = None, consistency_keep: float = 0.05):
        super().__init__(keep)
        if small is None:
            raise ConfigError("sgl needs a small model: small=PATH, builtin:NAME, a VLM or (model, processor)")
        if isinstance(layer, bool) or layer < 0 or (isinstance(layer, float) and layer >= 1.0):
            raise ConfigError(f"sgl: layer must be an int >= 0 or a fraction in [0, 1), got {layer}")
        if exit_threshold is not None and not 0.0 <= exit_threshold <= 1.0:
            raise ConfigError(f"sgl: exit_threshold must be in [0, 1], got {exit_threshold}")
        if not 0.0 < consistency_keep <= 1.0:
            raise ConfigError(f"sgl: consistency_keep must be in (0, 1], got {consistency_keep}")
        self.small, self.layer, self.exit_threshold = small, layer, exit_threshold
        self.consistency_keep = consistency_keep
        self._guide = None  # (the grid recorder, the engine that generates the guide's answers)

    def prune_layer(self, count: int) -> int:
        """K: the first layer that sees only the kept tokens."""
        k = self.layer if isinstance(self.layer, int) else math.floor(self.layer * count)
        if k >= count:
            raise ConfigError(f"sgl: layer={self.layer} leaves no layer to prune in a model of {count} layers")
        return k

    def small_vlm(self, ctx: GenerationContext):
        """The small model as a VLM (loaded once, on the large model's device and dtype)."""
        from vlmkit import api  # the API imports the pruners: import it lazily

        if isinstance(self.small, str):
            self.small = api.load(self.small, device=ctx.adapter.device, dtype=ctx.adapter.model.dtype)
        elif isinstance(self.small, tuple):
            self.small = api.wrap(*self.small)
        if not isinstance(self.small, api.VLM):
            raise ConfigError(f"sgl: small must be a path, a VLM or (model, processor), got {type(self.small)}")
        return self.small

    # -- the small model ------------------------------------------------------------------------------------------
    def guidance(self, ctx: GenerationContext) -> dict:
        """Run the small model on the batch: its answers, visual-token scores ``[N_i]`` per image and grids, its
        confidence and (with early exit) consistency."""
        from vlmkit.runtime.engine import Engine
        from vlmkit.runtime.sampling import SamplingConfig

        small = self.small_vlm(ctx)
        adapter = small.adapter
        batch = adapter.prepare(ctx.images, ctx.prompts)
        if self._guide is None or self._guide[1].adapter is not adapter:  # kept, so its decode graphs are reused
            grids = _Grids()
            self._guide = (grids, Engine(adapter, [grids], small.engine.attention_backend))
        grids, engine = self._guide
        sub = GenerationContext(adapter=adapter, prompts=ctx.prompts, images=ctx.images)
        rows = engine.generate(sub, batch, max_new_tokens=ctx.max_new_tokens or 1, sampling=SamplingConfig())
        answers = [r.token_ids for r in rows]
        pad = adapter.tokenizer.pad_token_id if adapter.tokenizer.pad_token_id is not None else 0
        full = with_answers(batch, [a[:-1] for a in answers], pad)
        mass = _VisualMass()
        hidden = self.teacher_forced(adapter, Engine(adapter, [mass], small.engine.attention_backend), full)
        scores = [mass.mass[b][full.is_visual[b]] for b in range(full.batch_size)]
        confidence = [math.exp(float(p.max(dim=-1).values.log().mean()))
                      for p in self.answer_probs(adapter, hidden, answers)]
        result = {"answers": answers, "scores": scores, "grids": grids.grids, "confidence": confidence,
                  "consistency": [None] * len(answers)}
        if self.exit_threshold is not None:
            budgets = [max(1, math.floor(self.consistency_keep * s.numel())) for s in scores]
            keep = Engine(adapter, [_KeepTop(scores, budgets)], small.engine.attention_backend)
            probs = self.answer_probs(adapter, self.teacher_forced(adapter, keep, full), answers)
            result["consistency"] = [float(p.gather(1, torch.tensor(a, device=p.device)[:, None]).prod())
                                     for p, a in zip(probs, answers)]
        return result

    @staticmethod
    def teacher_forced(adapter, engine, batch: PreparedBatch) -> torch.Tensor:
        """One prefill over ``batch`` through ``engine``'s interventions; the last layer's hidden states."""
        ctx = GenerationContext(adapter=adapter, prompts=[""] * batch.batch_size, images=[], engine=engine)
        state, _, _ = engine.initial_state(ctx, batch)
        state, _, _ = engine.run_layers(ctx, state, LayeredKVCache(len(adapter.layers)), set())
        return state.hidden

    @staticmethod
    def answer_probs(adapter, hidden: torch.Tensor, answers: list[list[int]]) -> list[torch.Tensor]:
        """Per row, the next-token distributions ``[n, V]`` at the positions that predict its ``n`` answer tokens
        (the answers minus their last token end each row of ``hidden``)."""
        out = []
        for b, answer in enumerate(answers):
            rows = hidden[b, hidden.shape[1] - len(answer):]
            out.append(adapter.lm_head(adapter.final_norm(rows)).float().softmax(dim=-1))
        return out

    # -- hooks of the large model ---------------------------------------------------------------------------------
    def prepare(self, ctx: GenerationContext, inputs: PreparedBatch) -> None:
        started = time.perf_counter()
        self.prune_layer(len(ctx.adapter.layers))
        guide = self.guidance(ctx)
        counts = inputs.is_visual.sum(dim=1).tolist()
        if [s.numel() for s in guide["scores"]] != counts:
            raise ConfigError(f"sgl: the small model has {[s.numel() for s in guide['scores']]} visual tokens per "
                              f"image, the large model {counts}; the two models must share the visual grid")
        for count in counts:
            self.budget(count)  # impossible budgets fail before any work on the large model
        exits = [False] * len(counts)
        if self.exit_threshold is not None:
            if self.small.adapter.tokenizer.get_vocab() != ctx.adapter.tokenizer.get_vocab():
                raise ConfigError("sgl: early exit needs the small and large models to share the tokenizer")
            exits = [min(c, s) >= self.exit_threshold for c, s in zip(guide["confidence"], guide["consistency"])]
        batch_exits = all(exits)
        ctx.scratch[self.name] = {**guide, "exit": batch_exits, "prompt_visual": inputs.is_visual}
        ctx.report("sgl_exit", [batch_exits] * len(counts))
        ctx.report("sgl_confidence", guide["confidence"])
        ctx.report("sgl_consistency", guide["consistency"])
        ctx.report("sgl_small_s", [time.perf_counter() - started] * len(counts))

    def early_exit(self, ctx: GenerationContext, inputs: PreparedBatch) -> list[list[int]] | None:
        scratch = ctx.scratch[self.name]
        return scratch["answers"] if scratch["exit"] else None

    def select_visual(self, ctx: GenerationContext, tokens: list[VisualTokens]) -> list[Selection] | None:
        scratch = ctx.scratch[self.name]
        large = [t.grid for t in tokens]
        if large != scratch["grids"]:
            raise ConfigError(f"sgl: visual grids differ: small {scratch['grids']}, large {large}")
        if self.prune_layer(len(ctx.adapter.layers)) > 0:
            return None
        return [Selection(keep=top_indices(s, self.budget(s.numel()))) for s in scratch["scores"]]

    def prefill_layers(self, num_layers: int) -> set[int]:
        k = self.prune_layer(num_layers)
        return {k - 1} if k > 0 else set()

    def after_layer(self, ctx: GenerationContext, layer: int, state: LayerState, attention) -> torch.Tensor | None:
        k = self.prune_layer(len(ctx.adapter.layers))
        if k == 0 or layer != k - 1:
            return None
        scratch = ctx.scratch[self.name]
        ordinal = raster_index(scratch["prompt_visual"], state.source_index).clamp(min=0)  # text: any index
        scores = torch.stack([s.gather(0, ordinal[b]) for b, s in enumerate(scratch["scores"])])
        return top_visual(scores, state.is_visual, [self.budget(n) for n in visual_counts(state)])
