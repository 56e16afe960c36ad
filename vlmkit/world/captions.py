"""Detailed, multi-sentence ground-truth captions that name every object with a COCO (CHAIR) synonym."""

from __future__ import annotations

from collections import Counter

import numpy as np

from vlmkit.world.catalog import CATEGORIES, SCENES
from vlmkit.world.scene import Scene, WorldObject

NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}


def describe(scene: Scene, seed: int = 0) -> str:
    """A caption such as "This is a picture of a kitchen. There is a large red cup on the left. ..."."""
    rng = np.random.default_rng([seed, scene.image_id, 7])
    sentences = [f"This is a picture of {SCENES[scene.scene_type].phrase}."]
    counts = Counter(o.category for o in scene.objects)
    described = set()
    order = sorted(scene.objects, key=lambda o: -o.bbox[2])  # larger things first, as people describe
    for obj in order:
        if obj.category in described:
            continue
        described.add(obj.category)
        sentences.append(_sentence(obj, counts[obj.category], scene, rng))
    return " ".join(sentences)


def _sentence(obj: WorldObject, count: int, scene: Scene, rng: np.random.Generator) -> str:
    category = CATEGORIES[obj.category]
    if count > 1:
        same = [o for o in scene.objects if o.category == obj.category]
        colors = sorted({o.color for o in same})
        color = colors[0] if len(colors) == 1 else " and ".join(colors)
        return f"There are {NUMBER_WORDS.get(count, str(count))} {color} {category.plural} in the picture."
    word = category.words[rng.integers(len(category.words))]
    templates = (
        f"There is {_a(obj.size)} {obj.size} {obj.color} {word} {obj.region}.",
        f"{_a(obj.color).capitalize()} {obj.color} {word} can be seen {obj.region}.",
        f"{obj.region.capitalize()} there is {_a(obj.size)} {obj.size} {word}, {obj.color} in colour.",
    )
    return templates[rng.integers(len(templates))]


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"
