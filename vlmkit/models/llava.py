"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower, MLP projector, Llama; 1-D positions."""

from __future__ import annotations

import math

from vlmkit.models.base import Adapter, PreparedBatch, unpack_features
from vlmkit.runtime.hooks import VisualTokens


class LlavaAdapter(Adapter):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration",)

    @property
    def vision_tower(self):
        return self.model.model.vision_tower

    @property
    def projector(self):
        return self.model.model.multi_modal_projector

    def default_prompt(self, text: str) -> str:
        return f"USER: <image>\n{text} ASSISTANT:"

    def encode_images(self, batch: PreparedBatch) -> list[VisualTokens]:
        output = self.model.model.get_image_features(
            pixel_values=batch.vision_inputs["pixel_values"].to(self.vision_tower.dtype),
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
        )
        tokens = []
        for index, embeds in enumerate(unpack_features(output)):
            side = math.isqrt(embeds.shape[0])
            grid = (side, side) if side * side == embeds.shape[0] else (1, embeds.shape[0])
            tokens.append(VisualTokens(embeds=embeds, grid=grid, image_index=index))
        return tokens
