"""Built-in evaluation sets on the synthetic world (``vlmkit.world``), the offline default of ``vlmkit eval``.

Each set is written into a folder as ordinary benchmark files, so the file-based code of :mod:`vlmkit.evals.tasks`
runs it unchanged: POPE question files (one per split) and an MMHal-style template whose records carry structured
``facts`` for the rule judge. CHAIR ground truth is each scene's objects, scored with the world's own synonym table.
Sets are drawn from the world's val split (seed 0) at a fixed size, so their files never change; only the images
the items to run need are rendered, into ``folder/images`` (kept for re-runs).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vlmkit.evals import chair, pope
from vlmkit.evals.files import write_atomic
from vlmkit.world.catalog import CATEGORIES, COLORS
from vlmkit.world.dataset import SPLIT_OFFSETS, file_name
from vlmkit.world.render import render
from vlmkit.world.scene import Scene, sample_scene
from vlmkit.world.tasks import (CAPTION_PROMPT, MMHAL_TYPES, POPE_SUFFIX, absent_categories, mmhal_sample, name_of,
                                presence_sample)

SPLIT = "val"
SEED = 0
#: scenes (CHAIR, POPE) or records (MMHal) in each set; a run can take a prefix (``limit``)
SIZE = 500
POPE_PER_IMAGE = 3
TEMPLATE_FILE = "world_mmhal_template.json"
DESCRIPTION = f"world {SPLIT} split, seed {SEED}"


def _scenes(min_categories: int = 1) -> Iterator[Scene]:
    """The val scenes in id order, those with at least ``min_categories`` distinct objects."""
    image_id = SPLIT_OFFSETS[SPLIT]
    while True:
        scene = sample_scene(image_id, SEED)
        if len(scene.categories) >= min_categories:
            yield scene
        image_id += 1


def _take(scenes: Iterator[Scene], n: int) -> list[Scene]:
    return [next(scenes) for _ in range(n)]


def render_images(folder: str | Path, image_ids: list[int]) -> Path:
    """Render the images of ``image_ids`` that ``folder/images`` lacks; returns that folder."""
    images = Path(folder) / "images"
    images.mkdir(parents=True, exist_ok=True)
    for image_id in dict.fromkeys(image_ids):
        path = images / file_name(SPLIT, image_id)
        if not path.is_file():
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # ranks may render at once
            render(sample_scene(image_id, SEED)).save(tmp, format="PNG")
            os.replace(tmp, path)
    return images


def _image_id(name: str) -> int:
    return int(Path(name).stem.rsplit("_", 1)[1])


def _write(path: Path, text: str) -> Path:
    if not path.is_file() or path.read_text() != text:
        write_atomic(path, text)
    return path


# ---- POPE -----------------------------------------------------------------------------------------------------

def pope_questions(split: str, scenes: list[Scene] | None = None) -> list[dict]:
    """The world POPE set of ``split``: for each scene with 3+ objects, its first 3 objects (yes), each followed by
    an absent object (no) ranked by :func:`vlmkit.world.tasks.absent_categories` (random: seeded per scene;
    popular: frequent in all scene types; adversarial: frequent in this scene type). Official file format.
    ``scenes``: the set's scenes, when already drawn."""
    records = []
    for scene in scenes or _take(_scenes(POPE_PER_IMAGE), SIZE):
        rng = np.random.default_rng([SEED, scene.image_id, pope.SPLITS.index(split)])
        negatives = absent_categories(scene, rng, split)
        for positive, negative in zip(scene.categories[:POPE_PER_IMAGE], negatives):
            for category in (positive, negative):
                sample = presence_sample(scene, category, short=False)
                records.append({"question_id": len(records) + 1, "image": file_name(SPLIT, scene.image_id),
                                "text": sample.prompt, "label": "yes" if sample.facts["present"] else "no"})
    return records


def pope_set(folder: str | Path, limit: int | None) -> tuple[list[Path], Path]:
    """Write the three question files into ``folder`` and render the images of the first ``limit`` questions of
    each split; returns ``(question files, image folder)``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files, needed, scenes = [], [], _take(_scenes(POPE_PER_IMAGE), SIZE)
    for split in pope.SPLITS:
        questions = pope_questions(split, scenes)
        text = "".join(json.dumps(q) + "\n" for q in questions)
        files.append(_write(folder / f"world_pope_{split}.json", text))
        needed += [_image_id(q["image"]) for q in questions[:limit]]
    return files, render_images(folder, needed)


# ---- CHAIR ----------------------------------------------------------------------------------------------------

def word_tables() -> chair.WordTables:
    """CHAIR tables for world captions: every caption word, plural and COCO name of a category maps to the COCO
    name; two-word names are merged pairs (also "pot plant": the tagger reads "potted" as a verb); "orange" used
    as a colour is no object."""
    synonyms = {word: name for name, category in CATEGORIES.items()
                for word in (name, *category.words, category.plural)}
    pairs = {word: word for word in synonyms if word.count(" ") == 1} | {"pot plant": "potted plant"}
    return chair.WordTables(synonyms, pairs, frozenset(COLORS) & set(synonyms))


def ground_truth(image_ids: list[int]) -> chair.GroundTruth:
    """Each image's object categories (COCO names), straight from its scene."""
    objects = {i: set(sample_scene(i, SEED).categories) for i in image_ids}
    return chair.GroundTruth(objects, f"{DESCRIPTION} (scene objects)",
                             {i: file_name(SPLIT, i) for i in image_ids})


def chair_set(folder: str | Path, limit: int | None) -> tuple[list[int], chair.GroundTruth, Path]:
    """The first ``limit`` of the set's image ids, their ground truth, and the folder with their images."""
    ids = [scene.image_id for scene in _take(_scenes(), SIZE)][:limit]
    return ids, ground_truth(ids), render_images(folder, ids)


# ---- MMHal-Bench ----------------------------------------------------------------------------------------------

def mmhal_records() -> list[dict]:
    """MMHal-style records, one scene each, cycling through the eight question types (a scene that cannot
    support a type is skipped). Comparison ``facts`` name objects by their caption words, as answers do;
    described ``objects`` are read with the world's synonym table."""
    scenes, records = _scenes(), []
    while len(records) < SIZE:
        kind = MMHAL_TYPES[len(records) % len(MMHAL_TYPES)]
        scene = next(scenes)
        sample = mmhal_sample(scene, kind, np.random.default_rng([SEED, scene.image_id, len(records)]))
        if sample is None:
            continue
        facts = dict(sample.facts)
        if "larger" in facts:
            facts = {"objects": [name_of(c) for c in facts["objects"]], "larger": name_of(facts["larger"])}
        elif "objects" in facts:
            facts["vocabulary"] = "world"
        records.append({"question_type": kind, "question": sample.prompt, "gt_answer": sample.answer,
                        "image_content": [name_of(c) for c in scene.categories], "image_id": scene.image_id,
                        "image": file_name(SPLIT, scene.image_id), "facts": facts})
    return records


def mmhal_set(folder: str | Path, limit: int | None) -> tuple[Path, Path]:
    """Write the template into ``folder`` and render the images of its first ``limit`` records; returns
    ``(template, image folder)``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    records = mmhal_records()
    template = _write(folder / TEMPLATE_FILE, json.dumps(records, indent=1) + "\n")
    return template, render_images(folder, [r["image_id"] for r in records[:limit]])
