"""``gift``: gaze-shift guided cross-modal fusion enhancement.

Paper: "Capturing Gaze Shifts for Guidance: Cross-Modal Fusion Enhancement for VLM Hallucination Mitigation"
(arXiv 2510.22067); code ``amazon-science/GIFT``. Spec: decoders.md §2.

Stage A (``prepare``, one extra prefill on the unmodified model): at the saliency layer, for each informative query
token ``i`` and visual key ``j``, the gaze shift is ``max(0, A[h,i,j] - A[h,i-1,j])``. The top half of heads by
total shift is kept; the shift is averaged over those heads and the informative tokens, clamped to mean ± 3σ,
min-max normalised to ``ŝ ∈ [0, 1]`` and turned into weights ``w = exp(strength · ŝ)``.

Stage B (enhancement layers, every generated token): in the top half of heads by attention to the image, visual
attention is multiplied by ``w``; ``r`` = (scaled visual mass) / (visual mass) of those heads; in the top half of
heads by attention to the question, question attention is multiplied by ``r``; the row is renormalised. Scaling
post-softmax weights and renormalising is adding ``log w`` / ``log r`` to the logits, so stage B is a key bias
(no eager attention; it runs in the fused kernel). The prompt's last row (which predicts the first token) gets the
same edit: it is recomputed with the bias in each enhancement layer of the prefill (one extra attention pass over
the prompt and a one-row layer pass per enhancement layer), since a key bias would also move the other prompt rows.

Informative words (the code uses spaCy POS tags NOUN/PROPN/VERB/ADJ/ADV/NUM): a word of the question (a run of
letters, digits and apostrophes) is informative unless it is in :data:`FUNCTION_WORDS`, a closed list of
determiners, pronouns, prepositions, conjunctions, auxiliaries/modals, question words and particles, i.e. the
closed-class words the POS filter removes. A token is informative if it overlaps an informative word. The question
is found by character offsets of the user's text in the chat prompt (no template offsets or token ids). If a
question has no informative word, all its tokens are used.

Deviations (documented choices):

* Head selection and ``r`` in the enhancement layers are computed once per sample and layer, from the attention of
  the prompt's last row, and reused at every decode step (the code recomputes them from each step's row). The bias
  has to be known before the attention runs; per-step selection would need a second QK pass per layer and step.
* ``saliency_layer=None`` (paper, default): the layer with the largest total positive shift; the code uses a fixed
  layer per model (LLaVA-1.5-7B 11, Qwen2-VL-7B 14): pass ``saliency_layer``. ``layers`` defaults to
  ``int(0.375 L) .. int(0.7 L)`` (LLaVA-1.5-7B's 12-22); Qwen2-VL-7B's config is ``layers=5|6|...|18``, strength 4.
* β (the paper's query-scale multiplier) is 1, as in the code. The saliency pass sees no pruner or other decoder.
"""

from __future__ import annotations

import math
import re

import torch

from vlmkit.decoders import register
from vlmkit.decoders.base import Decoder, over_current_keys
from vlmkit.errors import ConfigError
from vlmkit.kernels.interface import LayerAttention
from vlmkit.models.base import PreparedBatch
from vlmkit.runtime.cache import LayeredKVCache
from vlmkit.runtime.hooks import AttentionRequest, GenerationContext, LayerState

FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every either neither no all both half another such what which whose
i me my mine we us our ours you your yours he him his she her hers it its they them their theirs one ones myself
yourself itself themselves who whom whoever whatever whichever where when why how there here
in on at to of from by for with without about above below under over into onto upon off out up down between among
through during before after behind beside besides near inside outside around across along against toward towards
and or but nor so yet if then than because while although though unless whether as
is am are was were be been being do does did done doing have has had having can could will would shall should may
might must not n't 's 're 've 'll 'd
please yes oh ok just also too very really only even
""".split())

WORD = re.compile(r"[A-Za-z0-9']+")


def informative_mask(question: str, offsets: list[tuple[int, int]], start: int) -> list[bool]:
    """Which tokens (character ``offsets`` in the prompt; the question starts at ``start``) overlap an informative
    word of ``question``."""
    spans = [(m.start() + start, m.end() + start) for m in WORD.finditer(question)
             if m.group().lower() not in FUNCTION_WORDS]
    return [any(a < e and s < b for s, e in spans) for a, b in offsets]


def gaze_saliency(attention: torch.Tensor, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention [H, 2, Q, N]``: each informative row's (previous row, row) attention over the ``N`` visual keys.
    Returns the weights ``exp(strength * ŝ)`` ``[N]`` and the total positive shift (for layer selection)."""
    shift = (attention[:, 1] - attention[:, 0]).clamp(min=0)  # [H, Q, N]
    per_head = shift.sum(dim=(1, 2))
    heads = per_head.topk(max(1, attention.shape[0] // 2)).indices
    saliency = shift[heads].mean(dim=(0, 1))
    mean, std = saliency.mean(), saliency.std(unbiased=False)
    saliency = saliency.clamp(mean - 3 * std, mean + 3 * std)
    span = saliency.max() - saliency.min()
    normalised = (saliency - saliency.min()) / span if span > 0 else torch.zeros_like(saliency)
    return torch.exp(strength * normalised), per_head.sum()


def enhancement_bias(attention: torch.Tensor, visual: torch.Tensor, query: torch.Tensor,
                     log_weights: torch.Tensor) -> torch.Tensor:
    """The key bias ``[H, Lk]`` that GIFT's stage B amounts to, from one row's attention ``[H, Lk]``; ``visual`` and
    ``query`` are bool ``[Lk]``, ``log_weights`` ``[Lk]`` (0 off the visual keys)."""
    heads, keys = attention.shape
    half = max(1, heads // 2)
    bias = attention.new_zeros(heads, keys)
    visual_mass = (attention * visual).sum(dim=-1)
    visual_heads = visual_mass.topk(half).indices
    bias[visual_heads] += log_weights * visual
    scaled = (attention[visual_heads] * log_weights.exp() * visual).sum()
    ratio = scaled / visual_mass[visual_heads].sum().clamp(min=1e-12)
    query_heads = (attention * query).sum(dim=-1).topk(half).indices
    bias[query_heads] += torch.log(ratio.clamp(min=1e-12)) * query
    return bias


@register("gift")
class Gift(Decoder):
    def __init__(self, strength: float = 5.0, saliency_layer: int | None = None,
                 layers: list[int] | int | None = None):
        if strength < 0:
            raise ConfigError(f"gift: strength must be >= 0, got {strength}")
        self.strength, self.saliency_layer = float(strength), saliency_layer
        self.layers = None if layers is None else [layers] if isinstance(layers, int) else list(layers)

    def enhanced_layers(self, count: int) -> set[int]:
        layers = self.layers if self.layers is not None else range(int(0.375 * count), max(int(0.7 * count), 1))
        return {l % count for l in layers}

    # -- stage A --------------------------------------------------------------------------------------------------
    def prepare(self, ctx: GenerationContext, inputs: PreparedBatch) -> None:
        ctx.scratch.pop(self.name, None)
        if self.strength == 0.0:
            return
        from vlmkit.runtime.engine import Engine  # the runtime imports the decoders: import it lazily

        adapter, count = ctx.adapter, len(ctx.adapter.layers)
        bare = Engine(adapter, [], attention_backend=ctx.engine.attention_backend)
        pass_ctx = GenerationContext(adapter=adapter, prompts=ctx.prompts, images=ctx.images, engine=bare)
        state, _, _ = bare.initial_state(pass_ctx, inputs)  # unpruned: source_index is the column index
        question, informative = self.question_tokens(ctx, inputs)
        rows = [r.nonzero().squeeze(-1) for r in informative]
        candidates = range(count) if self.saliency_layer is None else [self.saliency_layer % count]
        rotary = adapter.rotary(state.hidden, state.positions)
        cache = LayeredKVCache(count)
        best = [(-math.inf, None)] * inputs.batch_size
        for index in range(max(candidates) + 1):
            key_valid = cache.extend_valid(index, state.valid)
            normed = adapter.layers[index].input_layernorm(state.hidden) if index in candidates else None
            state.hidden = adapter.layers[index](
                state.hidden, attention_mask=None, position_ids=None, **adapter.cache_argument(cache), use_cache=True,
                position_embeddings=rotary, vlmkit_attention=LayerAttention(key_valid, backend=bare.attention_backend),
            )
            if index not in candidates:
                continue
            for b in range(inputs.batch_size):
                queries = torch.cat([rows[b] - 1, rows[b]])
                probs = self.row_attention(ctx, index, normed, state, cache, b, queries)  # [H, 2Q, Lk]
                visual = probs[:, :, inputs.is_visual[b]].unflatten(1, (2, -1))
                weights, total = gaze_saliency(visual, self.strength)
                if float(total) > best[b][0]:
                    best[b] = (float(total), weights)
        log_weights = torch.zeros(inputs.input_ids.shape, device=state.hidden.device)
        for b, (_, weights) in enumerate(best):
            log_weights[b, inputs.is_visual[b]] = weights.log()
        ctx.scratch[self.name] = {"log_weights": log_weights, "question": question, "bias": {}}

    @staticmethod
    def question_tokens(ctx: GenerationContext, inputs: PreparedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Bool ``[B, L]`` masks of the question's tokens and of its informative tokens in the prepared batch."""
        tokenizer, device = ctx.adapter.tokenizer, inputs.input_ids.device
        question = torch.zeros_like(inputs.is_visual)
        informative = torch.zeros_like(inputs.is_visual)
        for b, text in enumerate(ctx.prompts):
            prompt = ctx.adapter.build_prompt(text)
            start = prompt.rfind(text)
            encoded = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=False)
            offsets = encoded["offset_mapping"]
            tail = inputs.attention_mask.shape[1] - 1 - int(inputs.is_visual[b].nonzero().max())  # text after image
            ids = torch.tensor(encoded["input_ids"][-tail:], device=device)
            if start < 0 or tail > len(offsets) or not torch.equal(ids, inputs.input_ids[b, -tail:]):
                raise ConfigError("gift: cannot locate the question tokens in the prompt")
            offsets = offsets[-tail:]
            inside = torch.tensor([s >= start and e <= start + len(text) and e > s for s, e in offsets], device=device)
            chosen = torch.tensor(informative_mask(text, offsets, start), device=device) & inside
            question[b, -tail:] = inside
            informative[b, -tail:] = chosen if chosen.any() else inside
        return question, informative

    @staticmethod
    def row_attention(ctx: GenerationContext, index: int, normed: torch.Tensor, state: LayerState,
                      cache: LayeredKVCache, b: int, rows: torch.Tensor) -> torch.Tensor:
        """Attention probabilities ``[H, len(rows), Lk]`` of prompt ``rows`` of sample ``b`` at layer ``index``,
        from the keys and values the layer just cached (one query row per batch copy, statistics of the kernel)."""
        count, length = len(ctx.adapter.layers), state.valid.shape[1]
        copies = LayeredKVCache(count)
        copies.keys[index] = cache.keys[index][b:b + 1].expand(len(rows), -1, -1, -1)
        copies.values[index] = cache.values[index][b:b + 1].expand(len(rows), -1, -1, -1)
        before = torch.arange(length, device=rows.device)[None, :] < rows[:, None]
        key_valid = torch.cat([state.valid[b:b + 1] & before, torch.ones_like(before[:, :1])], dim=1)
        positions = state.positions[..., b, rows].unsqueeze(-1)  # [Q, 1] or [3, Q, 1]
        hidden = normed[b, rows].unsqueeze(1)
        call = LayerAttention(key_valid, mass_queries=torch.ones(len(rows), 1, device=rows.device), backend="reference")
        ctx.adapter.layers[index].self_attn(
            hidden_states=hidden, position_embeddings=ctx.adapter.rotary(hidden, positions), attention_mask=None,
            **ctx.adapter.cache_argument(copies), vlmkit_attention=call,
        )
        probs = call.stats.key_mass[:, :, :length]  # drop the row's own key (appended last)
        own = call.stats.key_mass[:, :, length:]
        probs = probs.scatter_add(-1, rows.view(-1, 1, 1).expand(-1, probs.shape[1], 1), own)  # put it back
        return probs.transpose(0, 1)

    # -- stage B --------------------------------------------------------------------------------------------------
    def attention(self, ctx: GenerationContext, layer: int, state: LayerState) -> AttentionRequest | None:
        scratch = ctx.scratch.get(self.name)
        if scratch is None or layer not in self.enhanced_layers(len(ctx.adapter.layers)):
            return None
        if ctx.step < 0:
            scratch["bias"][layer] = self.prompt_bias(ctx, layer, state, scratch)
            return None
        return AttentionRequest(key_bias=over_current_keys(scratch["bias"][layer], state))  # [B, H, L_layer]

    def prompt_bias(self, ctx: GenerationContext, layer: int, state: LayerState, scratch: dict) -> torch.Tensor:
        """Stage B's bias over this layer's prompt keys, from the last row's attention; also recompute that row."""
        adapter, module = ctx.adapter, ctx.adapter.layers[layer]
        source = state.source_index.clamp(min=0)
        log_weights = scratch["log_weights"].gather(1, source) * state.is_visual
        question = scratch["question"].gather(1, source) & (state.source_index >= 0)
        rotary = adapter.rotary(state.hidden, state.positions)
        cache = LayeredKVCache(len(adapter.layers))
        call = LayerAttention(state.valid, mass_queries=state.last_token, backend="reference")
        module.self_attn(hidden_states=module.input_layernorm(state.hidden), position_embeddings=rotary,
                         attention_mask=None, **adapter.cache_argument(cache), vlmkit_attention=call)
        bias = torch.stack([
            enhancement_bias(call.stats.key_mass[b], state.is_visual[b], question[b], log_weights[b])
            for b in range(state.hidden.shape[0])
        ])
        cache.keys[layer] = cache.keys[layer][:, :, :-1]
        cache.values[layer] = cache.values[layer][:, :, :-1]
        last = state.hidden[:, -1:]
        scratch["last_row"] = module(
            last, attention_mask=None, position_ids=None, **adapter.cache_argument(cache), use_cache=True,
            position_embeddings=adapter.rotary(last, state.positions[..., -1:]),
            vlmkit_attention=LayerAttention(state.valid, key_bias=bias.to(last.dtype), backend="reference"),
        )
        return bias

    def edit_residual(self, ctx: GenerationContext, layer: int, state: LayerState) -> torch.Tensor | None:
        scratch = ctx.scratch.get(self.name)
        if ctx.step >= 0 or scratch is None or "last_row" not in scratch:
            return None
        hidden = state.hidden.clone()
        hidden[:, -1:] = scratch.pop("last_row")
        return hidden
