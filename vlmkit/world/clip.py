"""The world CLIP model (``builtin:world-clip``): a tiny open_clip model that checks "is category X in this image".

Vision tower: timm's ``mobilenetv3_small_100`` (random init, 224 px input, its classifier is the projection) through
open_clip's ``vision_cfg.timm_model_name``. Text tower: open_clip's TextTransformer over the world VLM's word-level
tokenizer, pooled at the ``</s>`` token (``pool_type='eos'``, open_clip >= 3.1). Training (``vlmkit world train-clip``)
uses SigLIP's sigmoid loss (Zhai et al., 2023) with multi-label targets: every image is paired with the prompt of each
of the 50 categories, label 1 where the category is in the scene, so ``sigmoid(logit_scale * cos + logit_bias) > 0.5``
reads as "present". A checkpoint folder holds ``world-clip.json`` (the open_clip model config, registered under its
file name with ``open_clip.add_model_config``), ``open_clip_model.safetensors`` (bf16) and ``training.json``;
loading goes through ``open_clip.create_model_and_transforms``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import numpy as np
import open_clip
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerFast

from vlmkit.api import BUILTIN_DIR
from vlmkit.errors import ConfigError
from vlmkit.world.catalog import CATEGORIES
from vlmkit.world.dataset import scenes
from vlmkit.world.model import world_tokenizer
from vlmkit.world.render import render
from vlmkit.world.scene import sample_scene
from vlmkit.world.train import TRAIN_IMAGE_IDS, Schedule, device_name, fit

NAME = "world-clip"
BUILTIN = f"builtin:{NAME}"
CONFIG_FILE = f"{NAME}.json"  # open_clip registers a model config under its file's stem
WEIGHTS_FILE = "open_clip_model.safetensors"
IMAGE_SIZE = 224
#: one prompt per category, in CATEGORIES order ("photo" is not a world word; "picture" is)
PROMPTS = tuple(f"a picture of a {category.words[0]}." for category in CATEGORIES.values())
THRESHOLD = 0.5


def world_clip_config() -> dict:
    """The open_clip model config: 1.65 M vision + 0.64 M text parameters."""
    tokenizer = _tokenizer()
    return {
        "embed_dim": 128,
        "init_logit_scale": math.log(10),  # SigLIP's initial scale
        "init_logit_bias": -2.5,  # about the log-odds of the ~8% of (image, category) pairs that are present
        "vision_cfg": {"image_size": IMAGE_SIZE, "timm_model_name": "mobilenetv3_small_100",
                       "timm_model_pretrained": False, "timm_pool": "avg", "timm_proj": ""},
        "text_cfg": {"context_length": 16, "vocab_size": len(tokenizer), "width": 128, "heads": 4, "layers": 3,
                     "pool_type": "eos", "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id},
    }


@cache
def _tokenizer() -> PreTrainedTokenizerFast:
    return world_tokenizer()


def tokenize(texts: Sequence[str], context_length: int) -> torch.Tensor:
    """``[N, context_length]`` world-tokenizer ids: ``<s> words </s>`` then ``<pad>`` (``</s>`` kept if truncated)."""
    tokenizer = _tokenizer()
    ids = torch.full((len(texts), context_length), tokenizer.pad_token_id)
    for row, words in enumerate(tokenizer(list(texts))["input_ids"]):
        words = words[: context_length - 1] + [tokenizer.eos_token_id]
        ids[row, : len(words)] = torch.tensor(words)
    return ids


def presence_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SigLIP's sigmoid loss with multi-label targets: ``-sum log sigmoid(z * logit) / B`` over the ``[B, 50]``
    (image, category) pairs, ``z = +1`` where the category is present and ``-1`` elsewhere."""
    return -F.logsigmoid((2 * labels - 1) * logits).sum() / logits.shape[0]


@dataclass
class WorldClip:
    """A world CLIP model with its inference transform (open_clip's); texts use the world tokenizer."""

    model: open_clip.CLIP
    preprocess: Callable[[Image.Image], torch.Tensor]

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 50]`` presence logits of preprocessed images, categories in CATEGORIES order."""
        device = next(self.model.parameters()).device
        return self.model.get_logits(pixels.to(device), tokenize(PROMPTS, self.model.context_length).to(device))[0]

    def probabilities(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``[B, 50]`` probabilities (float32, CPU) that each category is in each image."""
        return self.logits(torch.stack([self.preprocess(image) for image in images])).float().sigmoid().cpu()

    def present(self, image: Image.Image) -> set[str]:
        """The categories whose probability exceeds 0.5."""
        return {name for name, p in zip(CATEGORIES, self.probabilities([image])[0].tolist()) if p > THRESHOLD}


def resolve_clip(source: str | Path) -> Path:
    """``builtin:world-clip`` or a folder -> the checkpoint folder; :class:`ConfigError` when it is not one."""
    source = str(source)
    folder = BUILTIN_DIR / source.removeprefix("builtin:") if source.startswith("builtin:") else Path(source)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        problem = ("the built-in world CLIP model is not shipped yet" if source == BUILTIN else
                   f"{source!r} is not a world CLIP checkpoint folder")
        raise ConfigError(f"{problem} ({folder} needs {CONFIG_FILE} and {WEIGHTS_FILE}); train one with "
                          "`vlmkit world train-clip --out DIR` and pass DIR")
    return folder


def builtin_available() -> bool:
    """Whether ``builtin:world-clip`` is shipped."""
    try:
        resolve_clip(BUILTIN)
    except ConfigError:
        return False
    return True


def load_world_clip(source: str | Path = BUILTIN, device: str | torch.device = "cpu") -> WorldClip:
    """Load a world CLIP checkpoint (``builtin:world-clip`` or a folder written by :func:`train_clip`)."""
    folder = resolve_clip(source)
    open_clip.add_model_config(folder / CONFIG_FILE)
    model, _, preprocess = open_clip.create_model_and_transforms(NAME, pretrained=str(folder / WEIGHTS_FILE),
                                                                 device=device)
    return WorldClip(model.eval(), preprocess)


@dataclass
class ClipTrainConfig(Schedule):
    """Settings of :func:`train_clip` (as in ``vlmkit.world.train.TrainConfig``, other defaults)."""

    steps: int = 100_000
    batch_size: int = 128
    lr: float = 2e-3


class PresenceStream(IterableDataset):
    """An endless stream of (uint8 ``[S, S, 3]`` image, ``[50]`` presence labels) from freshly drawn train scenes.
    Images are resized here exactly as open_clip's transform resizes them; :func:`normalize` finishes the job."""

    def __init__(self, config: ClipTrainConfig, size: int):
        self.config, self.size = config, size

    def __iter__(self):
        worker = get_worker_info()
        rng = np.random.default_rng([self.config.seed, worker.id if worker else 0])
        while True:
            scene = sample_scene(int(rng.integers(TRAIN_IMAGE_IDS)), self.config.world_seed)
            image = render(scene).resize((self.size, self.size), Image.Resampling.BICUBIC)
            labels = torch.tensor([float(name in scene.categories) for name in CATEGORIES])
            yield torch.from_numpy(np.array(image)), labels


def normalize(pixels: torch.Tensor, model: open_clip.CLIP) -> torch.Tensor:
    """uint8 ``[B, S, S, 3]`` images -> the model's normalised ``[B, 3, S, S]`` input (as its transform gives)."""
    config = model.visual.preprocess_cfg
    mean = torch.tensor(config["mean"], device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(config["std"], device=pixels.device).view(1, 3, 1, 1)
    return (pixels.permute(0, 3, 1, 2).float() / 255 - mean) / std


def train_clip(config: ClipTrainConfig, out: str | Path, device: str | None = None) -> WorldClip:
    """Train a world CLIP model from scratch on freshly drawn train scenes, save it to ``out`` and load it back."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(config.seed)
    (out / CONFIG_FILE).write_text(json.dumps(world_clip_config(), indent=1))
    open_clip.add_model_config(out / CONFIG_FILE)
    model = open_clip.create_model(NAME, device=device)
    model.train()
    prompts = tokenize(PROMPTS, model.context_length).to(device)
    loader = DataLoader(PresenceStream(config, model.visual.image_size[0]), batch_size=config.batch_size,
                        num_workers=config.workers, persistent_workers=config.workers > 0,
                        pin_memory=device.type == "cuda")

    def loss_of(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        pixels, labels = batch
        logits = model.get_logits(normalize(pixels.to(device, non_blocking=True), model), prompts)[0]
        return presence_loss(logits.float(), labels.to(device, non_blocking=True))

    def clamp_scale() -> None:
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as open_clip's trainer does

    log = fit(model, loader, loss_of, config, device, after_step=clamp_scale)
    model.eval()
    save_file({key: _stored(value) for key, value in model.state_dict().items()}, out / WEIGHTS_FILE)
    (out / "training.json").write_text(json.dumps({
        "config": asdict(config), "device": device_name(device), "torch": torch.__version__,
        "open_clip": open_clip.__version__, "timm": timm.__version__, "log": log}, indent=1))
    return load_world_clip(out, device)  # the model as stored (bf16 weights)


def _stored(tensor: torch.Tensor) -> torch.Tensor:
    """Floating-point weights are stored in bf16 (as the world VLMs are); loading casts them back."""
    tensor = tensor.detach().cpu().contiguous()
    return tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor


def evaluate_presence(score: Callable[[list[Image.Image]], torch.Tensor], n: int = 500, seed: int = 0,
                      batch_size: int = 50) -> dict:
    """Presence check on ``n`` val-split scenes: ``score(images)`` gives ``[B, 50]`` probabilities, > 0.5 counts as
    present. Returns micro precision / recall / F1 and accuracy over all (image, category) pairs, macro F1 (over the
    categories that occur), per-category metrics and the chance level ``base_rate``: the fraction of pairs present,
    which is also the expected F1 of guessing "present" at random at that rate (always answering "absent" scores
    ``1 - base_rate`` accuracy and F1 0)."""
    truth, predicted = [], []
    val = list(scenes("val", n, seed))
    for start in range(0, n, batch_size):
        batch = val[start: start + batch_size]
        predicted.append(torch.as_tensor(score([render(scene) for scene in batch])) > THRESHOLD)
        truth.append(torch.tensor([[name in scene.categories for name in CATEGORIES] for scene in batch]))
    truth, predicted = torch.cat(truth), torch.cat(predicted)
    hits, claimed, present = (truth & predicted).sum(0), predicted.sum(0), truth.sum(0)

    def prf(hits: int, claimed: int, present: int) -> dict[str, float]:
        precision, recall = hits / max(claimed, 1), hits / max(present, 1)
        f1 = 2 * hits / max(claimed + present, 1)
        return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4)}

    per_category = {name: prf(int(h), int(c), int(p)) | {"support": int(p)}
                    for name, h, c, p in zip(CATEGORIES, hits, claimed, present)}
    return {"n": n, **prf(int(hits.sum()), int(claimed.sum()), int(present.sum())),
            "accuracy": round((truth == predicted).float().mean().item(), 4),
            "macro_f1": round(float(np.mean([m["f1"] for m in per_category.values() if m["support"]])), 4),
            "base_rate": round(truth.float().mean().item(), 4), "per_category": per_category}
