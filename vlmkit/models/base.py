"""Model adapters: what the runtime needs to know about one VLM family, derived from the stock HF model."""

from __future__ import annotations

import copy
import functools
import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin

from vlmkit.runtime.graphs import GraphedCalls
from vlmkit.runtime.hooks import VisualTokens


@dataclass
class PreparedBatch:
    """A left-padded batch of (image, prompt) pairs, ready for the language model."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L] 1 for real tokens
    is_visual: torch.Tensor  # [B, L] bool, from the image placeholder token id
    vision_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # pixel_values, image_grid_thw, ...
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific inputs (mm_token_type_ids, ...)

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class ProcessedBatch:
    """The processor's output for a batch, on the host, before :meth:`Adapter.to_device`. ``vision_inputs`` holds
    each distinct image once when ``image_of_row`` (each row's image) is set, else one image per row."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    vision_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # per-row family inputs (none with image_of_row)
    image_of_row: list[int] | None = None


class Adapter(ABC):
    """Base adapter. Subclasses fill in the family-specific parts."""

    family: str = ""
    model_classes: tuple[str, ...] = ()
    #: the attention implementation vlmkit sets on the vision tower (None: the model's own)
    vision_attention: str | None = None

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin):
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.config = model.config

    def with_processor(self, processor: ProcessorMixin) -> Adapter:
        """This adapter with another processor (a copy for a worker thread's :meth:`process`)."""
        other = copy.copy(self)
        other.processor, other.tokenizer = processor, getattr(processor, "tokenizer", processor)
        return other

    # -- language model -------------------------------------------------------------------------------------------
    @property
    def language_model(self) -> torch.nn.Module:
        """The decoder stack (``.layers``, ``.norm``, ``.rotary_emb``, ``.embed_tokens``)."""
        return self.model.model.language_model

    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.language_model.layers

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.lm_head

    @property
    def text_config(self):
        return self.config.get_text_config()

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @functools.cached_property
    def _cache_keyword(self) -> str:
        return "cache" if "cache" in inspect.signature(self.layers[0].forward).parameters else "past_key_values"

    def cache_argument(self, cache) -> dict:
        """``{name: cache}`` for a decoder layer or its attention module: transformers 5.24 renamed their
        ``past_key_values`` argument to ``cache`` (the old name is deprecated there); earlier versions take the old."""
        return {self._cache_keyword: cache}

    @property
    def device(self) -> torch.device:
        return self.language_model.embed_tokens.weight.device

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(input_ids)

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.language_model.rotary_emb(hidden, positions)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.norm(hidden)

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos or [])

    # -- prompts and inputs ---------------------------------------------------------------------------------------
    def build_prompt(self, text: str) -> str:
        """The chat prompt for one (image, text) turn, ending where the assistant's answer starts."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return self.default_prompt(text)

    @abstractmethod
    def default_prompt(self, text: str) -> str:
        """The family's prompt format, for processors without a chat template."""

    def prepare(self, images: list[Image.Image], prompts: list[str]) -> PreparedBatch:
        """The batch of (image, prompt) pairs on the model's device: :meth:`process`, then :meth:`to_device`."""
        return self.to_device(self.process(images, prompts))

    def process(self, images: list[Image.Image], prompts: list[str]) -> ProcessedBatch:
        """Run the processor on chat prompts, left-padded, on the host (no CUDA call: safe on a worker thread that
        prepares the next batch while the GPU runs this one). An image object that several rows ask about (POPE asks
        six questions per image) is processed once: the processor runs on the distinct images with their first rows'
        prompts, and every row gets its image's placeholder count (``_tokenize_rows``)."""
        self.tokenizer.padding_side = "left"
        texts = [self.build_prompt(p) for p in prompts]
        distinct: dict[int, int] = {}  # id(image) -> its index among the distinct images
        image_of_row = [distinct.setdefault(id(image), len(distinct)) for image in images]
        leaders = [image_of_row.index(index) for index in range(len(distinct))]
        encoded = self.processor(images=[images[row] for row in leaders], text=[texts[row] for row in leaders],
                                 return_tensors="pt", padding=True)
        rows = None
        if len(leaders) < len(images):
            rows = self._tokenize_rows(texts, image_of_row, leaders, encoded["input_ids"], encoded["attention_mask"])
            if rows is None:  # placeholders not expanded as one repeated token: process every row's image
                encoded = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        encoded = dict(encoded)
        input_ids, attention_mask = encoded.pop("input_ids"), encoded.pop("attention_mask")
        vision_inputs, extra = self.split_processor_outputs(encoded)
        if rows is None:
            return ProcessedBatch(input_ids, attention_mask, vision_inputs, extra)
        return ProcessedBatch(rows[0], attention_mask=rows[1], vision_inputs=vision_inputs, image_of_row=image_of_row)

    def to_device(self, processed: ProcessedBatch) -> PreparedBatch:
        """The processed batch on the model's device, each row with its image's tensors."""
        device = self.device
        input_ids = processed.input_ids.to(device)
        vision_inputs = {key: value.to(device) for key, value in processed.vision_inputs.items()}
        if processed.image_of_row is not None:
            vision_inputs = self.select_vision_inputs(vision_inputs, processed.image_of_row)
        return PreparedBatch(
            input_ids=input_ids,
            attention_mask=processed.attention_mask.to(device),
            is_visual=input_ids == self.image_token_id,
            vision_inputs=vision_inputs,
            extra={key: value.to(device) for key, value in processed.extra.items()},
        )

    def _tokenize_rows(self, texts: list[str], image_of_row: list[int], leaders: list[int], leader_ids: torch.Tensor,
                       leader_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every row's ``input_ids`` and ``attention_mask`` (left-padded) without processing its image again: each
        prompt is tokenized with its one image placeholder, which is then repeated as often as the processor expanded
        it for the image's first row. None when a prompt has not exactly one placeholder token or a first row does not
        come out as the processor made it (then the caller processes every row)."""
        image_token = self.image_token_id
        counts = (leader_ids == image_token).sum(dim=1).tolist()
        rows = []
        for ids, image in zip(self.tokenizer(texts)["input_ids"], image_of_row):
            if ids.count(image_token) != 1:
                return None
            at = ids.index(image_token)
            rows.append(ids[:at] + [image_token] * counts[image] + ids[at + 1:])
        ids, mask = _left_padded(rows, self.tokenizer.pad_token_id)
        if not all(torch.equal(ids[row][mask[row].bool()], leader_ids[image][leader_mask[image].bool()])
                   for image, row in enumerate(leaders)):
            return None
        return ids, mask

    def split_processor_outputs(self, outputs: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        return outputs, {}

    def select_rows(self, batch: PreparedBatch, rows: list[int]) -> PreparedBatch:
        """The batch of the given rows only (their images included), for encoding each image once."""
        index = torch.tensor(rows, device=batch.input_ids.device)
        return PreparedBatch(
            input_ids=batch.input_ids[index], attention_mask=batch.attention_mask[index],
            is_visual=batch.is_visual[index], vision_inputs=self.select_vision_inputs(batch.vision_inputs, rows),
            extra={key: value[index] for key, value in batch.extra.items()},
        )

    def select_vision_inputs(self, vision_inputs: dict[str, torch.Tensor], rows: list[int]) -> dict:
        """The processor's image tensors of the given rows (one image per row, batch-first tensors here)."""
        return {key: value[rows] for key, value in vision_inputs.items()}

    # -- vision side ----------------------------------------------------------------------------------------------
    @abstractmethod
    def encode_images(self, batch: PreparedBatch, with_attention: bool = False,
                      graphs: GraphedCalls | None = None, compiled: bool = False) -> list[VisualTokens]:
        """Vision tower + projector: one :class:`VisualTokens` per image (``attention`` filled on request). An
        adapter whose vision forward has fixed shapes and no host synchronisation may replay it through ``graphs``
        (CUDA graphs; None: eager), and may run it through ``torch.compile`` when ``compiled`` (``compile=True``)."""

    # -- positions ------------------------------------------------------------------------------------------------
    def position_ids(self, batch: PreparedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids of the unpruned prompt and the next position of each row (``[B]``)."""
        positions = (batch.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return positions, batch.attention_mask.long().sum(-1)

    def decode_positions(self, next_position: torch.Tensor, step: int) -> torch.Tensor:
        """Position ids ``[B, 1]`` (or ``[3, B, 1]``) of the token decoded at ``step``."""
        return (next_position + step).unsqueeze(-1)


def unpack_features(output) -> list[torch.Tensor]:
    """``get_image_features`` returns a ModelOutput (``pooler_output``), a tensor or a tuple across versions."""
    features = getattr(output, "pooler_output", output)
    if isinstance(features, torch.Tensor):
        features = list(features) if features.dim() == 3 else [features]
    return list(features)


def _left_padded(rows: list[list[int]], pad_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[B, longest]`` of token lists, left-padded (``tokenizer.pad``'s result,
    without its per-element walk over a batch of long image prompts)."""
    length = max(map(len, rows))
    ids = np.full((len(rows), length), 0 if pad_id is None else pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for row, tokens in enumerate(rows):
        ids[row, length - len(tokens):] = tokens
        mask[row, length - len(tokens):] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)
