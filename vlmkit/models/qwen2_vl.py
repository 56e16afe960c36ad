"""Qwen2-VL and Qwen2.5-VL: native-resolution ViT with a 2x2 patch merger, Qwen2 LM, 3-D M-RoPE positions."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vlmkit.kernels.packed_vision import PACKED_VISION_IMPLEMENTATION
from vlmkit.models.base import Adapter, PreparedBatch, unpack_features
from vlmkit.runtime.graphs import GraphedCalls, LRUPool, compile_dynamic
from vlmkit.runtime.hooks import VisualTokens


LAYOUTS_KEPT = 16  # precomputed ViT layouts (sets of image grids) kept per adapter


@dataclass(frozen=True)
class _VisionLayout:
    """The ViT's inputs that depend only on the image grids, as transformers' vision forward accepts them
    precomputed, and the permutation from its window order back to token order (None without windows)."""

    kwargs: dict
    token_order: torch.Tensor | None


class Qwen2VLAdapter(Adapter):
    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    vision_attention = PACKED_VISION_IMPLEMENTATION  # one call per ViT layer instead of one per window

    @property
    def vision_tower(self):
        return self.model.model.visual

    @property
    def projector(self):
        """The patch merger (Qwen's projector)."""
        return self.model.model.visual.merger

    @property
    def merge_size(self) -> int:
        return self.config.vision_config.spatial_merge_size

    def default_prompt(self, text: str) -> str:
        return (
            "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
            f"{text}<|im_end|>\n<|im_start|>assistant\n"
        )

    def split_processor_outputs(self, outputs):
        extra = {key: outputs.pop(key) for key in ("mm_token_type_ids",) if key in outputs}
        return outputs, extra

    def select_vision_inputs(self, vision_inputs: dict[str, torch.Tensor], rows: list[int]) -> dict:
        """``pixel_values`` holds every image's patches one after another (``image_grid_thw`` says how many)."""
        grid_thw = vision_inputs["image_grid_thw"]
        patches = vision_inputs["pixel_values"].split(grid_thw.prod(dim=-1).tolist())
        return {"pixel_values": torch.cat([patches[row] for row in rows]), "image_grid_thw": grid_thw[rows]}

    def encode_images(self, batch: PreparedBatch, with_attention: bool = False,
                      graphs: GraphedCalls | None = None, compiled: bool = False) -> list[VisualTokens]:
        """Qwen's ViT has no [CLS] token, so ``attention`` stays None. The tower's layout for a set of image grids
        (rotary positions, sequence and window boundaries) is computed once with transformers' own helpers and passed
        in precomputed (``transformers.vision_utils``), so a forward reads nothing on the host and, with ``graphs``,
        replays as a CUDA graph per set of grids; ``compiled`` runs it through :func:`compiled_tower_forward`. A
        transformers without those helpers runs ``get_image_features``."""
        grid_thw = batch.vision_inputs["image_grid_thw"]
        grids = tuple(map(tuple, grid_thw.tolist()))
        layout = self._vision_layout(grid_thw, grids)
        if layout is None:
            output = self.model.model.get_image_features(
                pixel_values=batch.vision_inputs["pixel_values"], image_grid_thw=grid_thw
            )
            embeds, merger_input, token_order = unpack_features(output), getattr(output, "last_hidden_state", None), None
        else:
            tower = self.vision_tower
            tower_forward = compiled_tower_forward() if compiled else _tower_forward

            def forward(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return tower_forward(tower, pixels, grid_thw, layout.kwargs)

            pixels = batch.vision_inputs["pixel_values"].type(tower.dtype)
            merged, merger_input = forward(pixels) if graphs is None else graphs.run(f"qwen-vision-{grids}", forward,
                                                                                     pixels)
            embeds = list(merged.split([t * h * w // self.merge_size ** 2 for t, h, w in grids]))
            token_order = layout.token_order
        counts = [e.shape[0] for e in embeds]
        features = [None] * len(embeds)
        if merger_input is not None:
            merger_input = merger_input.reshape(sum(counts), -1)
            if token_order is None:
                token_order = self._token_order(grid_thw)
            features = (merger_input if token_order is None else merger_input[token_order]).split(counts)
        tokens = []
        for index, (image_embeds, (_, rows, cols)) in enumerate(zip(embeds, grids)):
            grid = (rows // self.merge_size, cols // self.merge_size)
            tokens.append(VisualTokens(image_embeds, grid, index, features=features[index]))
        return tokens

    def _vision_layout(self, grid_thw: torch.Tensor, grids: tuple) -> _VisionLayout | None:
        """The tower's precomputed layout for these grids (cached), or None without ``transformers.vision_utils``."""
        try:
            from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids
        except ImportError:
            return None

        def compute() -> _VisionLayout:
            cu_seqlens = get_vision_cu_seqlens(grid_thw)
            kwargs = {"position_ids": get_vision_position_ids(grid_thw, self.merge_size), "cu_seqlens": cu_seqlens,
                      "max_seqlen": _longest(cu_seqlens)}
            windows = self._window_index(grid_thw)
            if windows is None:
                return _VisionLayout(kwargs, None)
            window_index, cu_window_seqlens = windows
            kwargs.update(window_index=window_index, cu_window_seqlens=cu_window_seqlens,
                          max_window_seqlen=_longest(cu_window_seqlens))
            return _VisionLayout(kwargs, torch.argsort(window_index))

        return self._vision_layouts.get(grids, compute)

    @functools.cached_property
    def _vision_layouts(self) -> LRUPool[_VisionLayout]:
        return LRUPool(LAYOUTS_KEPT)

    def _window_index(self, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Qwen2.5-VL's window order of the merged tokens and the windows' boundaries (None for Qwen2-VL)."""
        tower = self.vision_tower
        if not hasattr(tower, "window_size"):
            return None
        from transformers.vision_utils import get_vision_window_index

        window_index, cu_window_seqlens = get_vision_window_index(
            grid_thw, spatial_merge_size=self.merge_size, window_size=tower.window_size, patch_size=tower.patch_size
        )
        return window_index.to(grid_thw.device), cu_window_seqlens.to(grid_thw.device)

    def _token_order(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """Qwen2.5-VL's window attention runs (and merges) tokens in window order: the permutation that undoes it."""
        window_index = self._window_index(grid_thw)
        return None if window_index is None else torch.argsort(window_index[0])

    def position_ids(self, batch: PreparedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE ids ``[3, B, L]`` from the model's own ``get_rope_index``, on the unpruned sequence."""
        rope_index = self.model.model.get_rope_index
        kwargs = {"image_grid_thw": batch.vision_inputs["image_grid_thw"], "attention_mask": batch.attention_mask}
        if "mm_token_type_ids" in inspect.signature(rope_index).parameters:
            kwargs["mm_token_type_ids"] = batch.extra.get("mm_token_type_ids", batch.is_visual.int())
        positions, deltas = rope_index(batch.input_ids, **kwargs)
        next_position = batch.attention_mask.long().sum(-1) + deltas.view(-1).to(batch.input_ids.device)
        return positions, next_position

    def decode_positions(self, next_position: torch.Tensor, step: int) -> torch.Tensor:
        return (next_position + step).view(1, -1, 1).expand(3, -1, 1)


def _tower_forward(tower: torch.nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor,
                   layout: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The ViT on precomputed layout inputs: the merged embeddings and the merger's input."""
    output = tower(pixels, grid_thw=grid_thw, **layout)
    return output.pooler_output, output.last_hidden_state


@functools.cache
def compiled_tower_forward() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """:func:`_tower_forward` through ``torch.compile`` (``compile=True``), one compilation for every set of grids.
    It fuses the ViT's element-wise work and pads its matrix products to aligned shapes (``force_shape_pad``):
    Qwen2.5-VL's MLP width, 3420, is not a multiple of 8, and cuBLAS runs those products unpadded in a kernel for
    2-element alignment at about a third of the speed (docs/performance.md). The padding is inside the compiled
    code; the model's weights are not changed."""
    return compile_dynamic(_tower_forward, force_shape_pad=True)


def _longest(cu_seqlens: torch.Tensor) -> int:
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
