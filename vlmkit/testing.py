"""Tiny random models of the real HF classes, built in-process with a local tokenizer and image processor.

``tiny_model(family)`` needs no download and runs in well under a second on a CPU. The models are the stock
``LlavaForConditionalGeneration``, ``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``
classes with small configs, so every code path vlmkit takes on them is the one it takes on real checkpoints.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, ProcessorMixin

from vlmkit.tokenization import word_level_tokenizer

FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl")

BASIC_WORDS = """
a an the and or but of in on at to with without from by for is are was were be been it its this that these those
there here what which who where how many much some any no not yes one two three four five six seven eight nine ten
image picture photo scene describe detail details detailed please tell me about see can you do does show shows
left right top bottom middle center front back near next behind above below small large big little red green blue
yellow white black brown orange pink purple gray color colors shape object objects thing things person people man
woman child dog cat bird horse car bus truck bicycle table chair cup fork knife spoon bowl plate pizza cake apple
banana bottle book clock tv couch bed tree grass sky water road street kitchen room park field building window door
sitting standing holding looking walking running eating playing on under over into onto
. , ? ! : ; ' " - ( )
""".split()

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    " {% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_model(family: str, seed: int = 0, *, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Return ``(model, processor)``: a tiny random VLM of the real class for ``family``, in eval mode."""
    builders = {"llava": _tiny_llava, "qwen2_vl": _tiny_qwen, "qwen2_5_vl": _tiny_qwen}
    if family not in builders:
        raise ValueError(f"unknown tiny-model family {family!r}; choose one of {FAMILIES}")
    torch.manual_seed(seed)
    model, processor = builders[family](family)
    return model.to(dtype).eval(), processor


def _tiny_llava(family: str):
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = word_level_tokenizer(
        BASIC_WORDS + ["user", "assistant"],
        ["<image>"],
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    image_size, patch_size = 32, 8
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch_size, projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=(image_size // patch_size) ** 2,
    )
    model = LlavaForConditionalGeneration(config)
    _set_generation_defaults(model, tokenizer)
    return model, processor


def _tiny_qwen(family: str):
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model
        from transformers import Qwen2VLProcessor as Processor

        vision = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2}
    else:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
        from transformers import Qwen2_5_VLProcessor as Processor

        vision = {
            "depth": 2, "hidden_size": 32, "out_hidden_size": 64, "intermediate_size": 64, "num_heads": 2,
            "window_size": 16, "fullatt_block_indexes": [1],
        }
    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = word_level_tokenizer(
        BASIC_WORDS + ["system", "user", "assistant", "you", "helpful"],
        specials,
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    patch_size, merge_size = 4, 2
    image_processor = Qwen2VLImageProcessor(
        patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2,
        min_pixels=8 * 8, max_pixels=32 * 32,
    )
    processor = Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in specials}
    config = Config(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            **vision, "patch_size": patch_size, "spatial_merge_size": merge_size, "temporal_patch_size": 2,
            "in_channels": 3,
        },
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Model(config)
    _set_generation_defaults(model, tokenizer)
    return model, processor


def _set_generation_defaults(model: PreTrainedModel, tokenizer) -> None:
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
