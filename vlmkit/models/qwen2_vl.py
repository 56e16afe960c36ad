"""Qwen2-VL and Qwen2.5-VL: native-resolution ViT with a 2x2 patch merger, Qwen2 LM, 3-D M-RoPE positions."""

from __future__ import annotations

import inspect

import torch

from vlmkit.kernels.packed_vision import PACKED_VISION_IMPLEMENTATION
from vlmkit.models.base import Adapter, PreparedBatch, unpack_features
from vlmkit.runtime.graphs import GraphedCalls
from vlmkit.runtime.hooks import VisualTokens


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
                      graphs: GraphedCalls | None = None) -> list[VisualTokens]:
        """Qwen's ViT has no [CLS] token, so ``attention`` stays None. It always runs eagerly (``graphs`` unused):
        its variable-resolution attention reads sequence lengths on the host."""
        grid_thw = batch.vision_inputs["image_grid_thw"]
        output = self.model.model.get_image_features(
            pixel_values=batch.vision_inputs["pixel_values"], image_grid_thw=grid_thw
        )
        embeds = unpack_features(output)
        counts = [e.shape[0] for e in embeds]
        features = [None] * len(embeds)
        if (merger_input := getattr(output, "last_hidden_state", None)) is not None:
            features = self._in_token_order(merger_input.reshape(sum(counts), -1), grid_thw).split(counts)
        tokens = []
        for index, (image_embeds, (_, rows, cols)) in enumerate(zip(embeds, grid_thw.tolist())):
            grid = (rows // self.merge_size, cols // self.merge_size)
            tokens.append(VisualTokens(image_embeds, grid, index, features=features[index]))
        return tokens

    def _in_token_order(self, merger_input: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Qwen2.5-VL's window attention runs (and merges) tokens in window order; undo that permutation."""
        tower = self.vision_tower
        if not hasattr(tower, "window_size"):
            return merger_input
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(
            grid_thw, spatial_merge_size=self.merge_size, window_size=tower.window_size, patch_size=tower.patch_size
        )
        return merger_input[torch.argsort(window_index)]

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
