"""POPE (Li et al. 2023): question files, building new question sets, answer parsers P1-P5, metrics (spec §2)."""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vlmkit.errors import ConfigError, DataError
from vlmkit.evals.files import checked, coco_index, read_records

SPLITS = ("random", "popular", "adversarial")
TEMPLATE = "Is there a {} in the image?"


@dataclass(frozen=True)
class Question:
    question_id: int
    image: str
    text: str
    label: str  # "yes" or "no"
    split: str


def split_name(path: str | Path) -> str:
    """The split a question file holds, from its name (``coco_pope_popular.json`` -> ``popular``)."""
    stem = Path(path).name.split(".")[0]
    return next((split for split in SPLITS if split in stem), stem)


def read_questions(path: str | Path, split: str | None = None) -> list[Question]:
    """An official POPE file, JSON lines (COCO) or a JSON array (A-OKVQA / GQA SEEM), in file order."""
    split = split or split_name(path)
    questions, seen = [], set()
    for line, record in read_records(path):
        where = f"{path}: line {line}"
        qid = checked(record, "question_id", int, where)
        if qid in seen:
            raise DataError(f"{where}: question_id {qid} appears twice")
        seen.add(qid)
        label = checked(record, "label", str, where, lambda v: v.strip().lower() in ("yes", "no"))
        questions.append(Question(qid, checked(record, "image", str, where), checked(record, "text", str, where),
                                  label.strip().lower(), split))
    if not questions:
        raise DataError(f"{path}: no questions in this file")
    return questions


# ---- answer parsers -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Parser:
    """``parse(answer, label) -> (prediction or None, explicit)``; ``explicit`` is False when the answer holds no
    recognisable yes/no and the rule fell back to a default (these are counted as unparseable). ``unknown_as``
    says how a None prediction enters precision/recall/F1: excluded (lmms-eval) or as "no" (VLMEvalKit); it is
    always wrong for accuracy."""

    name: str
    description: str
    parse: Callable[[str, str], tuple[str | None, bool]]
    unknown_as: str | None = None


def _has_yes(words: Sequence[str]) -> bool:
    return any(w.strip(string.punctuation).lower() == "yes" for w in words)


def _official(answer: str, label: str) -> tuple[str | None, bool]:
    text = answer.split(".")[0].replace(",", "")
    words = text.split(" ")
    if "No" in words or "not" in words or "no" in words:
        return "no", True
    return "yes", _has_yes(words)


def _opera(answer: str, label: str) -> tuple[str | None, bool]:
    words = answer.replace(".", "").replace(",", "").split(" ")
    if any(w in ("No", "not", "no", "NO") or w.endswith("n't") for w in words):
        return "no", True
    return "yes", _has_yes(words)


def _vcd(answer: str, label: str) -> tuple[str | None, bool]:
    text = answer.lower()
    correct = ("yes" if label == "yes" else "no") in text
    other = "no" if label == "yes" else "yes"
    return (label if correct else other), ("yes" in text or "no" in text)


def _lmms_eval(answer: str, label: str) -> tuple[str | None, bool]:
    text = answer.lower().strip()
    return (text, True) if text in ("yes", "no") else (None, False)


_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def _vlmevalkit(answer: str, label: str) -> tuple[str | None, bool]:
    words = _PUNCTUATION.sub(" ", answer.lower()).split()
    if "yes" in words and "no" not in words:
        return "yes", True
    if "no" in words and "yes" not in words:
        return "no", True
    return None, False


PARSERS = {
    "official": Parser("official", "P1 official POPE/LLaVA: first sentence; no if a word is No/not/no, else yes",
                       _official),
    "opera": Parser("opera", "P2 OPERA/PAI/VISTA: whole answer; no if a word is No/not/no/NO or ends in n't",
                    _opera),
    "vcd": Parser("vcd", "P3 VCD: label-conditional substring test ('yes'/'no' in the lower-cased answer)", _vcd),
    "lmms-eval": Parser("lmms-eval", "P4 lmms-eval: exact match of the stripped lower-cased answer", _lmms_eval,
                        unknown_as=None),
    "vlmevalkit": Parser("vlmevalkit", "P5 VLMEvalKit exact matching: yes without no, or no without yes; "
                         "else unknown (counted as no in F1)", _vlmevalkit, unknown_as="no"),
}
PARSER_ALIASES = {"p1": "official", "p2": "opera", "p3": "vcd", "p4": "lmms-eval", "p5": "vlmevalkit"}


def parser(name: str = "official") -> Parser:
    """A parser by name (official, opera, vcd, lmms-eval, vlmevalkit) or by its spec id (P1-P5)."""
    key = PARSER_ALIASES.get(name.lower(), name.lower())
    if key not in PARSERS:
        raise ConfigError(f"unknown POPE parser {name!r}; choose one of {', '.join(PARSERS)} (or P1-P5)")
    return PARSERS[key]


# ---- metrics --------------------------------------------------------------------------------------------------

def split_metrics(labels: Sequence[str], answers: Sequence[str], answer_parser: Parser) -> dict:
    """Accuracy, precision, recall, F1 (yes = positive), yes-ratio and unparseable (fractions) plus the counts."""
    if len(labels) != len(answers) or not labels:
        raise DataError(f"got {len(answers)} answers for {len(labels)} questions; answer every question")
    tp = fp = tn = fn = correct = yes = unparseable = 0
    for label, answer in zip(labels, answers):
        prediction, explicit = answer_parser.parse(answer, label)
        unparseable += not explicit
        correct += prediction == label
        yes += prediction == "yes"
        if prediction is None:
            prediction = answer_parser.unknown_as
            if prediction is None:
                continue
        if prediction == "yes":
            tp, fp = tp + (label == "yes"), fp + (label == "no")
        else:
            tn, fn = tn + (label == "no"), fn + (label == "yes")
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    n = len(labels)
    return {
        "accuracy": correct / n,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": yes / n,
        "unparseable": unparseable / n,
        "n": n, "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


METRIC_KEYS = ("accuracy", "precision", "recall", "f1", "yes_ratio", "unparseable")


def score(questions: Sequence[Question], answers: dict[tuple[str, int], str], answer_parser: Parser) -> dict:
    """Metrics per split and their mean. ``answers`` maps ``(split, question_id)`` to the model's text; every
    question needs one."""
    by_split: dict[str, list[Question]] = {}
    for question in questions:
        by_split.setdefault(question.split, []).append(question)
    splits = {}
    for split, items in by_split.items():
        missing = [q.question_id for q in items if (split, q.question_id) not in answers]
        if missing:
            raise DataError(f"split {split!r}: no answer for {len(missing)} questions (first: {missing[0]}); "
                            "answer every question or pass the matching questions file")
        splits[split] = split_metrics([q.label for q in items], [answers[split, q.question_id] for q in items],
                                      answer_parser)
    mean = {key: sum(m[key] for m in splits.values()) / len(splits) for key in METRIC_KEYS}
    return {**mean, "splits": splits, "parser": answer_parser.name, "parser_rule": answer_parser.description}


# ---- building question sets -----------------------------------------------------------------------------------

def build_questions(
    image_objects: dict[str, list[str]], split: str, *, seed: int = 0, images: int = 500, per_image: int = 3,
) -> list[dict]:
    """A POPE question set (spec §2.1) from ``{image file: objects in annotation order}``.

    Images with at least ``per_image`` distinct objects are sampled (seeded; the same images and positives for
    every split of one seed). Each image gets, for its first ``per_image`` objects, a "yes" question followed by a
    "no" question about an absent object: uniform over all sampled objects (``random``), the most frequent
    (``popular``) or the one co-occurring most with the positive (``adversarial``, falling back to random).
    Ties are broken by name. Returns records in the official file format.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown POPE split {split!r}; choose one of {', '.join(SPLITS)}")
    objects = {image: list(dict.fromkeys(objs)) for image, objs in image_objects.items()}
    eligible = sorted(image for image, objs in objects.items() if len(objs) >= per_image)
    if len(eligible) < images:
        raise DataError(f"only {len(eligible)} images have {per_image}+ objects; ask for at most that many images")
    sampled = random.Random(seed).sample(eligible, images)
    frequency = Counter(obj for image in sampled for obj in objects[image])
    cooccur: dict[str, Counter] = {}
    for image in sampled:
        for a in objects[image]:
            cooccur.setdefault(a, Counter()).update(b for b in objects[image] if b != a)
    vocabulary = sorted(frequency)
    by_frequency = sorted(vocabulary, key=lambda o: (-frequency[o], o))
    rng = random.Random(f"{seed}-{split}")
    records, qid = [], 1
    for image in sampled:
        present, asked = set(objects[image]), set()
        for positive in objects[image][:per_image]:
            valid = [o for o in vocabulary if o not in present and o not in asked]
            if not valid:
                raise DataError(f"image {image}: no absent object left to ask about; use more images or objects")
            if split == "popular":
                negative = next(o for o in by_frequency if o in valid)
            elif split == "adversarial" and any(o in valid for o in cooccur.get(positive, {})):
                partners = cooccur[positive]
                negative = min((o for o in partners if o in valid), key=lambda o: (-partners[o], o))
            else:
                negative = rng.choice(valid)
            asked.add(negative)
            for obj, label in ((positive, "yes"), (negative, "no")):
                records.append({"question_id": qid, "image": image, "text": question_text(obj), "label": label})
                qid += 1
    return records


def question_text(obj: str) -> str:
    article = "an" if obj[:1].lower() in "aeiou" else "a"
    return TEMPLATE.replace("a {}", f"{article} {obj}")


def image_objects_from_coco(path: str | Path) -> dict[str, list[str]]:
    """``{file_name: category names in annotation order}`` from a COCO instances JSON (images without objects
    are left out)."""
    coco = coco_index(Path(path))
    objects: dict[str, list[str]] = {}
    for annotation in coco.dataset["annotations"]:
        image = coco.imgs.get(annotation.get("image_id"))
        category = coco.cats.get(annotation.get("category_id"))
        if image is None or category is None:
            raise DataError(f"{path}: annotation {annotation.get('id')} names an unknown image or category")
        objects.setdefault(image["file_name"], []).append(category["name"])
    return objects
