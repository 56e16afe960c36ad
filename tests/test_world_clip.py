"""The world CLIP model (vlmkit.world.clip): an open_clip model with a timm vision tower, trained for two steps on CPU
(its verdicts are meaningless; these tests check the plumbing, the loss and the metrics)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import open_clip
import pytest
import timm
import torch

import vlmkit
from vlmkit.cli import main
from vlmkit.demo.app import CLIP_NOTE, build_app
from vlmkit.demo.objects import ClipPresence
from vlmkit.errors import ConfigError
from vlmkit.world import clip as world_clip
from vlmkit.world.catalog import CATEGORIES
from vlmkit.world.clip import (
    CONFIG_FILE,
    PROMPTS,
    WEIGHTS_FILE,
    ClipTrainConfig,
    PresenceStream,
    evaluate_presence,
    load_world_clip,
    normalize,
    presence_loss,
    tokenize,
    train_clip,
    world_clip_config,
)
from vlmkit.world.dataset import scenes
from vlmkit.world.model import world_tokenizer
from vlmkit.world.render import render
from vlmkit.world.scene import sample_scene
from vlmkit.world.train import TRAIN_IMAGE_IDS

SMOKE = ClipTrainConfig(steps=2, batch_size=2, workers=0, log_every=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world-clip")
    return folder, train_clip(SMOKE, folder, device="cpu")


@pytest.fixture(scope="module")
def tokenizer():
    return world_tokenizer()


@pytest.fixture(scope="module")
def images():
    return [render(scene) for scene in scenes("val", 3)]


def test_model_is_open_clip_with_a_timm_tower(trained, tokenizer):
    folder, model = trained[0], trained[1].model
    assert isinstance(model, open_clip.CLIP) and isinstance(model.visual, open_clip.timm_model.TimmModel)
    assert isinstance(model.visual.trunk, timm.models.MobileNetV3)
    assert (model.text_pool_type, model.text_eos_id) == ("eos", tokenizer.eos_token_id)
    assert model.vocab_size == len(tokenizer)
    assert model.visual.image_size == (224, 224) and model.logit_bias is not None
    assert sum(p.numel() for p in model.parameters()) < 2.5e6
    assert json.loads((folder / CONFIG_FILE).read_text()) == world_clip_config()


def test_tokenize_ends_each_prompt_with_eos(tokenizer):
    ids = tokenize(["a picture of a cat.", "cat " * 30], 16)
    words = tokenizer("a picture of a cat.")["input_ids"]
    assert ids[0].tolist() == words + [tokenizer.eos_token_id] + [tokenizer.pad_token_id] * (15 - len(words))
    assert ids[1, -1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in tokenize(PROMPTS, 16)
    assert len(set(map(tuple, tokenize(PROMPTS, 16).tolist()))) == len(CATEGORIES) == len(PROMPTS)


def test_presence_loss_is_the_multi_label_sigmoid_loss():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 0.0, 1.5]])
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    by_hand = sum(math.log(1 + math.exp(-z if y else z)) for row, ys in zip(logits.tolist(), labels.tolist())
                  for z, y in zip(row, ys)) / 2
    assert presence_loss(logits, labels).item() == pytest.approx(by_hand, rel=1e-6)
    # one positive per row (the diagonal) is open_clip's SigLIP loss
    features = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    image, text = torch.nn.functional.normalize(features, dim=-1)
    scale, bias = torch.tensor(10.0), torch.tensor(-2.5)
    siglip = open_clip.loss.SigLipLoss()._loss(image, text, scale, bias)
    assert presence_loss(scale * image @ text.T + bias, torch.eye(3)).item() == pytest.approx(siglip.item(), rel=1e-6)


def test_stream_gives_the_pixels_and_labels_inference_sees(trained):
    clip = trained[1]
    pixels, labels = next(iter(PresenceStream(SMOKE, 224)))
    scene = sample_scene(int(np.random.default_rng([SMOKE.seed, 0]).integers(TRAIN_IMAGE_IDS)), SMOKE.world_seed)
    assert torch.equal(normalize(pixels[None], clip.model)[0], clip.preprocess(render(scene)))
    assert labels.tolist() == [float(name in scene.categories) for name in CATEGORIES] and labels.sum() >= 1


def test_training_writes_a_loadable_folder(trained, images):
    folder, clip = trained
    log = json.loads((folder / "training.json").read_text())
    assert log["config"]["steps"] == 2 and [entry["step"] for entry in log["log"]] == [1, 2]
    assert log["device"] == "cpu" and {"torch", "open_clip", "timm"} <= set(log)
    assert (folder / WEIGHTS_FILE).stat().st_size <= 15 * 2**20
    loaded = load_world_clip(folder)
    probabilities = loaded.probabilities(images)
    assert probabilities.shape == (3, len(CATEGORIES)) and torch.equal(probabilities, clip.probabilities(images))
    assert loaded.present(images[0]) == clip.present(images[0])


def test_evaluation_metrics():
    val = list(scenes("val", 12))
    truth = {render(scene).tobytes(): [float(name in scene.categories) for name in CATEGORIES] for scene in val}
    perfect = evaluate_presence(lambda batch: torch.tensor([truth[image.tobytes()] for image in batch]), n=12,
                                batch_size=5)
    assert perfect["f1"] == perfect["precision"] == perfect["recall"] == perfect["accuracy"] == perfect["macro_f1"] == 1
    assert perfect["n"] == 12 and set(perfect["per_category"]) == set(CATEGORIES)
    assert sum(m["support"] for m in perfect["per_category"].values()) == sum(len(s.categories) for s in val)
    absent = evaluate_presence(lambda batch: torch.zeros(len(batch), len(CATEGORIES)), n=12)
    assert absent["f1"] == 0 and absent["accuracy"] == pytest.approx(1 - absent["base_rate"], abs=1e-4)
    assert 0.02 < absent["base_rate"] < 0.2


def test_clip_presence_uses_the_world_clip_threshold(trained, images):
    folder, clip = trained
    checker = ClipPresence(str(folder))
    found = checker.present(images[0])
    assert isinstance(found, set) and found <= set(CATEGORIES) and found == clip.present(images[0])


def test_missing_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(world_clip, "BUILTIN_DIR", tmp_path)
    assert not world_clip.builtin_available()
    with pytest.raises(ConfigError, match="built-in world CLIP model is not shipped yet.*vlmkit world train-clip"):
        load_world_clip("builtin:world-clip")
    with pytest.raises(ConfigError, match="not shipped yet"):
        ClipPresence("builtin:world-clip")
    with pytest.raises(ConfigError, match=f"not a world CLIP checkpoint folder.*{CONFIG_FILE}"):
        load_world_clip(tmp_path)


def test_cli_train_and_eval(tmp_path, capsys):
    assert main(["world", "train-clip", "--out", str(tmp_path), "--steps", "1", "--batch-size", "2", "--workers", "0",
                 "--device", "cpu"]) == 0
    assert main(["world", "eval-clip", "--model", str(tmp_path), "--n", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "precision" in out and "recall" in out and "F1" in out and "chance" in out


def test_demo_uses_the_builtin_world_clip_when_shipped(trained, tmp_path, monkeypatch):
    world_tiny = vlmkit.load("builtin:world-tiny", device="cpu")
    monkeypatch.setattr(world_clip, "BUILTIN_DIR", tmp_path)
    assert CLIP_NOTE in json.dumps(build_app(world_tiny, columns=2, examples=1).config)
    shutil.copytree(trained[0], tmp_path / "world-clip")
    assert CLIP_NOTE not in json.dumps(build_app(world_tiny, columns=2, examples=1).config)
    assert CLIP_NOTE in json.dumps(build_app(world_tiny, columns=2, examples=1, clip_model=None).config)


def test_shipped_world_clip_finds_the_objects():
    """The shipped checkpoint, on 40 val scenes it never trained on (0.94 F1 on 500 in docs/world.md)."""
    result = evaluate_presence(load_world_clip().probabilities, n=40)
    assert result["f1"] > 0.85 and result["precision"] > 0.85 and result["f1"] > 5 * result["base_rate"]
