"""The synthetic world: deterministic scenes, faithful captions, COCO files pycocotools can load."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
from pycocotools.coco import COCO

from vlmkit.cli import main
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
