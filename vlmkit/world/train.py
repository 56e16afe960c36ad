"""Training the built-in world models (``vlmkit world train``). Runs on a GPU; the same code runs a few steps on a
CPU for smoke tests. Scenes are drawn fresh for every sample from the ``train`` split, so there is no fixed dataset
to ship; held-out evaluation uses the ``val`` split, whose image ids never occur in training."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import LlavaForConditionalGeneration

from vlmkit.api import resolve_model
from vlmkit.decoders.cca import concentric_positions, ring_ids
from vlmkit.errors import ConfigError
from vlmkit.kernels.masks import ring_table_mask
from vlmkit.kernels.reference import allowed_mask
from vlmkit.world.model import GRID_SIDE, world_model, world_processor, world_tokenizer
from vlmkit.world.render import render
from vlmkit.world.scene import sample_scene
from vlmkit.world.tasks import training_sample

TRAIN_IMAGE_IDS = 5_000_000  # the train split's id range: [0, 5e6)
IGNORE = -100


@dataclass
class Schedule:
    """What :func:`fit` needs: steps, batch, optimiser, data seeds and stopping (shared by the world trainers)."""

    steps: int = 6000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.05
    seed: int = 0
    world_seed: int = 0
    workers: int = 8
    log_every: int = 50
    max_seconds: float | None = None  # stop after this long; the schedule then runs on elapsed time, not steps


@dataclass
class TrainConfig(Schedule):
    model: str = "world-tiny"
    init: str | None = None  # start from this checkpoint (a folder or builtin:NAME) instead of random weights
    init_vision: str | None = None  # copy the vision tower from this checkpoint (same vision config)
    concentric: bool = False  # train with CCA's concentric positions and mask (a world-*-cca twin)


class WorldStream(IterableDataset):
    """An endless stream of (input_ids, labels, pixels) from freshly drawn train scenes. Images stay uint8 here;
    :func:`normalize` turns them into the processor's ``pixel_values`` on the training device."""

    def __init__(self, processor, config: TrainConfig):
        self.processor, self.config = processor, config

    def __iter__(self):
        worker = get_worker_info()
        rng = np.random.default_rng([self.config.seed, worker.id if worker else 0])
        tokenizer = self.processor.tokenizer
        while True:
            scene = sample_scene(int(rng.integers(TRAIN_IMAGE_IDS)), self.config.world_seed)
            sample = training_sample(scene, rng)
            prompt_ids = prompt_token_ids(self.processor, sample.prompt)
            answer = tokenizer(" " + sample.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            yield {
                "input_ids": torch.tensor(prompt_ids + answer),
                "labels": torch.tensor([IGNORE] * len(prompt_ids) + answer),
                "pixels": torch.from_numpy(np.array(render(scene))),
            }


def prompt_token_ids(processor, question: str) -> list[int]:
    """The chat prompt's token ids with the image token expanded to the visual-token count, as the processor
    encodes them (without preparing the image)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    ids = []
    for token in processor.tokenizer(prompt)["input_ids"]:
        ids += [token] * GRID_SIDE**2 if token == image_token else [token]
    return ids


def normalize(pixels: torch.Tensor, image_processor) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` images (already at the model's size) -> the processor's ``pixel_values``."""
    mean = torch.tensor(image_processor.image_mean, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.permute(0, 3, 1, 2).float() * image_processor.rescale_factor - mean) / std


def concentric_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      image_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CCA training inputs (decoders.md §3): concentric position ids ``[B, L]`` and the concentric causal mask as a
    boolean ``[B, 1, L, L]`` (True = attend), built by the same functions the ``cca`` decoder uses at inference."""
    batch, length = input_ids.shape
    rings = torch.full_like(input_ids, -1)
    grid = ring_ids(GRID_SIDE, GRID_SIDE, device=input_ids.device)
    for row in range(batch):
        rings[row, (input_ids[row] == image_token_id).nonzero().squeeze(-1)] = grid
    positions = concentric_positions(torch.arange(length, device=input_ids.device).expand(batch, length), rings)
    mask = allowed_mask(batch, 1, length, length, causal=False, key_valid=attention_mask,
                        mask_mod=ring_table_mask(rings), device=input_ids.device)
    return positions, mask


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(item["input_ids"].shape[0] for item in batch)
    input_ids = torch.full((len(batch), length), pad_id)
    labels = torch.full((len(batch), length), IGNORE)
    attention_mask = torch.zeros(len(batch), length, dtype=torch.long)
    for row, item in enumerate(batch):
        n = item["input_ids"].shape[0]
        input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = item["input_ids"], item["labels"], 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "pixels": torch.stack([item["pixels"] for item in batch])}


def train(config: TrainConfig, out: str | Path, device: str | None = None) -> Path:
    """Train a world model and save it (bf16 safetensors, shards of at most 15 MB) with its processor to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(config.seed)
    tokenizer = world_tokenizer()
    processor = world_processor(tokenizer)
    if config.init:  # the checkpoint's own size; it must share the world tokenizer
        model = LlavaForConditionalGeneration.from_pretrained(resolve_model(config.init), dtype=torch.float32)
        if model.config.text_config.vocab_size != len(tokenizer):
            raise ConfigError(f"{config.init} does not use the world tokenizer ({len(tokenizer)} words)")
    else:
        model = world_model(config.model, tokenizer)
    if config.init_vision:
        copy_vision_tower(model, config.init_vision)
    if config.concentric:
        model.config.concentric_causal_attention = True
    model = model.to(device).train()
    image_token_id = model.config.image_token_id
    loader = DataLoader(
        WorldStream(processor, config), batch_size=config.batch_size, num_workers=config.workers,
        collate_fn=lambda batch: collate(batch, tokenizer.pad_token_id), persistent_workers=config.workers > 0,
    )

    def loss_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        batch["pixel_values"] = normalize(batch.pop("pixels"), processor.image_processor)
        if config.concentric:
            batch["position_ids"], batch["attention_mask"] = concentric_inputs(
                batch["input_ids"], batch["attention_mask"], image_token_id)
        return model(**batch).loss

    log = fit(model, loader, loss_of, config, device)
    model.eval().to(torch.bfloat16).save_pretrained(out, max_shard_size="15MB")
    processor.save_pretrained(out)
    (out / "training.json").write_text(json.dumps({"config": asdict(config), "device": device_name(device),
                                                   "torch": torch.__version__, "log": log}, indent=1))
    return out


def copy_vision_tower(model: LlavaForConditionalGeneration, source: str) -> None:
    """Load ``source``'s trained vision tower into ``model`` (as LLaVA starts from a trained CLIP tower)."""
    donor = LlavaForConditionalGeneration.from_pretrained(resolve_model(source), dtype=torch.float32)
    def architecture(config) -> dict:
        return {key: value for key, value in config.to_dict().items() if key != "dtype"}

    if architecture(donor.config.vision_config) != architecture(model.config.vision_config):
        raise ConfigError(f"{source}'s vision tower differs from the one being trained; --init-vision needs the "
                          "same vision config")
    model.model.vision_tower.load_state_dict(donor.model.vision_tower.state_dict())


def fit(model: torch.nn.Module, loader: Iterable, loss_of: Callable[[Any], torch.Tensor], config: Schedule,
        device: torch.device, after_step: Callable[[], None] | None = None) -> list[dict]:
    """The world trainers' loop: AdamW (no weight decay on vectors), a linear warm-up then a cosine decay to 5% over
    the steps (or over ``max_seconds``), ``loss_of(batch)`` under bf16 autocast on CUDA, gradients clipped at 1,
    ``after_step()`` after each update. Stops after ``config.steps`` or ``config.max_seconds``; returns the loss log
    (also printed as JSON lines)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.98),
    )
    started, log = time.time(), []
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config, time.time() - started))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for step, batch in enumerate(loader, start=1):
        with autocast:
            loss = loss_of(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        seconds = time.time() - started
        out_of_time = config.max_seconds is not None and seconds >= config.max_seconds
        if step % config.log_every == 0 or step == config.steps or out_of_time:
            entry = {"step": step, "loss": round(loss.item(), 4), "lr": schedule.get_last_lr()[0],
                     "seconds": round(seconds, 1), "samples_per_s": round(step * config.batch_size / seconds, 1)}
            log.append(entry)
            print(json.dumps(entry), flush=True)
        if step >= config.steps or out_of_time:
            break
    return log


def _lr_factor(step: int, config: Schedule, elapsed: float) -> float:
    """Linear warm-up, then cosine decay to 5% over the steps (or over ``max_seconds``)."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    if config.max_seconds is not None:
        progress = max(progress, elapsed / config.max_seconds)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
