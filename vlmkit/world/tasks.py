"""Questions about a world scene with exact answers: captions, yes/no presence (POPE-style) and the eight
MMHal-Bench question types. Used to train the built-in models and to build evaluation sets."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from vlmkit.world.captions import NUMBER_WORDS, describe
from vlmkit.world.catalog import CATEGORIES, SCENES
from vlmkit.world.scene import Scene

CAPTION_PROMPT = "Describe the image in detail."
POPE_SUFFIX = " Answer the question using a single word or phrase."
MMHAL_TYPES = ("attribute", "adversarial", "comparison", "counting", "relation", "environment", "holistic", "other")


@dataclass
class Sample:
    prompt: str
    answer: str
    kind: str
    facts: dict = field(default_factory=dict)  # the structured answer, for rule judging


def name_of(category: str) -> str:
    return CATEGORIES[category].words[0]


def caption_sample(scene: Scene, seed: int = 0) -> Sample:
    return Sample(CAPTION_PROMPT, describe(scene, seed), "caption", {"objects": scene.categories})


def presence_sample(scene: Scene, category: str, short: bool) -> Sample:
    present = category in scene.categories
    question = f"Is there a {name_of(category)} in the image?"
    if short:
        return Sample(question + POPE_SUFFIX, "Yes" if present else "No", "presence",
                      {"object": category, "present": present})
    answer = f"Yes, there is a {name_of(category)}." if present else f"No, there is no {name_of(category)}."
    return Sample(question, answer, "presence", {"object": category, "present": present})


def absent_categories(scene: Scene, rng: np.random.Generator, mode: str) -> list[str]:
    """Absent categories, ordered by the POPE negative-sampling ``mode``: random, popular (frequent overall) or
    adversarial (frequent in this scene type, i.e. co-occurring with what is present)."""
    absent = [c for c in CATEGORIES if c not in scene.categories]
    if mode == "random":
        return [absent[i] for i in rng.permutation(len(absent))]
    if mode == "adversarial":
        prior = SCENES[scene.scene_type].objects
        return sorted(absent, key=lambda c: (-prior.get(c, 0.0), c))
    popularity = Counter(c for s in SCENES.values() for c in s.objects)
    return sorted(absent, key=lambda c: (-popularity[c], c))


def mmhal_sample(scene: Scene, kind: str, rng: np.random.Generator) -> Sample | None:
    """One question of MMHal type ``kind`` about ``scene`` (None if the scene cannot support it)."""
    counts = Counter(o.category for o in scene.objects)
    singles = [o for o in scene.objects if counts[o.category] == 1]
    if kind == "attribute" and singles:
        obj = singles[rng.integers(len(singles))]
        return Sample(f"What color is the {name_of(obj.category)}?", f"The {name_of(obj.category)} is {obj.color}.",
                      kind, {"object": obj.category, "color": obj.color})
    if kind == "adversarial":
        absent = absent_categories(scene, rng, "adversarial")[0]
        return Sample(f"What color is the {name_of(absent)}?", f"There is no {name_of(absent)} in the image.", kind,
                      {"object": absent, "present": False})
    if kind == "comparison" and len(singles) >= 2:
        a, b = (singles[i] for i in rng.choice(len(singles), 2, replace=False))
        if a.bbox[2] == b.bbox[2]:
            return None
        larger = a if a.bbox[2] > b.bbox[2] else b
        return Sample(f"Which is larger, the {name_of(a.category)} or the {name_of(b.category)}?",
                      f"The {name_of(larger.category)} is larger.", kind,
                      {"objects": [a.category, b.category], "larger": larger.category})
    if kind == "counting":
        category = list(counts)[rng.integers(len(counts))]
        n = counts[category]
        answer = (f"There is one {name_of(category)}." if n == 1
                  else f"There are {NUMBER_WORDS.get(n, n)} {CATEGORIES[category].plural}.")
        return Sample(f"How many {CATEGORIES[category].plural} are there in the image?", answer, kind,
                      {"object": category, "count": n})
    if kind == "relation" and singles:
        obj = singles[rng.integers(len(singles))]
        return Sample(f"Where is the {name_of(obj.category)}?", f"The {name_of(obj.category)} is {obj.region}.", kind,
                      {"object": obj.category, "region": obj.region})
    if kind == "environment":
        phrase = SCENES[scene.scene_type].phrase
        return Sample("What kind of place is shown in the image?", f"This is {phrase}.", kind,
                      {"scene": scene.scene_type})
    if kind == "holistic":
        return Sample(CAPTION_PROMPT, describe(scene), kind, {"objects": scene.categories})
    if kind == "other":
        category = list(counts)[rng.integers(len(counts))] if rng.random() < 0.5 else absent_categories(
            scene, rng, "adversarial")[0]
        sample = presence_sample(scene, category, short=False)
        sample.kind = kind
        return sample
    return None


def training_sample(scene: Scene, rng: np.random.Generator) -> Sample:
    """The training mixture: 40% captions, 30% yes/no presence (balanced; negatives from all three POPE modes),
    30% MMHal-style questions."""
    draw = rng.random()
    if draw < 0.4:
        return caption_sample(scene, int(rng.integers(2**31)))
    if draw < 0.7:
        if rng.random() < 0.5:
            category = scene.categories[rng.integers(len(scene.categories))]
        else:
            mode = ("random", "popular", "adversarial")[rng.integers(3)]
            category = absent_categories(scene, rng, mode)[int(rng.integers(3))]
        return presence_sample(scene, category, short=rng.random() < 0.7)
    while (sample := mmhal_sample(scene, MMHAL_TYPES[rng.integers(len(MMHAL_TYPES))], rng)) is None:
        pass
    return sample
