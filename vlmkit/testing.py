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


TINY = {
    "llava": {
        "image_size": 32, "patch_size": 8, "vocab": None,
        "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
        "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "max_position_embeddings": 512},
    },
    "qwen2_vl": {
        "patch_size": 4, "min_pixels": 8 * 8, "max_pixels": 32 * 32, "vocab": None,
        "vision": {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2},
        "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "max_position_embeddings": 512,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}},
    },
    "qwen2_5_vl": {
        "patch_size": 4, "min_pixels": 8 * 8, "max_pixels": 32 * 32, "vocab": None,
        "vision": {"depth": 2, "hidden_size": 32, "out_hidden_size": 64, "intermediate_size": 64, "num_heads": 2,
                   "window_size": 16, "fullatt_block_indexes": [1]},
        "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "max_position_embeddings": 512,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}},
    },
}

#: random-weight models with the real checkpoints' shapes (for GPU benchmarks); an image of ``image_size`` pixels gives
#: 576 visual tokens on both
SHAPED = {
    "llava-1.5-7b": ("llava", {
        "image_size": 336, "patch_size": 14, "vocab": 32000,
        "vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16},
        "text": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 32, "max_position_embeddings": 4096},
    }),
    # a small LLaVA with llava-1.5-7b's CLIP tower and grid: TinyLlama-1.1B's language model (the sgl guide)
    "llava-tinyllama-1.1b": ("llava", {
        "image_size": 336, "patch_size": 14, "vocab": 32000,
        "vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16},
        "text": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
                 "num_key_value_heads": 4, "max_position_embeddings": 2048},
    }),
    "qwen2.5-vl-7b": ("qwen2_5_vl", {
        "image_size": 672, "patch_size": 14, "min_pixels": 56 * 56, "max_pixels": 672 * 672, "vocab": 152064,
        "vision": {"depth": 32, "hidden_size": 1280, "out_hidden_size": 3584, "intermediate_size": 3420,
                   "num_heads": 16, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]},
        "text": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                 "num_key_value_heads": 4, "max_position_embeddings": 32768,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}},
    }),
}


def tokens_of(generations) -> list[list[int]]:
    """The token ids of each generation, to compare two runs."""
    return [g.token_ids for g in generations]


def tiny_model(family: str, seed: int = 0, *, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Return ``(model, processor)``: a tiny random VLM of the real class for ``family``, in eval mode."""
    if family not in TINY:
        raise ValueError(f"unknown tiny-model family {family!r}; choose one of {FAMILIES}")
    torch.manual_seed(seed)
    model, processor = _build(family, TINY[family])
    return model.to(dtype).eval(), processor


def shaped_model(name: str, seed: int = 0, *, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cuda") -> tuple[PreTrainedModel, ProcessorMixin]:
    """A random-weight model with the shapes of a real checkpoint (``SHAPED``), built directly on ``device``."""
    if name not in SHAPED:
        raise ValueError(f"unknown model shape {name!r}; choose one of {', '.join(SHAPED)}")
    family, sizes = SHAPED[name]
    torch.manual_seed(seed)
    with torch.device(device):
        model, processor = _build(family, sizes)
    return model.to(dtype).eval(), processor


def _vocabulary(words: list[str], size: int | None, reserved: int) -> list[str]:
    """``words`` padded with filler words so that the tokenizer has ``size`` entries (with ``reserved`` specials)."""
    words = list(dict.fromkeys(words))
    filler = max(0, (size or 0) - reserved - len(words))
    return words + [f"w{index}" for index in range(filler)]


def _build(family: str, sizes: dict):
    return (_llava if family == "llava" else _qwen)(family, sizes)


def _llava(family: str, sizes: dict):
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = word_level_tokenizer(
        _vocabulary(BASIC_WORDS + ["user", "assistant"], sizes["vocab"], reserved=5),
        ["<image>"],
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    image_size, patch_size = sizes["image_size"], sizes["patch_size"]
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
    vision = CLIPVisionConfig(**sizes["vision"], image_size=image_size, patch_size=patch_size,
                              projection_dim=sizes["vision"]["hidden_size"])
    text = LlamaConfig(
        vocab_size=len(tokenizer), **sizes["text"],
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


def _qwen(family: str, sizes: dict):
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model
        from transformers import Qwen2VLProcessor as Processor
    else:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
        from transformers import Qwen2_5_VLProcessor as Processor
    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = word_level_tokenizer(
        _vocabulary(BASIC_WORDS + ["system", "user", "assistant", "you", "helpful"], sizes["vocab"], reserved=9),
        specials,
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    patch_size, merge_size = sizes["patch_size"], 2
    image_processor = Qwen2VLImageProcessor(
        patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2,
        min_pixels=sizes["min_pixels"], max_pixels=sizes["max_pixels"],
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
            "vocab_size": len(tokenizer), **sizes["text"],
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            **sizes["vision"], "patch_size": patch_size, "spatial_merge_size": merge_size, "temporal_patch_size": 2,
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
