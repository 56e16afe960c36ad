"""The synthetic world: deterministic scenes, faithful captions, COCO files pycocotools can load."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from vlmkit.cli import main
from vlmkit.decoders.base import Decoder
from vlmkit.world import CATEGORIES, SCENES, describe, render, sample_scene, scenes


def test_scenes_are_seeded_and_independent():
    assert sample_scene(5, seed=1) == sample_scene(5, seed=1)
    assert sample_scene(5, seed=1) != sample_scene(5, seed=2)
    assert np.array_equal(np.asarray(render(sample_scene(3, 0))), np.asarray(render(sample_scene(3, 0))))
    assert [s.image_id for s in scenes("val", 3)] == [10_000_000, 10_000_001, 10_000_002]


def test_world_breadth_and_priors():
    assert len(CATEGORIES) >= 30 and len(SCENES) >= 6
    assert len({(c.shape, c.mark) for c in CATEGORIES.values()}) == len(CATEGORIES)  # one glyph per category
    sample = [sample_scene(i, 0) for i in range(600)]
    kitchens = [set(s.categories) for s in sample if s.scene_type == "kitchen"]
    with_fork = [c for c in kitchens if "fork" in c]
    knife_given_fork = sum("knife" in c for c in with_fork) / len(with_fork)
    knife_overall = sum("knife" in s.categories for s in sample) / len(sample)
    assert knife_given_fork > 0.8 > 3 * knife_overall  # strong, known co-occurrence
    counts = Counter(c for s in sample for c in s.categories)
    assert len(counts) == len(CATEGORIES)  # every category shows up somewhere


def test_captions_name_every_object_with_its_colour():
    for image_id in range(50):
        scene = sample_scene(image_id, 0)
        caption = describe(scene).lower()
        for obj in scene.objects:
            category = CATEGORIES[obj.category]
            assert any(word in caption for word in (*category.words, category.plural)), (obj.category, caption)
            assert obj.color in caption
        assert caption.count(".") >= 2


def test_build_writes_coco_files(tmp_path, capsys):
    assert main(["world", "build", "--out", str(tmp_path), "--n", "6", "--seed", "3"]) == 0
    coco = COCO(str(tmp_path / "instances_val.json"))
    assert len(coco.getImgIds()) == 6
    first = coco.loadImgs(coco.getImgIds()[0])[0]
    assert (tmp_path / "images" / first["file_name"]).is_file()
    scene_lines = (tmp_path / "scenes_val.jsonl").read_text().splitlines()
    objects = sum(len(json.loads(line)["objects"]) for line in scene_lines)
    assert len(coco.getAnnIds()) == objects
    captions = json.loads((tmp_path / "captions_val.json").read_text())
    assert len(captions["annotations"]) == 6


def test_training_smoke_and_loading_path(tmp_path):
    """Two optimiser steps of the training loop on a micro model; the checkpoint loads like a hub model."""
    import vlmkit
    from vlmkit.world.train import TrainConfig, train

    out = train(TrainConfig(model="world-micro", steps=2, batch_size=2, workers=0, log_every=1), tmp_path / "ckpt",
                device="cpu")
    log = json.loads((out / "training.json").read_text())["log"]
    assert [entry["step"] for entry in log] == [1, 2] and all(np.isfinite(e["loss"]) for e in log)
    vlm = vlmkit.load(out, device="cpu", dtype="float32")
    generation = vlm.generate(render(sample_scene(0, 0)), "Describe the image in detail.", max_new_tokens=3)[0]
    assert generation.stats["visual_tokens_in"] == 576


# -- training inputs and CCA training ---------------------------------------------------------------------------------

CCA_QUESTIONS = ["Describe the image in detail.", "Is there a red cup in the image? Answer yes or no."]


@pytest.fixture(scope="module")
def world_io():
    """(tokenizer, processor) of the world models, built once per module."""
    from vlmkit.world.model import world_processor, world_tokenizer

    tokenizer = world_tokenizer()
    return tokenizer, world_processor(tokenizer)


def _messages(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def test_prompt_ids_and_normalize_match_the_processor(world_io):
    from vlmkit.world.train import normalize, prompt_token_ids

    _, processor = world_io
    for image_id, question in enumerate(CCA_QUESTIONS):
        image = render(sample_scene(image_id, 0))
        prompt = processor.apply_chat_template(_messages(question), add_generation_prompt=True)
        expected = processor(images=image, text=prompt, return_tensors="pt")
        ids = prompt_token_ids(processor, question)
        assert ids == expected["input_ids"][0].tolist()
        assert ids.count(processor.tokenizer.convert_tokens_to_ids(processor.image_token)) == 576
        pixels = torch.from_numpy(np.array(image))[None]
        assert pixels.dtype == torch.uint8 and pixels.shape == (1, 336, 336, 3)
        torch.testing.assert_close(normalize(pixels, processor.image_processor), expected["pixel_values"],
                                   atol=1e-5, rtol=0)


class _RecordLogits(Decoder):
    """Keeps the logits of every step (the prefill's first)."""

    def __init__(self):
        self.logits: list[torch.Tensor] = []

    def edit_logits(self, ctx, logits, hidden_by_layer):
        self.logits.append(logits.clone())


def _right_padded(processor, questions, image_ids):
    """A training-style batch (right-padded, as ``collate`` builds it) of chat prompts and their images."""
    from vlmkit.world.train import collate, normalize, prompt_token_ids

    items = []
    for question, image_id in zip(questions, image_ids):
        ids = torch.tensor(prompt_token_ids(processor, question))
        items.append({"input_ids": ids, "labels": torch.full_like(ids, -100),
                      "pixels": torch.from_numpy(np.array(render(sample_scene(image_id, 0))))})
    batch = collate(items, processor.tokenizer.pad_token_id)
    batch["pixel_values"] = normalize(batch.pop("pixels"), processor.image_processor)
    del batch["labels"]
    return batch


def test_concentric_inputs_batch_equals_rows(world_io):
    from vlmkit.decoders.cca import ring_ids
    from vlmkit.world.train import concentric_inputs

    tokenizer, processor = world_io
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    batch = _right_padded(processor, CCA_QUESTIONS, [0, 1])
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    assert lengths[0] != lengths[1]  # the shorter row is padded
    positions, mask = concentric_inputs(batch["input_ids"], batch["attention_mask"], image_token)
    length = batch["input_ids"].shape[1]
    assert positions.shape == (2, length) and mask.shape == (2, 1, length, length) and mask.dtype == torch.bool
    rings = ring_ids(24, 24)
    for row, n in enumerate(lengths):
        ids = batch["input_ids"][row : row + 1, :n]
        single_positions, single_mask = concentric_inputs(ids, torch.ones_like(ids), image_token)
        assert torch.equal(positions[row, :n], single_positions[0])
        assert torch.equal(mask[row, 0, :n, :n], single_mask[0, 0])
        assert not mask[row, 0, :, n:].any()  # padding keys are never attended
        assert mask[row, 0].any(dim=-1).all()  # every query (padding too) sees a key: no NaN rows in sdpa
        # the spec's layout: visual token (r, c) at p + ring, text after the image at p + 12, shifted by 576 - 12
        visual = (ids[0] == image_token).nonzero().squeeze(-1)
        first, last = int(visual[0]), int(visual[-1])
        expected = torch.arange(n)
        expected[visual] = first + rings
        expected[last + 1 :] = first + 12 + torch.arange(n - last - 1)
        assert torch.equal(single_positions[0], expected + 576 - 12)
        # inside the image: a query sees exactly the keys of its own ring and the outer ones
        block = single_mask[0, 0][first : last + 1, first : last + 1]
        assert torch.equal(block, rings.view(1, -1) <= rings.view(-1, 1))
        assert single_mask[0, 0][last + 1 :, : last + 1].all()  # text after the image sees everything before it


def test_concentric_training_inputs_match_the_cca_decoder(world_io):
    """A model trained with ``concentric=True`` sees in training exactly what ``cca`` gives it at inference."""
    import vlmkit
    from vlmkit.world.model import world_model
    from vlmkit.world.train import concentric_inputs

    tokenizer, processor = world_io
    torch.manual_seed(0)
    model = world_model("world-micro", tokenizer).float().eval()
    with torch.no_grad():  # sharper than the default init, so that the attention pattern shows in the logits
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2 and ("language_model" in name or "projector" in name):
                parameter.normal_(0, 0.3)
    model.config.concentric_causal_attention = True
    image_ids = [0, 1]
    batch = _right_padded(processor, CCA_QUESTIONS, image_ids)
    last = batch["attention_mask"].sum(dim=1) - 1
    rows = torch.arange(2)
    position_ids, attention_mask = concentric_inputs(batch["input_ids"], batch["attention_mask"],
                                                     model.config.image_token_id)
    with torch.no_grad():  # the training forward (before vlmkit touches the model; its attention is sdpa)
        trained = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                        attention_mask=attention_mask, position_ids=position_ids).logits[rows, last].float()
        plain = model(**batch).logits[rows, last].float()

    images = [render(sample_scene(i, 0)) for i in image_ids]
    for decoders, reference in ((["cca"], trained), ([], plain)):
        record = _RecordLogits()
        vlm = vlmkit.wrap(model, processor, decoders=[*decoders, record], attn="reference")
        batched = vlm.generate(images, CCA_QUESTIONS, max_new_tokens=1)
        torch.testing.assert_close(record.logits[0], reference, atol=1e-3, rtol=1e-4)
        assert [g.token_ids[0] for g in batched] == reference.argmax(dim=-1).tolist()
        for row in range(2 if decoders else 0):  # one by one (no padding) too
            single = _RecordLogits()
            vlmkit.wrap(model, processor, decoders=[*decoders, single], attn="reference").generate(
                images[row], CCA_QUESTIONS[row], max_new_tokens=1)
            torch.testing.assert_close(single.logits[0][0], reference[row], atol=1e-3, rtol=1e-4)
    # CCA really changes what the model computes, so the comparisons above are not vacuous
    assert (trained - plain).abs().max() > 0.1


def test_concentric_training_from_a_checkpoint(world_io, tmp_path):
    from vlmkit.errors import ConfigError
    from vlmkit.world.model import world_model
    from vlmkit.world.train import TrainConfig, train

    tokenizer, processor = world_io
    # the first run's checkpoint, as ``train`` saves it (bf16 shards and the processor), without its optimiser steps;
    # a seed other than the second run's, so that starting from random weights instead would show
    torch.manual_seed(1)
    first = tmp_path / "first"
    world_model("world-micro", tokenizer).to(torch.bfloat16).save_pretrained(first, max_shard_size="15MB")
    processor.save_pretrained(first)
    assert "concentric_causal_attention" not in json.loads((first / "config.json").read_text())
    out = train(TrainConfig(model="world-micro", steps=2, batch_size=2, workers=0, log_every=1, concentric=True,
                            init=str(first)), tmp_path / "cca", device="cpu")
    config = json.loads((out / "config.json").read_text())
    assert config["concentric_causal_attention"] is True
    log = json.loads((out / "training.json").read_text())
    assert log["config"]["init"] == str(first) and log["config"]["concentric"] is True
    assert [e["step"] for e in log["log"]] == [1, 2] and all(np.isfinite(e["loss"]) for e in log["log"])
    # it started from the first checkpoint (another seed's random init): two warm-up steps barely move the weights
    from safetensors.torch import load_file

    def weights(folder):
        return {k: v.float() for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

    before, after = weights(first), weights(out)
    assert before.keys() == after.keys()
    assert all(torch.allclose(after[k], before[k], atol=1e-3, rtol=0) for k in before)
    assert not all(torch.equal(after[k], before[k]) for k in before)
    # a checkpoint with other words cannot be the start
    other = world_model("world-micro", tokenizer)
    other.resize_token_embeddings(len(tokenizer) + 8)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match="world tokenizer"):
        train(TrainConfig(model="world-micro", steps=1, batch_size=2, workers=0, init=str(tmp_path / "other")),
              tmp_path / "never", device="cpu")
    assert not (tmp_path / "never" / "config.json").exists()


def test_init_vision_copies_only_the_vision_tower(world_io, tmp_path):
    from vlmkit.errors import ConfigError
    from vlmkit.world.model import world_model
    from vlmkit.world.train import copy_vision_tower

    tokenizer, processor = world_io
    torch.manual_seed(1)
    donor = world_model("world-micro", tokenizer)
    donor.save_pretrained(tmp_path / "donor")
    torch.manual_seed(2)
    model = world_model("world-micro", tokenizer)
    language_before = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    copy_vision_tower(model, str(tmp_path / "donor"))
    donor_vision = donor.model.vision_tower.state_dict()
    assert all(torch.equal(v, donor_vision[k]) for k, v in model.model.vision_tower.state_dict().items())
    assert all(torch.equal(v, language_before[k]) for k, v in model.model.language_model.state_dict().items())
    with pytest.raises(ConfigError, match="vision tower differs"):
        copy_vision_tower(model, "builtin:world-tiny")
