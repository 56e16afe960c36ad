"""MMHal-Bench (Sun et al. 2023): the response template, the judge rubric, rating parsing, metrics, and a
judge-free rule mode for records with structured answers (spec §3)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from vlmkit.errors import DataError
from vlmkit.evals.files import checked, data_file, read_json

TEMPLATE_FILE = "mmhal/response_template.json"
TYPES = ("attribute", "adversarial", "comparison", "counting", "relation", "environment", "holistic", "other")
HALLUCINATION_BELOW = 3  # ratings 0-2 are the "with hallucination" grades


def read_template(path: str | Path | None = None) -> list[dict]:
    """The records of a response template (default: the 96 MMHal-Bench records), in file order.

    Each record needs ``question_type``, ``question`` and ``gt_answer`` (str) and ``image_content`` (list of
    str); ``model_answer`` defaults to "" and ``image_id`` / ``image_src`` / ``facts`` are kept as they are.
    """
    path = path or data_file(TEMPLATE_FILE)
    records = read_json(path)
    if not isinstance(records, list) or not records:
        raise DataError(f"{path}: expected a non-empty JSON array of MMHal-Bench records")
    out = []
    for index, record in enumerate(records, start=1):
        where = f"{path}: record {index}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object")
        for key in ("question_type", "question", "gt_answer"):
            checked(record, key, str, where)
        checked(record, "image_content", list, where, lambda v: all(isinstance(x, str) for x in v))
        if "model_answer" in record:
            checked(record, "model_answer", str, where)
        out.append({**record, "model_answer": record.get("model_answer", "")})
    return out


RUBRIC = """You are an impartial judge. A large multimodal model (LMM) answered a question about an image. You cannot \
see the image: you get a list of the objects and labels it contains, the question, an answer written by a person, \
and the LMM's answer. Judge the LMM's answer on two things.
- Informativeness: how much useful, relevant content it gives about the question.
- Hallucination: whether it claims something about the image (objects, their number, attributes, actions, \
feelings, text, places, ...) that the image contents and the human answer neither state nor imply.

Some guidance, by example:
1. Contents: dog, frisbee, grass. Question: how many dogs are there? Human: there is one dog. LMM: there are two \
dogs chasing a frisbee. A wrong count is a hallucination. Hallucination: yes.
2. Contents: car, street, tree. Question: what colour is the car? Human: the car is red. LMM: the car is red and \
it is parked at the side of a street lined with trees. Extra details that agree with the contents are fine. \
Hallucination: no.
3. Contents: bench, park. Question: who is sitting on the bench? Human: nobody is sitting on it. LMM: I cannot \
tell who is sitting there. Not answering, or saying it is unsure, is not a hallucination. Hallucination: no.
4. Contents: kitchen, oven, pot. Question: what is being cooked? Human: soup. LMM: there is a pot on the oven, so \
something like soup or stew is probably being cooked; the exact dish cannot be seen. Careful reasoning that makes \
no false claim is good and informative. Hallucination: no.
5. Contents: man, bicycle, helmet. Question: what is the man doing? Human: riding a bicycle. LMM: the man is \
riding a motorbike and talking on his phone. Objects or actions that are not there are hallucinations. \
Hallucination: yes.

The human answer may leave things out. Be careful before calling a claim a hallucination, and give credit for \
sound analysis.

First explain your judgement in a few sentences. Then give one rating on the last line, written as \
"Rating: N", where N is:
6 - very informative with good analysis or reasoning, no hallucination
5 - very informative, no hallucination
4 - somewhat informative, no hallucination
3 - not informative, no hallucination
2 - very informative, with hallucination
1 - somewhat informative, with hallucination
0 - not informative, with hallucination

### Image Contents
{contents}

### Question
{question}

### Standard Human-Generated Answer
{gt_answer}

### LMM Response to Evaluate
{answer}
"""


def judge_prompt(record: dict) -> str:
    """The judge's input for one filled record (text only: the judge never sees the image)."""
    return RUBRIC.format(contents=", ".join(record["image_content"]), question=record["question"],
                         gt_answer=record["gt_answer"], answer=record["model_answer"])


def parse_rating(text: str) -> int | None:
    """The rating in a judge reply: the one score s in 0-6 for which ``rating: s`` occurs (case-insensitive;
    markdown emphasis such as ``**Rating**: 4`` or ``Rating: **4**`` is accepted). None when no score or
    several different scores occur; such replies score 0, as in the original evaluation."""
    plain = text.lower().replace("*", "")
    found = {int(s) for s in re.findall(r"rating\s*:\s*([0-6])(?!\d)", plain)}
    return found.pop() if len(found) == 1 else None


def metrics(records: Sequence[dict], ratings: Sequence[int | None]) -> dict:
    """``score`` (mean 0-6), ``hallucination_rate`` (fraction below 3), ``per_type`` means (types in MMHal order,
    then any others), ``parse_failures`` (replies without a rating, scored 0) and ``n``."""
    scores = [0 if r is None else r for r in ratings]
    if not scores or len(scores) != len(records):
        raise DataError(f"got {len(scores)} ratings for {len(records)} records")
    by_type: dict[str, list[int]] = {}
    for record, value in zip(records, scores):
        by_type.setdefault(record["question_type"], []).append(value)
    order = [t for t in TYPES if t in by_type] + sorted(t for t in by_type if t not in TYPES)
    return {
        "score": sum(scores) / len(scores),
        "hallucination_rate": sum(s < HALLUCINATION_BELOW for s in scores) / len(scores),
        "per_type": {t: sum(by_type[t]) / len(by_type[t]) for t in order},
        "parse_failures": sum(r is None for r in ratings),
        "n": len(scores),
    }


# ---- judge-free rule mode -------------------------------------------------------------------------------------

NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())} | {"no": 0, "none": 0, "a": 1, "an": 1, "single": 1}


def rule_rating(record: dict, pipeline=None) -> int:
    """Rate an answer against the record's structured answer ``facts`` without a judge: 6 when it agrees, 0 when
    it does not. For ``objects`` (a description): 0 if it mentions an object not in the list, 3 if it mentions
    none, else 6 (CHAIR words, through ``pipeline``; OPERA's synonyms, or the world's when ``facts`` holds
    ``"vocabulary": "world"``).

    ``facts`` keys: ``present`` (bool; yes/no read with the OPERA parser), ``count`` (int; first number in the
    answer, digits or words), ``larger`` with ``objects`` (which of the two is named first), ``color`` /
    ``region`` / ``scene`` (str or list of accepted phrases, whole-word match) or ``objects`` alone.
    """
    where = f"record {record.get('question', '')!r}"
    facts = checked(record, "facts", dict, where)
    answer = record["model_answer"].lower()
    if "present" in facts:
        from vlmkit.evals.pope import parser

        said, _ = parser("opera").parse(record["model_answer"], "yes")
        return 6 if (said == "yes") == bool(facts["present"]) else 0
    if "count" in facts:
        numbers = [int(t) if t.isdigit() else NUMBER_WORDS[t] for t in re.findall(r"[a-z]+|\d+", answer)
                   if t.isdigit() or t in NUMBER_WORDS]
        return 6 if numbers and numbers[0] == facts["count"] else 0
    if "larger" in facts:
        first = _first_mentioned(answer, [str(o) for o in checked(facts, "objects", list, where)])
        return 6 if first == facts["larger"] else 0
    for key in ("color", "region", "scene"):
        if key in facts:
            accepted = facts[key] if isinstance(facts[key], list) else [facts[key]]
            return 6 if any(_contains(answer, str(p).replace("_", " ")) for p in accepted) else 0
    if "objects" in facts:
        from vlmkit.evals import world
        from vlmkit.evals.chair import WordTables, mentions
        from vlmkit.evals.words import pipeline as make_pipeline

        tables = world.word_tables() if facts.get("vocabulary") == "world" else WordTables.from_synonyms()
        truth = {tables.synonyms.get(str(o), str(o)) for o in facts["objects"]}
        nodes = mentions(record["model_answer"], pipeline or make_pipeline(), tables).nodes
        return 3 if not nodes else 0 if set(nodes) - truth else 6
    raise DataError(f"{where}: 'facts' has none of present, count, larger, color, region, scene, objects")


def _contains(text: str, phrase: str) -> bool:
    return re.search(rf"\b{re.escape(phrase.lower())}\b", text) is not None


def _first_mentioned(text: str, names: list[str]) -> str | None:
    hits = [(m.start(), name) for name in names if (m := re.search(rf"\b{re.escape(name.lower())}", text))]
    return min(hits)[1] if hits else None
