"""The engine: vlmkit's own prefill and decode loops over a stock HF model's decoder layers.

One call of :meth:`Engine.generate` does, in order (hook names in brackets, see ``hooks.py``):

0. run extra passes [prepare]; a method may answer the whole batch without the model [early_exit];
1. embed the prompt tokens; run the vision tower and projector; let the pruner choose visual tokens [select_visual];
2. compute position ids on the unpruned sequence [positions]; pack the kept tokens (left-padded);
3. prefill: walk the decoder layers; before each, gather attention requests [attention]; after each, edit the
   residual [edit_residual] and let the pruner drop tokens [after_layer]. Rows that ask about the same image object
   encode it once and, when the packed prefix up to its last visual token is identical and no intervention acts
   beyond select_visual, prefill that prefix once, packed with every row's rest of the prompt, and decode over it
   without copies (``_prefill_shared``);
4. decode: one token per row through the same walk; edit logits [edit_logits]; choose tokens (greedy, sampling or
   beam search) and let decoders reject candidates [accept, fallback]; stop at EOS, stop strings or the token limit.
   When every intervention that acts during decoding does so inside the step (``decode_in_graph``), the steps run
   over a static cache as a CUDA graph (static_decode.py).

When every intervention that acts inside the language model's prefill says at which layers (``prefill_layers``),
step 3 calls their hooks eagerly and runs the layers in fixed-shape buffers of bucketed length, replayed as CUDA
graphs on CUDA (static_prefill.py; a layer whose attention a hook biases, masks or edits runs eagerly); the vision
forward of small batches replays as a CUDA graph where the adapter allows it (LLaVA's CLIP tower, Qwen's ViT with its
grid layout precomputed; ``graphs.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from vlmkit.errors import ConfigError, InputError
from vlmkit.kernels.interface import LayerAttention
from vlmkit.kernels.masks import TritonMask, segment_mask
from vlmkit.kernels.reference import AttentionStats
from vlmkit.models.base import Adapter, PreparedBatch
from vlmkit.runtime.cache import LayeredKVCache
from vlmkit.runtime.graphs import POOL_SIZE, GraphedCalls, LRUPool, compile_dynamic
from vlmkit.runtime.hooks import HOOKS, GenerationContext, Intervention, LayerState, Selection, last_visual_index
from vlmkit.runtime.sampling import BeamSearch, SamplingConfig, choose_tokens
from vlmkit.runtime.static_decode import MIN_NEW_TOKENS, StaticKVCache, decoder_layout, static_decoder
from vlmkit.runtime.static_prefill import (
    LAYER_HOOKS,
    MAX_GRAPH_IMAGES,
    MAX_GRAPH_TOKENS,
    SEGMENT_POOL_SIZE,
    acting_layer,
    bucketed_tokens,
    static_segment,
)

StreamCallback = Callable[[int, str], None]
# compile=True: layers replayed as CUDA graphs (static prefill segments, static decode steps) are compiled, since a
# replay pays nothing for their host work; eager walks only over more tokens than this (batch x bucketed length).
# Smaller eager walks are host-bound: compiled layers' guards and wrappers cost more than fusion saves there
# (docs/performance.md)
COMPILE_MIN_TOKENS = 2048

# Decode: "auto" replays steps over the static cache as a CUDA graph on CUDA when no intervention acts during decoding,
# for answers of MIN_NEW_TOKENS or more or when the previous call had the same layout; "static" uses the static cache
# whenever no intervention acts during decoding (eager on the CPU); "dynamic" never. Prefill: "auto" replays the runs
# of layers where no intervention acts as bucketed CUDA graphs on CUDA when batch x bucket <= MAX_GRAPH_TOKENS;
# "static" runs those bucketed segments whenever the interventions allow (eager on the CPU); "dynamic" never.
STATIC_MODES = ("auto", "static", "dynamic")


@dataclass
class DecodeSteps:
    """A generation's decode step, ``run(tokens [B], step) -> next logits [B, V]``, and the cache it writes
    (beam search reorders it)."""

    run: Callable[[torch.Tensor, int], torch.Tensor]
    cache: LayeredKVCache | StaticKVCache


@dataclass
class RowResult:
    token_ids: list[int]
    text: str
    stats: dict = field(default_factory=dict)


class Engine:
    """Runs generation for one adapter with one pruner and any number of decoders."""

    def __init__(self, adapter: Adapter, interventions: Sequence[Intervention] = (), attention_backend: str = "auto",
                 decode: str = "auto", prefill: str = "auto", share_image_prefix: bool = True, compile: bool = False):
        for kind, mode in (("decode", decode), ("prefill", prefill)):
            if mode not in STATIC_MODES:
                raise ConfigError(f"unknown {kind} mode {mode!r}; choose one of {STATIC_MODES}")
        self.adapter = adapter
        self.interventions = list(interventions)
        self.attention_backend = attention_backend
        self.decode, self.prefill = decode, prefill
        self.share_image_prefix = share_image_prefix
        self.compile = compile
        self.static_decoders = LRUPool(POOL_SIZE)
        self.last_short_layout: tuple | None = None  # the decode layout of the last call with a short answer
        self.static_prefills = LRUPool(SEGMENT_POOL_SIZE)
        self.vision_graphs = GraphedCalls()

    @property
    def graphs_allowed(self) -> bool:
        """Whether CUDA graphs may replace eager work: a graph captures one device's stream, so only for a model on
        one GPU (not one that ``device_map`` spread over several, whose layers run on other devices' streams)."""
        spread = set(getattr(self.adapter.model, "hf_device_map", {}).values())
        return self.adapter.device.type == "cuda" and len(spread) <= 1

    @functools.cached_property
    def graph_pool(self):
        """One CUDA-graph memory pool for all of this engine's decode graphs."""
        return torch.cuda.graph_pool_handle()

    def _with(self, hook: str) -> list[Intervention]:
        return [i for i in self.interventions if i.overrides(hook)]

    @property
    def decode_replays(self) -> bool:
        """Every intervention that acts during decoding does so inside the step (``decode_in_graph``): the steps may
        replay as a graph and run ahead of the host."""
        return all(i.decode_in_graph or not i.acts_in_decode for i in self.interventions)

    # -- sequence packing -----------------------------------------------------------------------------------------
    @staticmethod
    def compact(state: LayerState, keep: torch.Tensor) -> LayerState:
        """Keep the tokens where ``keep`` is True (in order), left-padded to the longest row."""
        keep = keep & state.valid
        counts = keep.sum(dim=1)
        length = int(counts.max())
        rows, cols = keep.nonzero(as_tuple=True)
        target = length - counts[rows] + (keep.cumsum(dim=1) - 1)[rows, cols]
        batch = keep.shape[0]

        def pack(tensor: torch.Tensor, fill, batch_dim: int = 0) -> torch.Tensor:
            if batch_dim == 1:  # M-RoPE positions [3, B, L]
                out = tensor.new_full((tensor.shape[0], batch, length), fill)
                out[:, rows, target] = tensor[:, rows, cols]
                return out
            out = tensor.new_full((batch, length, *tensor.shape[2:]), fill)
            out[rows, target] = tensor[rows, cols]
            return out

        return LayerState(
            hidden=pack(state.hidden, 0),
            valid=pack(state.valid, False),
            is_visual=pack(state.is_visual, False),
            positions=pack(state.positions, 0, batch_dim=1 if state.positions.dim() == 3 else 0),
            source_index=pack(state.source_index, -1),
        )

    # -- the layer walk -------------------------------------------------------------------------------------------
    def attention_call(self, ctx: GenerationContext, layer: int, state: LayerState, cache,
                       attending: Sequence[Intervention] = (), mask_mod: TritonMask | None = None) -> LayerAttention:
        """Layer ``layer``'s attention request: the state's key validity, the cache's shared prefix, ``mask_mod``
        and what the ``attending`` interventions ask for."""
        requests = [r for i in attending if (r := i.attention(ctx, layer, state)) is not None]
        call = LayerAttention(key_valid=state.key_valid, backend=self.attention_backend, mask_mod=mask_mod,
                              prefix=cache.shared_prefix(layer))
        for request in requests:
            call.key_bias = _add(call.key_bias, request.key_bias)
            call.key_abs_gain = _add(call.key_abs_gain, request.key_abs_gain)
            call.mask_mod = _and_masks(call.mask_mod, request.mask_mod)
            call.probs_mod = _compose(call.probs_mod, request.probs_mod)
            if request.mass_queries is not None:
                if call.mass_queries is not None and not torch.equal(call.mass_queries, request.mass_queries):
                    raise ConfigError(f"two interventions ask for different attention statistics at layer {layer}")
                call.mass_queries = request.mass_queries
        return call

    def run_layers(
        self, ctx: GenerationContext, state: LayerState, cache: LayeredKVCache, hidden_layers: set[int],
        start: int = 0, stop: int | None = None, hooks: bool = True, mask_mod: TritonMask | None = None,
        compiled: bool = False,
    ) -> tuple[LayerState, dict[int, torch.Tensor], list[torch.Tensor]]:
        """Walk the decoder layers ``start`` to ``stop`` (default: the last) once; ``hooks=False`` calls no layer
        hook (a static prefill segment); ``mask_mod`` narrows every layer's attention; ``compiled`` runs the layers
        through ``torch.compile`` (:func:`compiled_layer_forward`).
        Returns the final state, the requested last-position hidden states and, in the prefill, the number of visual
        tokens of each row that each walked layer processed."""
        prefill = ctx.step < 0
        attending = self._with("attention") if hooks else []
        pruners = self._with("after_layer") if prefill and hooks else []
        editors = self._with("edit_residual") if hooks else []
        rotary = self.adapter.rotary(state.hidden, state.positions)
        collected, visual_counts = {}, []
        for index in range(start, len(self.adapter.layers) if stop is None else stop):
            if prefill:
                visual_counts.append(state.is_visual.sum(dim=1))
            state.key_valid = cache.extend_valid(index, state.valid)
            call = self.attention_call(ctx, index, state, cache, attending, mask_mod)
            state.hidden = self.forward_layer(index, state, cache, call, rotary, compiled)
            after = self._after_layer(ctx, index, state, call.stats, editors, pruners)
            if after is not state:
                state, rotary = after, self.adapter.rotary(after.hidden, after.positions)
            if index in hidden_layers:
                collected[index] = state.hidden[:, -1]
        return state, collected, visual_counts

    def forward_layer(self, index: int, state: LayerState, cache, call: LayerAttention,
                      rotary: tuple[torch.Tensor, ...], compiled: bool = False) -> torch.Tensor:
        """Decoder layer ``index`` on ``state.hidden`` with the attention request ``call`` (its statistics land in
        ``call.stats``); ``compiled``: through :func:`compiled_layer_forward`. Returns the layer's output."""
        forward = compiled_layer_forward() if compiled else layer_forward
        return forward(self.adapter.layers[index], state.hidden, position_embeddings=rotary, vlmkit_attention=call,
                       **self.adapter.cache_argument(cache))

    def _after_layer(self, ctx, index: int, state: LayerState, stats: AttentionStats | None,
                     editors: list[Intervention], pruners: list[Intervention]) -> LayerState:
        """The hooks after layer ``index``: residual edits (in place), then pruning. Returns ``state`` or, when a
        pruner dropped tokens before the last layer, the compacted state."""
        for editor in editors:
            if (edited := editor.edit_residual(ctx, index, state)) is not None:
                state.hidden = edited
        for pruner in pruners:
            keep = pruner.after_layer(ctx, index, state, stats)
            if keep is not None and index < len(self.adapter.layers) - 1:
                state = self.compact(state, keep | ~state.is_visual)
        return state

    def _hidden_layers(self) -> set[int]:
        num_layers = len(self.adapter.layers)
        return {l % num_layers for i in self._with("edit_logits") for l in i.logit_hidden_layers}

    def _logits(self, ctx, last_hidden: torch.Tensor, collected: dict[int, torch.Tensor]) -> torch.Tensor:
        """The next logits ``[B, V]`` from each row's last hidden state ``[B, D]``."""
        logits = self.adapter.lm_head(self.adapter.final_norm(last_hidden[:, None]))[:, -1].float()
        for decoder in self._with("edit_logits"):
            if (edited := decoder.edit_logits(ctx, logits, collected)) is not None:
                logits = edited
        return logits

    # -- prefill --------------------------------------------------------------------------------------------------
    def initial_state(
        self, ctx: GenerationContext, batch: PreparedBatch, groups: tuple[torch.Tensor, list[int]] | None = None,
    ) -> tuple[LayerState, torch.Tensor, list[int]]:
        """Embed text and images (each image once when ``groups`` share them), apply the vision-side pruner, and
        pack the sequence."""
        hidden = self.adapter.embed_tokens(batch.input_ids)
        keep = batch.attention_mask.bool().clone()
        selectors = self._with("select_visual")
        with_attention = any(p.needs_vision_attention for p in selectors)
        if groups is None:
            visual = self.adapter.encode_images(batch, with_attention, self._vision_graphs(batch.batch_size),
                                                self.compile)
        else:
            row_group, leaders = groups
            unique = self.adapter.encode_images(self.adapter.select_rows(batch, leaders), with_attention,
                                                self._vision_graphs(len(leaders)), self.compile)
            visual = [dataclasses.replace(unique[group], image_index=row)
                      for row, group in enumerate(row_group.tolist())]
        selections: list[Selection | None] = [None] * len(visual)
        for pruner in selectors:
            if (chosen := pruner.select_visual(ctx, visual)) is not None:
                selections = chosen
        for row, (tokens, placeholders) in enumerate(zip(visual, batch.is_visual.sum(dim=1).tolist())):
            if placeholders != tokens.embeds.shape[0]:
                raise InputError(
                    f"sample {row}: the prompt has {placeholders} image placeholder tokens but the vision encoder "
                    f"produced {tokens.embeds.shape[0]} tokens; build prompts with the model's processor"
                )
        hidden[batch.is_visual] = torch.cat([tokens.embeds for tokens in visual]).to(hidden.dtype)  # row-major order
        for row, (tokens, selection) in enumerate(zip(visual, selections)):
            if selection is not None:
                slots = batch.is_visual[row].nonzero().squeeze(-1)
                dropped = torch.ones(slots.numel(), dtype=torch.bool, device=slots.device)
                dropped[selection.keep] = False
                keep[row, slots[dropped]] = False
                if selection.embeds is not None:
                    hidden[row, slots[selection.keep]] = selection.embeds.to(hidden.dtype)
        positions, next_position = self.adapter.position_ids(batch)
        for intervention in self._with("positions"):
            if (replaced := intervention.positions(ctx, positions, batch.is_visual)) is not None:
                positions = replaced
        state = LayerState(
            hidden=hidden,
            valid=batch.attention_mask.bool(),
            is_visual=batch.is_visual.clone(),
            positions=positions,
            source_index=torch.arange(batch.input_ids.shape[1], device=hidden.device).expand_as(batch.input_ids),
        )
        visual_in = batch.is_visual.sum(dim=1).tolist()
        return self.compact(state, keep), next_position, visual_in

    # -- generate -------------------------------------------------------------------------------------------------
    @torch.no_grad()  # not inference_mode: hooks may run their own passes with gradients (``torch.enable_grad``)
    def generate(
        self,
        ctx: GenerationContext,
        batch: PreparedBatch,
        *,
        max_new_tokens: int,
        sampling: SamplingConfig,
        seed: int | None = None,
        stop: Sequence[str] = (),
        stream: StreamCallback | None = None,
    ) -> list[RowResult]:
        ctx.engine, ctx.max_new_tokens = self, max_new_tokens
        for intervention in self._with("prepare"):
            intervention.prepare(ctx, batch)
        for intervention in self._with("early_exit"):
            answers = intervention.early_exit(ctx, batch)
            if answers is not None and all(a is not None for a in answers):
                return self._answered(ctx, batch, answers, stop)
        device = self.adapter.device
        generator = None
        if sampling.do_sample:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed if seed is not None else torch.seed())

        clock = _Clock(device)
        shared_images = self._shared_images(ctx, batch)
        state, next_position, visual_in = self.initial_state(ctx, batch, shared_images)
        visual_kept = state.is_visual.sum(dim=1).tolist()
        cache = ctx.cache = LayeredKVCache(len(self.adapter.layers))
        ctx.step = -1
        # a shared prefill must not depend on the rest of the prompt: no intervention may act beyond select_visual
        prefill_shareable = all(not i.overrides(hook) for i in self.interventions for hook in HOOKS
                                if hook != "select_visual")
        groups = None
        if shared_images is not None and prefill_shareable:
            groups = self._shared_prefixes(state, shared_images[0])
        if groups is not None:
            last_hidden, visual_counts, kept_visual = self._prefill_shared(ctx, batch, state, cache, *groups)
            logits = self._logits(ctx, last_hidden, {})
        else:
            state, logits, visual_counts = self.prefill_state(ctx, state, cache)
            kept_visual = functools.partial(_kept_visual_indices, batch.is_visual, state)
        clock.mark()  # no host synchronisation from the prefill's launch to the first decoded tokens

        decoder = _BeamDecoder if sampling.num_beams > 1 else _TokenDecoder
        rows = decoder(self, ctx, cache, next_position, max_new_tokens, sampling, generator, stop, stream).run(logits)
        clock.mark()
        prefill_s, decode_s = clock.seconds()
        visual_per_layer = torch.stack(visual_counts, dim=1).tolist()
        kept_visual = kept_visual()
        text_tokens = (batch.attention_mask.sum(dim=1) - batch.is_visual.sum(dim=1)).tolist()
        for row, result in enumerate(rows):
            result.stats = {
                "visual_tokens_in": visual_in[row],
                "visual_tokens_kept": visual_kept[row],
                "visual_tokens_by_layer": visual_per_layer[row],
                "visual_tokens_mean_over_layers": sum(visual_per_layer[row]) / len(visual_per_layer[row]),
                "prefill_tflops": self.prefill_flops([text_tokens[row] + n for n in visual_per_layer[row]]) / 1e12,
                "kept_visual_indices": kept_visual[row],
                "prefill_s": prefill_s,
                "decode_s": decode_s,
                "new_tokens": len(result.token_ids),
            }
            _add_method_stats(result, ctx, row)
        return rows

    def _vision_graphs(self, images: int) -> GraphedCalls | None:
        """Where the adapter may replay its vision forward as a CUDA graph (``prefill`` not dynamic, CUDA, a small
        batch of images), else None."""
        if self.prefill == "dynamic" or not self.graphs_allowed or images > MAX_GRAPH_IMAGES:
            return None
        return self.vision_graphs

    def prefill_state(self, ctx, state: LayerState,
                      cache: LayeredKVCache) -> tuple[LayerState, torch.Tensor, list[torch.Tensor]]:
        """The language-model prefill of a packed sequence (``prefill_walk``). Returns the final state, the next logits
        ``[B, V]`` and the visual tokens of each row that each layer processed."""
        state, collected, visual_counts = self.prefill_walk(ctx, state, cache)
        return state, self._logits(ctx, state.hidden[:, -1], collected), visual_counts

    def prefill_walk(self, ctx, state: LayerState, cache: LayeredKVCache, segments: torch.Tensor | None = None,
                     ) -> tuple[LayerState, dict[int, torch.Tensor], list[torch.Tensor]]:
        """Static segments where the interventions allow them (``static_prefill.py``), else the dynamic walk; returns
        what :meth:`run_layers` returns. ``segments``: each token's segment of a shared-prefix sequence
        (:func:`~vlmkit.kernels.masks.segment_mask`); no intervention may then act at a layer."""
        acting = self._static_prefill_layers(state)
        if acting is not None:
            state, visual_counts = self._static_walk(ctx, state, cache, acting, segments)
            return state, {}, visual_counts
        return self.run_layers(ctx, state, cache, self._hidden_layers(), compiled=self._compiles_eagerly(state),
                               mask_mod=None if segments is None else segment_mask(segments))

    def _compiles_eagerly(self, state: LayerState) -> bool:
        """Whether an eager walk over ``state`` runs compiled layers: with ``compile``, above ``COMPILE_MIN_TOKENS``."""
        return self.compile and bucketed_tokens(state) > COMPILE_MIN_TOKENS

    def _static_prefill_layers(self, state: LayerState) -> set[int] | None:
        """The layers at which interventions act when this prefill runs in static segments (``static_prefill.py``);
        None when it runs on the dynamic walk (the mode, an ``edit_logits`` hook, an intervention whose layer hooks
        may act at any layer, or a prefill too large for graphs to pay)."""
        if self.prefill == "dynamic" or self._with("edit_logits"):
            return None
        acting: set[int] = set()
        for intervention in self.interventions:
            if any(intervention.overrides(hook) for hook in LAYER_HOOKS):
                layers = intervention.prefill_layers(len(self.adapter.layers))
                if layers is None:
                    return None
                acting |= layers
        if self.prefill == "static" or (self.graphs_allowed and bucketed_tokens(state) <= MAX_GRAPH_TOKENS):
            return acting
        return None

    def _static_walk(self, ctx, state: LayerState, cache: LayeredKVCache, acting: set[int],
                     segments: torch.Tensor | None = None) -> tuple[LayerState, list[torch.Tensor]]:
        """The prefill walk with the layers at which interventions act run by :meth:`_acting_layer` and the runs of
        layers between them replayed as static segments. Returns the final state and the visual tokens per layer."""
        num_layers = len(self.adapter.layers)
        visual_counts: list[torch.Tensor] = []
        layer = 0
        while layer < num_layers:
            if layer in acting:
                counts = [state.is_visual.sum(dim=1)]
                state = self._acting_layer(ctx, state, cache, layer)
                layer += 1
            else:
                stop = min((l for l in acting if l > layer), default=num_layers)
                counts = [state.is_visual.sum(dim=1)] * (stop - layer)
                segment = static_segment(self, state, layer, stop, segmented=segments is not None)
                state = segment.run(ctx, state, cache, segments)
                layer = stop
            visual_counts += counts
        return state, visual_counts

    def _acting_layer(self, ctx, state: LayerState, cache: LayeredKVCache, layer: int) -> LayerState:
        """One layer at which interventions act, within a static walk: its hooks run eagerly, each once; the layer
        itself runs as a static :class:`~vlmkit.runtime.static_prefill.ActingLayer` when its attention request asks
        at most for the statistics of query rows given as a tensor (a pruner's ranking), else eagerly."""
        state.key_valid = cache.extend_valid(layer, state.valid)
        call = self.attention_call(ctx, layer, state, cache, self._with("attention"))
        if call.only_statistics and not isinstance(call.mass_queries, tuple):
            graphed = acting_layer(self, state, layer, statistics=call.mass_queries is not None)
            state, stats = graphed.run_with_statistics(ctx, state, cache, call.mass_queries)
        else:
            rotary = self.adapter.rotary(state.hidden, state.positions)
            state.hidden = self.forward_layer(layer, state, cache, call, rotary, self._compiles_eagerly(state))
            stats = call.stats
        return self._after_layer(ctx, layer, state, stats, self._with("edit_residual"), self._with("after_layer"))

    # -- shared image prefixes ------------------------------------------------------------------------------------
    def _shared_images(self, ctx, batch: PreparedBatch) -> tuple[torch.Tensor, list[int]] | None:
        """Rows that ask about the same image (the same object in ``ctx.images``) with the same prompt tokens up to
        its last visual token: each row's group ``[B]`` and each group's first row; the vision tower encodes each
        group's image once. None when no two rows share or a row has no token after its image."""
        if not self.share_image_prefix or len({id(image) for image in ctx.images}) == batch.batch_size:
            return None
        ids = batch.input_ids
        index = torch.arange(ids.shape[1], device=ids.device)
        first_real = torch.where(batch.attention_mask.bool(), index, ids.shape[1]).amin(dim=1)  # rows are left-padded
        starts, stops = torch.stack([first_real, last_visual_index(batch.is_visual) + 1]).tolist()
        if min(stops) < 1 or max(stops) == ids.shape[1]:
            return None
        rows = ids.tolist()
        return _groups([(id(image), tuple(row[start:stop])) for image, row, start, stop
                        in zip(ctx.images, rows, starts, stops)], ids.device)

    @staticmethod
    def _shared_prefixes(state: LayerState, image_group: torch.Tensor) -> tuple[torch.Tensor, list[int]] | None:
        """Of the rows that share an image, those whose packed prefixes (hidden states and positions) are identical
        after the vision-side pruner: the groups that may share one prefill, or None. Each row is compared with its
        image's first row at once; rows that differ (a pruner chose per row) are then matched one by one."""
        index = torch.arange(state.valid.shape[1], device=state.valid.device)
        in_prefix = state.valid & (index <= last_visual_index(state.is_visual)[:, None])
        prefix = Engine.compact(state, in_prefix)  # equal prefixes: equal rows, left-padded alike
        positions = prefix.positions if prefix.positions.dim() == 3 else prefix.positions.unsqueeze(0)
        image_group = image_group.tolist()
        first = [image_group.index(group) for group in image_group]
        like_first = ((prefix.hidden == prefix.hidden[first]).flatten(1).all(dim=1)
                      & (positions == positions[:, first]).all(dim=2).all(dim=0)
                      & (prefix.valid == prefix.valid[first]).all(dim=1)).tolist()
        keys, seen = [], {}
        for row, (group, same) in enumerate(zip(image_group, like_first)):
            if same:
                keys.append(first[row])
                continue
            mine = (prefix.hidden[row], positions[:, row], prefix.valid[row])
            candidates = seen.setdefault(group, [])
            match = next((other for other, theirs in candidates if all(map(torch.equal, mine, theirs))), None)
            if match is None:
                candidates.append((row, mine))
                match = row
            keys.append(match)
        return _groups(keys, index.device)

    def _prefill_shared(self, ctx, batch: PreparedBatch, state: LayerState, cache: LayeredKVCache,
                        groups: torch.Tensor, leaders: list[int]):
        """Image-prefix reuse: each group's prompt prefix (up to the image's last visual token) and the rest of every
        row in the group, packed as one sequence ``[prefix, rest of row a, rest of row b, ...]``, prefill once with a
        segment mask: each rest sees the prefix and itself, as in its own prompt. The cache then holds each group's
        sequence once; every row decodes over its prefix and rest (``LayeredKVCache.share_prefix``) and its own new
        tokens. Positions are the unshared ones, so the logits are those of the unshared prefill up to rounding.
        Returns each row's last hidden state, the visual tokens per layer and a function that lists the kept visual
        indices (called after decoding: it synchronises with the GPU)."""
        packed, segments, last = _pack_groups(state, groups, leaders)
        packed, _, visual_counts = self.prefill_walk(ctx, packed, cache, segments)
        rows = torch.arange(len(groups), device=groups.device)
        own = segments[groups]
        cache.share_prefix(groups, cache.valid[0][groups] & ((own == 0) | (own == rows[:, None] + 1)))

        def kept_visual() -> list[list[int]]:
            by_group = _kept_visual_indices(batch.is_visual[leaders], packed)
            return [by_group[group] for group in groups.tolist()]

        return packed.hidden[groups, last], [counts[groups] for counts in visual_counts], kept_visual

    def _answered(self, ctx, batch: PreparedBatch, answers: list[list[int]], stop: Sequence[str]) -> list[RowResult]:
        """Rows answered by ``early_exit``: the model never ran (no visual token entered it)."""
        rows = []
        for row, ids in enumerate(answers):
            ids = list(ids)[: ctx.max_new_tokens]
            text = self.adapter.tokenizer.decode(ids, skip_special_tokens=True)
            if (cut := _first_stop(text, stop)) >= 0:
                text = text[:cut]
            result = RowResult(token_ids=ids, text=text.strip(), stats={
                "visual_tokens_in": int(batch.is_visual[row].sum()), "visual_tokens_kept": 0,
                "visual_tokens_by_layer": [0] * len(self.adapter.layers), "visual_tokens_mean_over_layers": 0.0,
                "prefill_tflops": 0.0, "kept_visual_indices": [], "prefill_s": 0.0, "decode_s": 0.0,
                "new_tokens": len(ids),
            })
            _add_method_stats(result, ctx, row)
            rows.append(result)
        return rows

    def prefill_flops(self, tokens_by_layer: list[int]) -> float:
        """Estimated FLOPs of one sample's language-model prefill, from the tokens each layer processed:
        ``sum_l 2 n_l P + 2 n_l^2 d`` (``P`` the layer's matrix parameters, ``d`` the attention width, causal
        attention counted as half of ``4 n^2 d``) plus the final vocabulary projection of one position. The vision
        encoder and the methods' own extra passes are not counted."""
        config = self.adapter.text_config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        width = config.num_attention_heads * head_dim
        flops = sum(2 * n * params + 2 * n * n * width for n, params in zip(tokens_by_layer, self._layer_params))
        return float(flops + 2 * self.adapter.lm_head.weight.numel())

    @functools.cached_property
    def _layer_params(self) -> list[int]:
        return [sum(p.numel() for p in layer.parameters() if p.dim() == 2) for layer in self.adapter.layers]

    def decode_step(self, ctx, cache, tokens: torch.Tensor, positions: torch.Tensor,
                    compiled: bool = False) -> torch.Tensor:
        """Feed one token per row at ``positions`` (``[B, 1]`` or ``[3, B, 1]``); return the next logits ``[B, V]``;
        ``compiled``: through compiled layers (the static decode step with ``compile``)."""
        hidden = self.adapter.embed_tokens(tokens[:, None])
        batch = tokens.shape[0]
        state = LayerState(
            hidden=hidden,
            valid=torch.ones(batch, 1, dtype=torch.bool, device=hidden.device),
            is_visual=torch.zeros(batch, 1, dtype=torch.bool, device=hidden.device),
            positions=positions,
            source_index=torch.full((batch, 1), -1, device=hidden.device),
        )
        state, collected, _ = self.run_layers(ctx, state, cache, self._hidden_layers(), compiled=compiled)
        return self._logits(ctx, state.hidden[:, -1], collected)

    def decode_steps(self, ctx, cache: LayeredKVCache, next_position: torch.Tensor) -> DecodeSteps:
        """The decode step of this generation: the static cache (and a CUDA graph on CUDA) when the decode mode and
        the interventions allow it (``static_decode.py``), else the dynamic walk over ``cache``."""
        if self.decode_replays:
            layout = decoder_layout(cache, next_position, ctx.max_new_tokens, ctx.num_beams)
            if self._decodes_static(ctx, layout):
                decoder = static_decoder(self, cache, next_position, layout)
                return DecodeSteps(functools.partial(decoder.step, ctx), decoder.cache)
        return DecodeSteps(lambda tokens, step: self.decode_step(
            ctx, cache, tokens, self.adapter.decode_positions(next_position, step)), cache)

    def _decodes_static(self, ctx, layout: tuple) -> bool:
        if self.decode != "auto":
            return self.decode == "static"
        if not self.graphs_allowed or ctx.max_new_tokens < 2:  # one new token: no decode step
            return False
        if ctx.max_new_tokens >= MIN_NEW_TOKENS:
            return True
        recurring, self.last_short_layout = layout == self.last_short_layout, layout
        return recurring


class _TokenDecoder:
    """Greedy or sampled decoding, one token per row per step, with candidate checks, stop strings and streaming.

    When no intervention acts during decoding, the next step is queued on the GPU before the host reads this step's
    tokens (EOS, stop strings, streaming): the host's bookkeeping and the next step's launch overlap the GPU's work.
    A batch whose rows all stop then computes one step that nobody reads; the tokens are the same.
    """

    def __init__(self, engine: Engine, ctx, cache, next_position, max_new_tokens, sampling, generator, stop, stream):
        self.engine, self.ctx, self.cache, self.next_position = engine, ctx, cache, next_position
        self.max_new_tokens, self.sampling, self.generator = max_new_tokens, sampling, generator
        self.stop, self.stream = list(stop), stream
        self.tokenizer = engine.adapter.tokenizer
        self.eos = set(engine.adapter.eos_token_ids)
        self.checkers = engine._with("accept")
        self.followers = engine._with("after_step")

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        tokens = choose_tokens(logits, self.sampling, self.generator)
        for checker in self.checkers:
            first, masked = tokens, logits.clone()
            for attempt in range(checker.max_candidate_tries):
                accepted = checker.accept(self.ctx, masked, tokens)
                if accepted is None or bool(accepted.all()):
                    break
                if attempt == checker.max_candidate_tries - 1:  # every try of these rows rejected
                    chosen = checker.fallback(self.ctx, logits, first)
                    tokens = torch.where(accepted, tokens, first if chosen is None else chosen)
                    break
                rejected = (~accepted).nonzero().squeeze(-1)
                masked[rejected, tokens[rejected]] = float("-inf")
                tokens = torch.where(accepted, tokens, choose_tokens(masked, self.sampling, self.generator))
        return tokens

    def run(self, logits: torch.Tensor) -> list[RowResult]:
        batch = logits.shape[0]
        generated: list[list[int]] = [[] for _ in range(batch)]
        texts = [""] * batch
        active = [True] * batch
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else next(iter(self.eos), 0)
        rows = torch.arange(batch, device=logits.device)
        steps = self.engine.decode_steps(self.ctx, self.cache, self.next_position)
        ahead = self.engine.decode_replays
        for step in range(self.max_new_tokens):
            self.ctx.step = step
            tokens = self.choose(logits)
            if not all(active):
                tokens.masked_fill_(~torch.tensor(active).to(tokens.device, non_blocking=True), pad)
            last = step == self.max_new_tokens - 1
            chosen = _copy_to_host(tokens)  # one transfer per step, not one per row
            if ahead and not last:
                logits = steps.run(tokens, step)
            for row, token in enumerate(chosen()):
                if not active[row]:
                    continue
                generated[row].append(token)
                if token in self.eos:
                    active[row] = False
                    continue
                if self.stop or self.stream:
                    text = self.tokenizer.decode(generated[row], skip_special_tokens=True)
                    cut = _first_stop(text, self.stop)
                    if cut >= 0:
                        text, active[row] = text[:cut], False
                    if self.stream and len(text) > len(texts[row]):
                        self.stream(row, text[len(texts[row]):])
                    texts[row] = text
            for follower in self.followers:
                follower.after_step(self.ctx, tokens, rows)
            if not any(active) or last:
                break
            if not ahead:
                logits = steps.run(tokens, step)
        return [self._result(ids, text) for ids, text in zip(generated, texts)]

    def _result(self, ids: list[int], text: str | None) -> RowResult:
        if text is None or not self.stop:
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return RowResult(token_ids=ids, text=text.strip())


class _BeamDecoder(_TokenDecoder):
    """Beam search: rows are expanded to ``num_beams`` beams after the prefill; the cache follows the beams."""

    def run(self, logits: torch.Tensor) -> list[RowResult]:
        if self.sampling.do_sample:
            raise ConfigError("beam sampling (num_beams > 1 with do_sample=True) is not supported")
        beams, batch = self.sampling.num_beams, logits.shape[0]
        self.ctx.num_beams = beams
        expand = torch.arange(batch, device=logits.device).repeat_interleave(beams)
        self.cache.reorder(expand)
        next_position = self.next_position.index_select(0, expand)
        search = BeamSearch(batch, beams, self.max_new_tokens, sorted(self.eos), self.sampling.length_penalty,
                            logits.device)
        logits = logits.index_select(0, expand)
        steps = self.engine.decode_steps(self.ctx, self.cache, next_position)
        for step in range(self.max_new_tokens):
            self.ctx.step = step
            parents, tokens = search.step(logits)
            for follower in self.followers:
                follower.after_step(self.ctx, tokens, parents)
            if search.done:
                break
            steps.cache.reorder(parents)
            logits = steps.run(tokens, step)
        return [self._result(ids, None) for ids in search.best()]


def layer_forward(layer: torch.nn.Module, hidden: torch.Tensor, **kwargs) -> torch.Tensor:
    """One stock decoder layer on the walk's hidden states; its attention gets the engine's request through
    ``vlmkit_attention`` and the positions' rotary embedding through ``position_embeddings``."""
    return layer(hidden, attention_mask=None, position_ids=None, use_cache=True, **kwargs)


@functools.cache
def compiled_layer_forward() -> Callable[..., torch.Tensor]:
    """:func:`layer_forward` through ``torch.compile`` (:func:`~vlmkit.runtime.graphs.compile_dynamic`): the layer's
    element-wise work (RMSNorm in float32, rotary embedding, SiLU and product, residual adds) fused into a few kernels
    between the matrix products. The cache write and the attention call stay outside the compiled graphs
    (``torch.compiler.disable``). One compilation serves every layer and length (the layer index, an int attribute
    that torch.compile would otherwise specialise one layer at a time, is not specialised); batch or length 1 and the
    cache's type (dynamic or static) get their own.

    The widths stay static: the last dimension of the hidden states and of the rotary embedding is marked static on
    every call, which pins the head size (an int attribute like the layer index) through the shape checks. Left
    symbolic, it makes every element index of the fused rotary kernel a 64-bit division by a runtime value (136 us per
    layer in a LLaVA batch-16 prefill on an H200; alone at that shape, 94 us against 26 us with static widths)."""
    compiled = compile_dynamic(layer_forward, allow_unspec_int_on_nn_module=True)

    def forward(layer: torch.nn.Module, hidden: torch.Tensor, *, position_embeddings: tuple[torch.Tensor, ...],
                **kwargs) -> torch.Tensor:
        for tensor in (hidden, *position_embeddings):
            torch._dynamo.mark_static(tensor, tensor.dim() - 1)
        return compiled(layer, hidden, position_embeddings=position_embeddings, **kwargs)

    return forward


def _groups(keys: list, device: torch.device) -> tuple[torch.Tensor, list[int]] | None:
    """Rows with equal keys: each row's group ``[B]`` and each group's first row; None when every key differs."""
    first: dict = {}
    groups = [first.setdefault(key, len(first)) for key in keys]
    if len(first) == len(keys):
        return None
    leaders = [groups.index(group) for group in range(len(first))]
    return torch.tensor(groups, device=device), leaders


def _pack_groups(state: LayerState, groups: torch.Tensor,
                 leaders: list[int]) -> tuple[LayerState, torch.Tensor, torch.Tensor]:
    """The sequences ``[prefix of the group's first row, rest of each of its rows]`` (left-padded), each token's
    segment (0: the prefix, ``b + 1``: row ``b``'s rest) and each row's last token in its group's sequence."""
    length = state.valid.shape[1]
    real, rest = torch.stack([state.valid.sum(dim=1), length - 1 - last_visual_index(state.is_visual)]).tolist()
    members: list[list[int]] = [[] for _ in leaders]
    for row, group in enumerate(groups.tolist()):
        members[group].append(row)
    spans = [[(leader, length - real[leader], length - rest[leader], 0)]
             + [(row, length - rest[row], length, row + 1) for row in rows] for leader, rows in zip(leaders, members)]
    packed_length = max(sum(stop - start for _, start, stop, _ in group) for group in spans)
    source_row, source_col, segments = (np.zeros((len(leaders), packed_length), dtype=np.int64) for _ in range(3))
    real_token = np.zeros((len(leaders), packed_length), dtype=bool)
    last = np.zeros(len(groups), dtype=np.int64)
    for group, group_spans in enumerate(spans):
        at = packed_length - sum(stop - start for _, start, stop, _ in group_spans)
        for row, start, stop, segment in group_spans:
            end = at + stop - start
            source_row[group, at:end], source_col[group, at:end] = row, np.arange(start, stop)
            segments[group, at:end], real_token[group, at:end] = segment, True
            if segment:  # a row's own rest (the prefix comes from its group's first row)
                last[row] = end - 1
            at = end
    device = state.valid.device
    take = (torch.from_numpy(source_row).to(device), torch.from_numpy(source_col).to(device))
    real_token = torch.from_numpy(real_token).to(device)
    positions = state.positions[:, take[0], take[1]] if state.positions.dim() == 3 else state.positions[take]
    packed = LayerState(
        hidden=state.hidden[take] * real_token[..., None], valid=real_token,
        is_visual=state.is_visual[take] & real_token, positions=positions,
        source_index=torch.where(real_token, state.source_index[take], -1),
    )
    return packed, torch.from_numpy(segments).to(device), torch.from_numpy(last).to(device)


def _copy_to_host(tokens: torch.Tensor) -> Callable[[], list[int]]:
    """Start copying ``tokens`` to the host; the returned function waits for them (not for later GPU work)."""
    if tokens.device.type != "cuda":
        values = tokens.tolist()
        return lambda: values
    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    host.copy_(tokens, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return lambda: copied.synchronize() or host.tolist()


def _kept_visual_indices(is_visual: torch.Tensor, state: LayerState) -> list[list[int]]:
    """Per row, the indices (in image-token order) of the visual tokens that reached the last layer."""
    order = is_visual.long().cumsum(dim=1) - 1  # a prompt position -> its index among the row's visual tokens
    return [order[row, state.source_index[row][state.is_visual[row]]].tolist() for row in range(is_visual.shape[0])]


def _first_stop(text: str, stop: Sequence[str]) -> int:
    """Where the earliest stop string starts in ``text``, or -1."""
    return min((i for s in stop if (i := text.find(s)) >= 0), default=-1)


def _add_method_stats(result: RowResult, ctx: GenerationContext, row: int) -> None:
    """Copy the per-sample stats methods reported (``ctx.report``) into ``result.stats``; engine keys win."""
    for key, values in ctx.scratch.get("stats", {}).items():
        result.stats.setdefault(key, values[row])


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


def _and_masks(a, b):
    if a is None or b is None:
        return a or b
    return lambda bi, h, q, k: a(bi, h, q, k) & b(bi, h, q, k)


def _compose(first, then):
    if first is None or then is None:
        return first or then
    return lambda probs: then(first(probs))


class _Clock:
    """Time marks of one generation: on CUDA, events recorded on the stream, read once at the end (measuring does
    not synchronise the host with the GPU); on the CPU, wall-clock times."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.mark()

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """The seconds between consecutive marks."""
        pairs = list(zip(self.marks, self.marks[1:]))
        if not self.cuda:
            return [end - start for start, end in pairs]
        self.marks[-1].synchronize()
        return [start.elapsed_time(end) / 1e3 for start, end in pairs]
