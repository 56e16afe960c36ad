"""The built-in world sets of ``vlmkit eval`` (vlmkit.evals.world) and the default CLI runs on them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vlmkit.cli import main
from vlmkit.evals import chair, mmhal, pope, world
from vlmkit.evals.files import md5
from vlmkit.evals.words import pipeline
from vlmkit.world import CATEGORIES, describe
from vlmkit.world.scene import sample_scene
from vlmkit.world.tasks import absent_categories, name_of


def scene_of(image: str):
    return sample_scene(int(image.rsplit("_", 1)[1].split(".")[0]), world.SEED)


def test_pope_set_follows_the_pope_protocol():
    splits = {split: world.pope_questions(split) for split in pope.SPLITS}
    assert all(len(questions) == 6 * world.SIZE for questions in splits.values())
    for split, questions in splits.items():
        assert [q["label"] for q in questions[:6]] == ["yes", "no"] * 3
        assert [q["question_id"] for q in questions] == list(range(1, len(questions) + 1))
        for question in questions[:60]:
            scene = scene_of(question["image"])
            asked = question["text"].removeprefix("Is there a ").removesuffix(" in the image?")
            present = {w for c in scene.categories for w in CATEGORIES[c].words}
            assert (asked in present) == (question["label"] == "yes")
    positives = [[q["text"] for q in qs if q["label"] == "yes"] for qs in splits.values()]
    assert positives[0] == positives[1] == positives[2]  # only the negatives differ between splits
    negatives = {s: [q["text"] for q in qs if q["label"] == "no"] for s, qs in splits.items()}
    assert len(set(negatives["popular"])) < len(set(negatives["random"]))
    scene = scene_of(splits["adversarial"][0]["image"])
    expected = absent_categories(scene, np.random.default_rng(0), "adversarial")[:3]
    assert negatives["adversarial"][:3] == [f"Is there a {name_of(c)} in the image?" for c in expected]


def test_pope_set_files_are_stable_and_render_only_what_runs(tmp_path):
    files, images = world.pope_set(tmp_path, limit=8)
    assert [pope.split_name(f) for f in files] == list(pope.SPLITS)
    questions = pope.read_questions(files[0])
    assert len(questions) == 6 * world.SIZE
    assert sorted(p.name for p in images.iterdir()) == sorted({q.image for q in questions[:8]})  # two images
    sums = [md5(f) for f in files]
    assert [md5(f) for f in world.pope_set(tmp_path, limit=2)[0]] == sums


def test_world_tables_read_world_captions_exactly():
    """The ground-truth captions of 200 scenes: every object found, nothing hallucinated ("orange" colours)."""
    ids = list(range(10_000_000, 10_000_200))
    captions = [(i, describe(sample_scene(i, world.SEED))) for i in ids]
    assert any(" orange " in c and "orange" not in world.ground_truth([i]).objects[i] for i, c in captions)
    metrics, _ = chair.score(captions, world.ground_truth(ids), pipeline("offline"), world.word_tables())
    assert (metrics["chair_i"], metrics["chair_s"], metrics["recall"]) == (0.0, 0.0, 1.0)


@pytest.mark.parametrize("caption, nodes", [
    ("There is a small orange cat on the left.", ["cat"]),
    ("An orange can be seen at the top.", ["orange"]),
    ("There are two orange and red oranges in the picture.", ["orange"]),
    ("At the top there is a small orange, orange in colour.", ["orange"]),
    ("There are two black traffic lights and a table.", ["traffic light", "dining table"]),
    ("Two puppies sit on a sofa near three knives.", ["dog", "couch", "knife"]),
])
def test_world_tables(caption, nodes):
    assert chair.mentions(caption, pipeline("offline"), world.word_tables()).nodes == nodes


def test_opera_tables_keep_orange_as_an_object():
    assert chair.mentions("A small orange cat.", pipeline("offline"), chair.WordTables.from_synonyms()).nodes == \
        ["orange", "cat"]


def test_mmhal_set_rules_accept_the_true_answers_only():
    records = world.mmhal_records()[:64]
    assert [r["question_type"] for r in records[:8]] == list(mmhal.TYPES)
    true = [mmhal.rule_rating({**r, "model_answer": r["gt_answer"]}) for r in records]
    assert true == [6] * len(records)
    swapped = [mmhal.rule_rating({**r, "model_answer": o["gt_answer"]}) for r, o in zip(records, records[8:])]
    assert sum(swapped) / len(swapped) < 3  # another record's answer (same type) is mostly wrong


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_default_pope_runs_world_tiny_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "pope", "--limit", "2", "--no-progress"]) == 0
    out = tmp_path / "vlmkit-eval" / "pope-builtin_world-tiny"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == "builtin:world-tiny" and manifest["prompt"].endswith(world.POPE_SUFFIX)
    assert sorted(manifest["data"]) == [f"world_pope_{s}.json" for s in sorted(pope.SPLITS)]
    first = lines(out / "predictions.jsonl")
    assert [(r["split"], r["question_id"]) for r in first] == [(s, q) for s in pope.SPLITS for q in (1, 2)]
    assert {r["text"] for r in first} <= {"yes", "no"}
    assert "mean" in capsys.readouterr().out
    assert main(["eval", "pope", "--limit", "3", "--no-progress"]) == 0  # 3 new questions, 6 from disk
    assert len(lines(out / "predictions.part0.jsonl")) == 9
    assert lines(out / "predictions.jsonl")[:2] == first[:2]
    assert json.loads((out / "metrics.json").read_text())["splits"]["random"]["n"] == 3
    assert main(["eval", "pope", "--limit", "1", "--no-progress", "--pruner", "fastv:keep=0.25"]) == 0
    pruned = lines(tmp_path / "vlmkit-eval" / "pope-builtin_world-tiny-fastv_keep=0.25" / "predictions.jsonl")
    assert {tuple(r["visual_tokens_by_layer"]) for r in pruned} == {(576, 576, 144, 144, 144, 144)}  # after layer 2


def test_pruner_sweep_on_the_world(tmp_path, capsys):
    argv = ["eval", "pope", "--limit", "1", "--no-progress", "--out", str(tmp_path), "--pruner", "visionzip:keep=64",
            "--pruner", "fastv:keep=0.25"]
    assert main(argv) == 0
    assert (tmp_path / "sweep.png").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fastv_keep=0.25", "sweep.png", "visionzip_keep=64", "world"]
    out = capsys.readouterr().out
    assert "visionzip:keep=64 (64 kept)" in out and "fastv:keep=0.25 (288 kept)" in out


def test_default_chair_and_mmhal(tmp_path, capsys):
    assert main(["eval", "chair", "--limit", "2", "--max-new-tokens", "40", "--no-progress",
                 "--out", str(tmp_path / "c")]) == 0
    metrics = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert metrics["n"] == 2 and metrics["recall"] > 0 and "world" in metrics["ground_truth"]
    captions = [(r["image_id"], r["text"]) for r in lines(tmp_path / "c" / "predictions.jsonl")]
    expected, _ = chair.score(captions, world.ground_truth([i for i, _ in captions]), pipeline(), world.word_tables())
    assert {k: metrics[k] for k in ("chair_s", "chair_i", "recall")} == \
        {k: expected[k] for k in ("chair_s", "chair_i", "recall")}
    score_only = tmp_path / "caps.jsonl"
    score_only.write_text("".join(json.dumps({"image_id": i, "caption": c}) + "\n" for i, c in captions))
    assert main(["eval", "chair", "--predictions", str(score_only), "--annotations", "world",
                 "--out", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / "metrics.json").read_text())["chair_i"] == metrics["chair_i"]

    assert main(["eval", "mmhal", "--limit", "8", "--max-new-tokens", "24", "--no-progress",
                 "--out", str(tmp_path / "m")]) == 0
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["judge"] == "rules" and list(metrics["per_type"]) == list(mmhal.TYPES)
    assert "judge: rules" in capsys.readouterr().out
    filled = tmp_path / "m" / "filled_template.json"
    assert main(["eval", "mmhal", "--predictions", str(filled), "--rules", "--out", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["score"] == metrics["score"]


@pytest.mark.parametrize("argv, needle", [
    (["pope", "--questions", "world", "--images", "."], "renders its own images"),
    (["pope", "--limit", "0"], "--limit must be at least 1"),
    (["chair", "--ids", "ids.txt"], "--ids selects COCO images"),
    (["pope", "--questions", "coco"], "need --images"),
    (["pope", "--pruner", "nope:keep=1"], "nope"),
])
def test_bad_input_is_one_line(argv, needle, tmp_path, capsys):
    assert main(["eval", *argv, "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # (after the model's loading bar)
    assert error.startswith("vlmkit: error:") and needle in error


def test_a_bad_spec_in_a_sweep_fails_before_any_run(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["eval", "pope", "--pruner", "uniform:keep=64", "--pruner", "nope:keep=1", "--out", str(out),
                 "--no-progress"]) == 2
    assert "unknown pruner 'nope'" in capsys.readouterr().err
    assert not out.exists()
