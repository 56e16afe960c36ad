"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower, MLP projector, Llama; 1-D positions."""

from __future__ import annotations

import functools
import math

import torch

from vlmkit.models.base import Adapter, PreparedBatch, unpack_features
from vlmkit.runtime.graphs import GraphedCalls
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

    @property
    def feature_attention_module(self) -> torch.nn.Module:
        """The self-attention of the encoder layer whose output LLaVA feeds to the projector."""
        encoder = getattr(self.vision_tower, "vision_model", self.vision_tower).encoder  # nesting varies by version
        layers = encoder.layers
        return layers[self.config.vision_feature_layer % (len(layers) + 1) - 1].self_attn

    def encode_images(self, batch: PreparedBatch, with_attention: bool = False,
                      graphs: GraphedCalls | None = None, compiled: bool = False) -> list[VisualTokens]:
        """The CLIP tower and projector have fixed shapes for one image size: with ``graphs`` they replay as a CUDA
        graph. They stay eager with ``compiled``: compiling was measured only on Qwen's ViT, whose unaligned MLP
        products it pads; CLIP's widths are aligned."""
        pixel_values = batch.vision_inputs["pixel_values"].to(self.vision_tower.dtype)
        forward = functools.partial(self._vision_forward, with_attention=with_attention)
        if graphs is None:
            embeds, features, attention = forward(pixel_values)
        else:
            embeds, features, attention = graphs.run(f"llava-vision-{with_attention}", forward, pixel_values)
        tokens = []
        for index, image_embeds in enumerate(embeds):
            side = math.isqrt(image_embeds.shape[0])
            grid = (side, side) if side * side == image_embeds.shape[0] else (1, image_embeds.shape[0])
            tokens.append(VisualTokens(image_embeds, grid, index,
                                       features=None if features is None else features[index],
                                       attention=None if attention is None else attention[index]))
        return tokens

    def _vision_forward(self, pixel_values: torch.Tensor, with_attention: bool):
        """Tensors only: projected embeddings ``[B, N, D]``, the projector's input ``[B, N, D_v]`` (None when the
        output has no hidden states) and the [CLS] attention ``[B, H, N]`` (None unless ``with_attention``)."""
        captured = {}

        def capture(module, args, kwargs):
            captured["input"] = kwargs.get("hidden_states", args[0] if args else None)

        hook = self.feature_attention_module.register_forward_pre_hook(capture, with_kwargs=True) if with_attention else None
        try:
            output = self.model.model.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=self.config.vision_feature_layer,
                vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            )
        finally:
            if hook is not None:
                hook.remove()
        embeds = torch.stack(unpack_features(output))
        return embeds, self._selected_features(output), self._cls_attention(captured["input"]) if with_attention else None

    def _selected_features(self, output) -> torch.Tensor | None:
        hidden_states = getattr(output, "hidden_states", None)
        if hidden_states is None:
            return None
        selected = hidden_states[self.config.vision_feature_layer]
        return selected[:, 1:] if self.config.vision_feature_select_strategy == "default" else selected

    def _cls_attention(self, hidden: torch.Tensor) -> torch.Tensor:
        """Per-head softmax attention of the [CLS] query over the patch keys, ``[B, H, N]`` (float32)."""
        attention = self.feature_attention_module
        batch, length, _ = hidden.shape
        heads = attention.num_heads
        query = attention.q_proj(hidden[:, :1]).view(batch, 1, heads, -1).transpose(1, 2).float()
        keys = attention.k_proj(hidden).view(batch, length, heads, -1).transpose(1, 2).float()
        probs = (query @ keys.transpose(-1, -2) * attention.scale).softmax(dim=-1)
        patches = probs[:, :, 0, 1:]
        return patches if self.config.vision_feature_select_strategy == "default" else probs[:, :, 0]
