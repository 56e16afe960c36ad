"""POPE: question files (both variants), parsers P1-P5 on tricky answers, metrics, building question sets."""

from __future__ import annotations

import json

import pytest

from vlmkit.errors import ConfigError, DataError
from vlmkit.evals import pope, tasks
from vlmkit.evals.files import data_file

TRICKY = ["Yes, there is a dog.", "No, there is not.", "There isn't a dog.", "", "snowboard", "Yes.", "NO",
          "Yes, it is not clear.", "I don't know. Maybe no leash."]


@pytest.mark.parametrize("name, label, expected", [
    # P1 official: first sentence, words No/not/no -> no, anything else -> yes
    ("official", "no", ["yes", "no", "yes", "yes", "yes", "yes", "yes", "no", "yes"]),
    # P2 OPERA: whole answer, also NO and n't
    ("opera", "no", ["yes", "no", "no", "yes", "yes", "yes", "no", "no", "no"]),
    # P3 VCD: label-conditional substring; with label "no" the answer is right iff it contains "no"
    ("vcd", "no", ["yes", "no", "yes", "yes", "no", "yes", "no", "no", "no"]),
    ("vcd", "yes", ["yes", "no", "no", "no", "no", "yes", "no", "yes", "no"]),
    # P4 lmms-eval: exact match only
    ("lmms-eval", "no", [None, None, None, None, None, None, "no", None, None]),
    # P5 VLMEvalKit: yes without no / no without yes
    ("vlmevalkit", "no", ["yes", "no", None, None, None, "yes", "no", "yes", "no"]),  # "not" is no "no"
])
def test_parsers_on_tricky_answers(name, label, expected):
    parser = pope.parser(name)
    assert [parser.parse(answer, label)[0] for answer in TRICKY] == expected


def test_parser_names_and_unparseable_flags():
    assert pope.parser("P2") is pope.parser("opera")
    with pytest.raises(ConfigError, match="unknown POPE parser"):
        pope.parser("p9")
    official = pope.parser("official")
    assert [official.parse(a, "yes")[1] for a in ["Yes.", "", "snowboard", "No."]] == [True, False, False, True]


def test_metrics_on_a_confusion_matrix():
    # 4 TP, 1 FN, 2 FP, 3 TN
    labels = ["yes"] * 5 + ["no"] * 5
    answers = ["Yes"] * 4 + ["No"] + ["Yes"] * 2 + ["No"] * 3
    m = pope.split_metrics(labels, answers, pope.parser("official"))
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (4, 1, 2, 3)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["precision"] == pytest.approx(4 / 6)
    assert m["recall"] == pytest.approx(0.8)
    assert m["f1"] == pytest.approx(2 * (4 / 6) * 0.8 / (4 / 6 + 0.8))
    assert m["yes_ratio"] == pytest.approx(0.6)
    assert m["unparseable"] == 0


def test_unknown_answers_lmms_eval_excludes_vlmevalkit_counts_as_no():
    labels, answers = ["yes", "yes", "no"], ["yes", "Yes.", "maybe"]
    p4 = pope.split_metrics(labels, answers, pope.parser("lmms-eval"))
    assert (p4["tp"], p4["fn"], p4["fp"], p4["tn"], p4["accuracy"]) == (1, 0, 0, 0, pytest.approx(1 / 3))
    assert p4["unparseable"] == pytest.approx(2 / 3)
    p5 = pope.split_metrics(labels, answers, pope.parser("vlmevalkit"))
    assert (p5["tp"], p5["fn"], p5["fp"], p5["tn"], p5["accuracy"]) == (2, 0, 0, 1, pytest.approx(2 / 3))


def test_score_per_split_and_mean():
    questions = [pope.Question(1, "a.jpg", "q", "yes", "random"), pope.Question(2, "a.jpg", "q", "no", "random"),
                 pope.Question(1, "a.jpg", "q", "yes", "popular"), pope.Question(2, "a.jpg", "q", "no", "popular")]
    answers = {("random", 1): "Yes", ("random", 2): "No", ("popular", 1): "Yes", ("popular", 2): "Yes"}
    result = pope.score(questions, answers, pope.parser())
    assert result["splits"]["random"]["accuracy"] == 1.0 and result["splits"]["popular"]["accuracy"] == 0.5
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["f1"] == pytest.approx((1.0 + 2 / 3) / 2)
    with pytest.raises(DataError, match="no answer for 1 questions"):
        pope.score(questions, {k: v for k, v in answers.items() if k != ("random", 2)}, pope.parser())


def test_shipped_official_files_both_versions():
    head = tasks.read_question_sets(tasks.question_files(["coco"]))
    assert len(head) == 9000 and sum(q.label == "yes" for q in head) == 4500
    old = pope.read_questions(data_file("pope/coco_e3e3926/coco_pope_random.json.gz"))
    assert len(old) == 2910 and old[0].split == "random"


def test_json_array_variant_and_bad_files(tmp_path):
    records = [{"question_id": 1, "image": "x.jpg", "text": "Is there a cat in the image?", "label": "no"},
               {"question_id": 2, "image": "x.jpg", "text": "Is there a dog in the image?", "label": "yes"}]
    array = tmp_path / "gqa_pope_seem_adversarial.json"
    array.write_text(json.dumps(records, indent=4))
    lines = tmp_path / "coco_pope_adversarial.json"
    lines.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert pope.read_questions(array) == pope.read_questions(lines)
    assert pope.read_questions(array)[0].split == "adversarial"
    lines.write_text(json.dumps(records[0]) + "\nnot json\n")
    with pytest.raises(DataError, match=r"coco_pope_adversarial.json: line 2: not valid JSON"):
        pope.read_questions(lines)
    lines.write_text(json.dumps({**records[0], "label": "maybe"}) + "\n")
    with pytest.raises(DataError, match=r"line 1: 'label'"):
        pope.read_questions(lines)
    lines.write_text(json.dumps({**records[0], "question_id": True}) + "\n")
    with pytest.raises(DataError, match=r"line 1: 'question_id' must be a valid int"):
        pope.read_questions(lines)


def synthetic_objects() -> dict[str, list[str]]:
    names = ["person", "car", "chair", "cup", "dog", "cat", "bus", "fork", "knife", "apple"]
    return {f"{i}.jpg": [names[(i * k + i) % len(names)] for k in range(1, 6)] for i in range(40)}


@pytest.mark.parametrize("split", pope.SPLITS)
def test_build_questions_is_seeded_balanced_and_valid(split):
    objects = synthetic_objects()
    first = pope.build_questions(objects, split, seed=3, images=10)
    assert first == pope.build_questions(objects, split, seed=3, images=10)
    assert first != pope.build_questions(objects, split, seed=4, images=10)
    assert len(first) == 60 and [r["label"] for r in first[:2]] == ["yes", "no"]
    assert [r["question_id"] for r in first] == list(range(1, 61))
    for index in range(0, 60, 6):
        image = first[index]["image"]
        present = set(objects[image])
        distinct = list(dict.fromkeys(objects[image]))
        asked = [r["text"] for r in first[index:index + 6]]
        assert asked[0::2] == [pope.question_text(o) for o in distinct[:3]]
        negatives = [t.removeprefix("Is there a ").removeprefix("n ").removesuffix(" in the image?")
                     for t in asked[1::2]]
        assert not present & set(negatives) and len(set(negatives)) == 3


def test_build_popular_and_adversarial_choices():
    objects = {"1.jpg": ["dog", "cat", "cow"], "2.jpg": ["dog", "car", "bus"], "3.jpg": ["car", "bus", "person"],
               "4.jpg": ["car", "person", "cup"]}
    popular = pope.build_questions(objects, "popular", seed=0, images=4)
    negatives = [r["text"] for r in popular if r["image"] == "1.jpg" and r["label"] == "no"]
    # absent from 1.jpg, by frequency: car 3, then bus and person 2 (ties by name)
    assert negatives == [pope.question_text(o) for o in ("car", "bus", "person")]
    adversarial = pope.build_questions(objects, "adversarial", seed=0, images=4)
    first = next(i for i, r in enumerate(adversarial) if r["image"] == "1.jpg")
    # positive "dog" co-occurs with car and bus (once each, in 2.jpg): ties break by name
    assert adversarial[first + 1]["text"] == "Is there a bus in the image?"
    assert pope.question_text("apple") == "Is there an apple in the image?"
    with pytest.raises(DataError, match="only 4 images"):
        pope.build_questions(objects, "random", images=5)
