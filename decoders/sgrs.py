"""``sgrs``: Saliency-Guided Rejection Sampling.

Paper: "Hallucination Begins Where Saliency Drops" (ICLR 2026, arXiv 2601.20279), Eq. 1-5 and Alg. 1; code
``zhangbaijin/LVLMs-Saliency`` (``do_reject_sample.py``). Spec: decoders.md §4(a)-(b). Combine with ``locore`` by
listing both decoders.

Saliency of a candidate token ``c`` at the position ``P`` that predicts it: with ``Loss = -log p(c | prefix)``, for
each target layer ``l`` and head ``h``, ``S[l, h, j] = |A[l, h, P, j] * dLoss/dA[l, h, P, j]|`` (``A`` the
post-softmax attention); the head mean is l2-normalised over the row's keys, and ``S(c)`` is its mean over the
context keys ``J`` and the target layers. Each step the logits are restricted to the top ``top_k`` tokens; the
sampler's candidate is accepted if ``S(c) >= strength * mean(S of the row's last window accepted tokens)`` (the
threshold is 0 while that history is empty); a rejected candidate is masked out and the sampler redraws from the
rest, up to ``retries`` checks. If every check fails, the top-K candidate with the largest saliency is emitted.

How it is computed (exact, no eager attention maps): only row ``P`` of a layer's attention affects ``Loss``, so the
step is re-run for that one row from the first target layer on, over the running KV cache (``ctx.cache``). In the
target layers every key's value is multiplied by a per-head scale ``e = 1`` (keys and values expanded to the query
heads); ``dLoss/de[h, j] = A[h, P, j] * dLoss/dA[h, P, j]``, so one backward pass gives the signed products for all
keys and heads. One re-run per step, one backward per checked candidate (the code: one uncached full-sequence
forward and backward per candidate).

Options: ``strength`` (alpha, 0.6), ``top_k`` (K, 5), ``retries`` (R, 3), ``window`` (W, 5), ``layers`` (target
layers; default the code's [6, 7, 8] of 32 scaled to the model's depth), ``context``:

* ``"output"`` (paper, default): ``J`` = the previously generated tokens (none for the first two tokens: no check
  then, and those tokens do not enter the history);
* ``"query"`` (code): ``J`` also holds the prompt's text after the image (the question).

Deviations and limits:

* Candidates come from the call's sampler: with ``do_sample=True`` (temperature 1) this is the paper's sampler from
  the renormalised top-K; greedy decoding tries the top-K in probability order (deterministic variant).
* The loss uses the model's own logits; other decoders' residual edits and attention biases in the layers from the
  first target layer on are not replayed in the saliency pass.
* Batch > 1 is supported (rows are independent); beam search is not (SGRS is a sampler): ``ConfigError``.
* A row that ended (EOS) is no longer checked; stop strings are not tracked.
* ``strength=0`` is a no-op (greedy stays greedy); per-row counts go to ``Generation.stats`` (``sgrs_rejections``,
  ``sgrs_fallbacks``); the checks (and fallback choices) of the last call are in ``self.trace``.
"""

from __future__ import annotations

import math

import torch

from vlmkit.decoders import register
from vlmkit.decoders.base import Decoder
from vlmkit.errors import ConfigError
from vlmkit.kernels.interface import LayerAttention
from vlmkit.models.base import PreparedBatch
from vlmkit.runtime.cache import LayeredKVCache
from vlmkit.runtime.hooks import GenerationContext, LayerState

CONTEXTS = ("output", "query")
CODE_LAYERS = (6, 7, 8)  # of LLaVA-1.5-7B's 32 layers (do_reject_sample.py)


class _ScaledValues(LayeredKVCache):
    """The saliency pass's cache: in the target layers, keys and values are expanded to the query heads and every
    value is multiplied by a per-head, per-key scale whose gradient is ``A * dLoss/dA``."""

    def __init__(self, num_layers: int, repeat: int, scales: dict[int, torch.Tensor]):
        super().__init__(num_layers)
        self.repeat, self.scales = repeat, scales

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        key, value = super().update(key, value, layer_idx)
        if layer_idx not in self.scales:
            return key, value
        key = key.repeat_interleave(self.repeat, dim=1)
        value = value.repeat_interleave(self.repeat, dim=1).float() * self.scales[layer_idx]
        return key, value


@register("sgrs")
class SaliencyRejection(Decoder):
    def __init__(self, strength: float = 0.6, top_k: int = 5, retries: int = 3, window: int = 5,
                 layers: list[int] | int | None = None, context: str = "output"):
        if strength < 0:
            raise ConfigError(f"sgrs: strength must be >= 0, got {strength}")
        if top_k < 2 or not 1 <= retries < top_k:
            raise ConfigError(f"sgrs: need top_k >= 2 and 1 <= retries < top_k, got top_k={top_k}, retries={retries}")
        if window < 1:
            raise ConfigError(f"sgrs: window must be at least 1, got {window}")
        if context not in CONTEXTS:
            raise ConfigError(f"sgrs: context must be one of {CONTEXTS}, got {context!r}")
        self.strength, self.top_k, self.window, self.context = float(strength), int(top_k), int(window), context
        self.max_candidate_tries = int(retries)
        self.layers = None if layers is None else [layers] if isinstance(layers, int) else list(layers)
        self.trace: list[dict] = []

    def target_layers(self, count: int) -> list[int]:
        layers = self.layers if self.layers is not None else [l * count // 32 for l in CODE_LAYERS]
        if any(not -count <= l < count for l in layers):
            raise ConfigError(f"sgrs: layers {layers} out of range for a model with {count} layers")
        return sorted({l % count for l in layers})

    # -- bookkeeping ----------------------------------------------------------------------------------------------
    def prepare(self, ctx: GenerationContext, inputs: PreparedBatch) -> None:
        self.trace = []
        ctx.scratch.pop(self.name, None)
        if self.strength == 0.0:
            return
        batch = inputs.batch_size
        ctx.scratch[self.name] = {
            "targets": self.target_layers(len(ctx.adapter.layers)), "prompt_context": {}, "row": None,
            "graph": None, "scores": {}, "history": [[] for _ in range(batch)], "done": [False] * batch,
            "rejections": [0] * batch, "fallbacks": [0] * batch, "pending": [],
        }
        ctx.report("sgrs_rejections", ctx.scratch[self.name]["rejections"])
        ctx.report("sgrs_fallbacks", ctx.scratch[self.name]["fallbacks"])

    def attention(self, ctx: GenerationContext, layer: int, state: LayerState) -> None:
        scratch = ctx.scratch.get(self.name)
        if scratch is None:
            return None
        if ctx.step < 0 and layer in scratch["targets"]:
            prompt = state.text_after_visual if self.context == "query" else torch.zeros_like(state.valid)
            scratch["prompt_context"][layer] = prompt
        if layer == scratch["targets"][0]:  # the input of the first target layer at the predicting row
            scratch["row"] = (state.hidden[:, -1:].detach(), state.positions[..., -1:])
            scratch["graph"], scratch["scores"] = None, {}
        return None

    def edit_logits(self, ctx: GenerationContext, logits: torch.Tensor,
                    hidden_by_layer: dict[int, torch.Tensor]) -> torch.Tensor | None:
        if self.name not in ctx.scratch:
            return None
        kth = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        return logits.masked_fill(logits < kth, float("-inf"))

    def after_step(self, ctx: GenerationContext, tokens: torch.Tensor, parents: torch.Tensor) -> None:
        if ctx.num_beams > 1:
            raise ConfigError("sgrs is a sampler and does not run with beam search; use num_beams=1")
        scratch = ctx.scratch.get(self.name)
        if scratch is None:
            return
        eos = set(ctx.adapter.eos_token_ids)
        for row, token in enumerate(tokens.tolist()):
            value = scratch["scores"].get((row, token))
            if value is not None and not math.isnan(value) and not scratch["done"][row]:
                scratch["history"][row].append(value)
            scratch["done"][row] |= token in eos

    # -- the check ------------------------------------------------------------------------------------------------
    def threshold(self, history: list[float]) -> float:
        recent = history[-self.window:]
        return self.strength * sum(recent) / len(recent) if recent else 0.0

    def accept(self, ctx: GenerationContext, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor | None:
        scratch = ctx.scratch.get(self.name)
        if scratch is None:
            return None
        rows = [b for b in range(tokens.shape[0]) if not scratch["done"][b]]
        fresh = [b for b in rows if (b, int(tokens[b])) not in scratch["scores"]]
        saliency = self.saliency(ctx, tokens, rows)
        accepted = torch.ones_like(tokens, dtype=torch.bool)
        for b in rows:
            value, tau = saliency[b], self.threshold(scratch["history"][b])
            accepted[b] = math.isnan(value) or value >= tau
            if b in fresh:
                self.trace.append({"step": ctx.step, "row": b, "token": int(tokens[b]), "saliency": value,
                                   "threshold": tau, "accepted": bool(accepted[b])})
                scratch["rejections"][b] += int(not accepted[b])
        scratch["pending"] = (~accepted).nonzero().squeeze(-1).tolist()
        return accepted

    def fallback(self, ctx: GenerationContext, logits: torch.Tensor, first: torch.Tensor) -> torch.Tensor | None:
        scratch = ctx.scratch[self.name]
        rows = scratch["pending"]
        candidates = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).indices  # [B, K]
        values = torch.stack([torch.tensor(self.saliency(ctx, candidates[:, k], rows)) for k in
                              range(candidates.shape[1])], dim=1).nan_to_num(float("-inf"))
        chosen = first.clone()
        for b in rows:
            if bool(torch.isfinite(values[b]).any()):
                chosen[b] = candidates[b, int(values[b].argmax())]
            scratch["fallbacks"][b] += 1
            self.trace.append({"step": ctx.step, "row": b, "token": int(chosen[b]), "fallback": True,
                               "saliency": scratch["scores"].get((b, int(chosen[b])), math.nan)})
        return chosen

    # -- saliency -------------------------------------------------------------------------------------------------
    def saliency(self, ctx: GenerationContext, tokens: torch.Tensor, rows: list[int]) -> list[float]:
        """``S(tokens[b])`` for each of ``rows`` (NaN elsewhere and where the context is empty); cached per step."""
        scratch = ctx.scratch[self.name]
        scores = scratch["scores"]
        need = [b for b in rows if (b, int(tokens[b])) not in scores]
        if need:
            if scratch["graph"] is None:
                scratch["graph"] = self.saliency_graph(ctx)
            log_probs, scales, context = scratch["graph"]
            index = torch.tensor(need, device=log_probs.device)
            layers = sorted(scales)
            with torch.enable_grad():
                loss = -log_probs[index, tokens[index]].sum()
                grads = torch.autograd.grad(loss, [scales[l] for l in layers], retain_graph=True)
            total = 0.0
            for layer, grad in zip(layers, grads):
                per_key = grad.squeeze(-1).abs().mean(dim=1)  # [B, Lk] head mean of |A * dLoss/dA|
                per_key = per_key / per_key.norm(dim=-1, keepdim=True).clamp(min=1e-30)
                mask = context[layer]
                total = total + (per_key * mask).sum(dim=-1) / mask.sum(dim=-1)  # NaN where J is empty
            values = (total / len(layers)).tolist()
            for b in need:
                scores[(b, int(tokens[b]))] = values[b]
        result = [math.nan] * tokens.shape[0]
        for b in rows:
            result[b] = scores[(b, int(tokens[b]))]
        return result

    def saliency_graph(self, ctx: GenerationContext):
        """Re-run this step's predicting row from the first target layer with scaled values (with gradients).
        Returns the log-probabilities ``[B, V]``, the scales per target layer and the context masks ``J``."""
        scratch, adapter, cache = ctx.scratch[self.name], ctx.adapter, ctx.cache
        targets, count = scratch["targets"], len(adapter.layers)
        heads = adapter.text_config.num_attention_heads
        repeat = heads // (getattr(adapter.text_config, "num_key_value_heads", None) or heads)
        hidden, positions = scratch["row"]
        batch = hidden.shape[0]
        scales, context = {}, {}
        with torch.enable_grad():
            for layer in targets:
                keys = cache.keys[layer].shape[-2]
                scales[layer] = torch.ones(batch, heads, keys, 1, device=hidden.device, requires_grad=True)
                prompt = scratch["prompt_context"][layer]
                generated = torch.ones(batch, keys - prompt.shape[1], dtype=torch.bool, device=hidden.device)
                mask = torch.cat([prompt, generated], dim=1) & cache.valid[layer]
                mask[:, -1] = False  # the predicting row's own key
                context[layer] = mask.float()
            rerun = _ScaledValues(count, repeat, scales)
            for layer in range(targets[0], count):
                rerun.keys[layer] = cache.keys[layer][:, :, :-1].detach()
                rerun.values[layer] = cache.values[layer][:, :, :-1].detach()
            rotary = adapter.rotary(hidden, positions)
            for layer in range(targets[0], count):
                hidden = adapter.layers[layer](
                    hidden, attention_mask=None, position_ids=None, **adapter.cache_argument(rerun), use_cache=True,
                    position_embeddings=rotary,
                    vlmkit_attention=LayerAttention(cache.valid[layer], backend="reference"),
                )
            log_probs = adapter.lm_head(adapter.final_norm(hidden))[:, -1].float().log_softmax(dim=-1)
        return log_probs, scales, context
