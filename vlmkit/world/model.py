"""The built-in world models: LLaVA architecture (CLIP tower, MLP projector, Llama) with a word-level tokenizer.

A 336-pixel image with 14-pixel patches gives the 24 x 24 = 576 visual-token grid of LLaVA-1.5, so pruning budgets
(192 / 128 / 64) carry over. Sizes are named configs; ``world-small`` shares the tokenizer and grid with
``world-tiny`` (small-VLM guidance needs the same grid).
"""

from __future__ import annotations

import re

import numpy as np
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from vlmkit.testing import LLAVA_CHAT_TEMPLATE
from vlmkit.tokenization import word_level_tokenizer
from vlmkit.world.captions import NUMBER_WORDS
from vlmkit.world.catalog import CATEGORIES, COLORS
from vlmkit.world.scene import IMAGE_SIZE, REGIONS, sample_scene
from vlmkit.world.scene import SIZES as SIZES_WORDS
from vlmkit.world.tasks import MMHAL_TYPES, POPE_SUFFIX, caption_sample, mmhal_sample, presence_sample

PATCH_SIZE = 14
GRID_SIDE = IMAGE_SIZE // PATCH_SIZE  # 24: the visual tokens form a GRID_SIDE x GRID_SIDE grid

SIZES: dict[str, dict] = {
    # vision: hidden, layers, heads; language: hidden, layers, heads, mlp
    "world-tiny": {"vision": (192, 4, 3), "text": (256, 6, 4, 768)},
    "world-small": {"vision": (192, 4, 3), "text": (448, 8, 7, 1344)},  # world-tiny's tower (--init-vision)
    "world-micro": {"vision": (32, 1, 2), "text": (64, 2, 2, 128)},  # smoke tests of the training code only
}


def world_vocabulary(scenes: int = 400) -> list[str]:
    """Every word the world's chat template, captions, questions and answers use (deterministic)."""
    rng = np.random.default_rng(0)
    texts = ["USER: ASSISTANT: yes no", POPE_SUFFIX, " ".join(COLORS), " ".join(SIZES_WORDS), " ".join(NUMBER_WORDS.values())]
    texts += [f"{' '.join(c.words)} {c.plural}" for c in CATEGORIES.values()]
    texts += [region for region in REGIONS]
    for image_id in range(scenes):
        scene = sample_scene(image_id, seed=0)
        texts.append(caption_sample(scene, image_id).answer)
        for kind in MMHAL_TYPES:
            if (sample := mmhal_sample(scene, kind, rng)) is not None:
                texts += [sample.prompt, sample.answer]
    for category in CATEGORIES:
        for scene in (sample_scene(0, 0), sample_scene(1, 0)):
            sample = presence_sample(scene, category, short=False)
            texts += [sample.prompt, sample.answer]
    return sorted({w for text in texts for w in re.findall(r"\w+|[^\w\s]", text.lower())})


def world_tokenizer() -> PreTrainedTokenizerFast:
    return word_level_tokenizer(
        world_vocabulary(), ["<image>"], bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def world_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
    )


def world_model(name: str, tokenizer: PreTrainedTokenizerFast) -> LlavaForConditionalGeneration:
    """A randomly initialised world model of size ``name``."""
    (v_hidden, v_layers, v_heads), (t_hidden, t_layers, t_heads, t_mlp) = SIZES[name]["vision"], SIZES[name]["text"]
    vision = CLIPVisionConfig(
        hidden_size=v_hidden, intermediate_size=4 * v_hidden, num_hidden_layers=v_layers, num_attention_heads=v_heads,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=v_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=t_hidden, intermediate_size=t_mlp, num_hidden_layers=t_layers,
        num_attention_heads=t_heads, num_key_value_heads=t_heads, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=GRID_SIDE**2, tie_word_embeddings=True,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model
