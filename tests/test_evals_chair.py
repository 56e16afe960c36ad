"""CHAIR: word tables, the offline word pipeline, metrics on hand-computed cases, ground truth, bad input."""

from __future__ import annotations

import importlib.util
import json

import pytest

from vlmkit.errors import ConfigError, DataError
from vlmkit.evals import chair, words
from vlmkit.evals.files import data_file


@pytest.fixture(scope="module")
def offline():
    return words.OfflinePipeline()


def truth(objects: dict[int, list[str]]) -> chair.GroundTruth:
    return chair.GroundTruth({k: set(v) for k, v in objects.items()}, "test")


def test_word_tables_equal_the_reference_scorer_tables():
    tables = chair.WordTables.from_synonyms()
    reference = json.loads(data_file("chair/chair_word_tables.json").read_text())
    assert tables.pairs == reference["double_word_dict"]
    assert tables.synonyms == {k: v for k, v in reference["inverse_synonym_dict"].items() if k}


def test_offline_tokenizer_and_tagger(offline):
    assert words.tokenize("a man's dog, isn't it?") == ["a", "man", "'s", "dog", ",", "is", "n't", "it", "?"]
    assert words.split_sentences("a dog. a cat! (a cow.) end") == ["a dog.", "a cat!", "(a cow.)", "end"]
    tokens = ["a", "man", "is", "skiing", "down", "the", "hill", "."]
    assert offline.tag(tokens) == ["DT", "NN", "VBZ", "VBG", "RP", "DT", "NN", "."]
    # NLTK's lemmatiser keeps the first of the shortest WordNet lemmas: "men" stays "men" (a quirk CHAIR inherits)
    assert offline.lemmas("Two men are skiing.") == ["two", "men", "are", "ski", "."]
    assert offline.lemmas("The dogs") == ["the", "dog"]


def test_mentions_pairs_qualifiers_and_toilet_seat(offline):
    tables = chair.WordTables.from_synonyms()
    found = chair.mentions("A baby elephant near a hot dog and a toilet seat. The seat is white.", offline, tables)
    assert found.nodes == ["elephant", "hot dog", "toilet"]  # "baby" is not a person, "seat" is not a chair here
    assert chair.mentions("A train track by the road.", offline, tables).nodes == []  # the pair hides "train"
    assert chair.mentions("Two dogs and people.", offline, tables).nodes == ["dog", "person"]


def test_metrics_on_hand_computed_captions(offline):
    gt = truth({1: ["dog", "person"], 2: ["cat"], 3: ["car", "bus", "truck"]})
    captions = [
        (1, "A man walks two dogs past a cat."),  # person, dog, cat(x): hallucinated
        (2, "A cat sleeps next to a cat."),  # cat, cat: fine
        (3, "A car."),  # car: fine
    ]
    metrics, rows = chair.score(captions, gt, offline)
    assert [r["hallucinated"] for r in rows] == [["cat"], [], []]
    assert metrics["chair_s"] == pytest.approx(1 / 3)
    assert metrics["chair_i"] == pytest.approx(1 / 6)  # 1 of 6 mentions (repeats count)
    assert metrics["recall"] == pytest.approx(4 / 6)  # {dog, person} + {cat} + {car} of 2 + 1 + 3
    assert metrics["precision"] == pytest.approx(4 / 5)  # distinct mentions per caption: 3 + 1 + 1
    assert metrics["f1"] == pytest.approx(2 * 0.8 * (2 / 3) / (0.8 + 2 / 3))
    assert metrics["mean_tokens"] == pytest.approx((9 + 8 + 3) / 3)
    assert metrics["len"] == pytest.approx(0.01 * (9 + 8 + 3) / 3)
    assert metrics["pipeline"] == "offline"


def test_reference_llava_captions_reproduce_opera_numbers(offline):
    captions = chair.read_captions(data_file("chair/opera_llava15_7b_greedy_captions.jsonl.gz"))
    assert [i for i, _ in captions] == chair.read_image_ids()
    metrics, _ = chair.score(captions, chair.load_ground_truth("coco-val2014"), offline)
    assert round(100 * metrics["chair_s"], 1) == 45.0
    assert round(100 * metrics["chair_i"], 1) == 12.7
    assert round(100 * metrics["recall"], 1) == 80.4


@pytest.mark.skipif(importlib.util.find_spec("nltk") is None, reason="nltk not installed")
def test_nltk_and_offline_pipelines_agree_on_chair_words(offline):
    try:
        reference = words.NltkPipeline()
    except ConfigError:
        pytest.skip("WordNet data not installed for nltk")
    tables = chair.WordTables.from_synonyms()
    captions = chair.read_captions(data_file("chair/opera_llava15_7b_greedy_captions.jsonl.gz"))[:30]
    for _, caption in captions:
        assert chair.mentions(caption, reference, tables) == chair.mentions(caption, offline, tables)


def test_ground_truth_from_coco_instances_and_captions(tmp_path, offline):
    instances = {
        "images": [{"id": 7, "file_name": "img7.jpg"}, {"id": 8, "file_name": "img8.jpg"}],
        "categories": [{"id": 1, "name": "dining table"}, {"id": 2, "name": "tv"}],
        "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0}],
    }
    captions = {"images": instances["images"], "annotations": [{"id": 1, "image_id": 8, "caption": "Kids and a tv."}]}
    (tmp_path / "instances_val.json").write_text(json.dumps(instances))
    (tmp_path / "captions_val.json").write_text(json.dumps(captions))
    gt = chair.load_ground_truth(tmp_path, offline)
    assert gt.objects == {7: {"dining table"}, 8: {"person", "tv"}}
    assert gt.file_names == {7: "img7.jpg", 8: "img8.jpg"}
    only_instances = chair.load_ground_truth(tmp_path / "instances_val.json", offline)
    assert only_instances.objects[7] == {"dining table"}


def test_bad_input_names_file_and_line(tmp_path, offline):
    bad = tmp_path / "caps.jsonl"
    bad.write_text('{"image_id": 1, "caption": "a dog"}\n{"image_id": 2, "caption": \n')
    with pytest.raises(DataError, match=r"caps.jsonl: line 2: not valid JSON"):
        chair.read_captions(bad)
    bad.write_text('{"image_id": "1", "caption": "a dog"}\n')
    with pytest.raises(DataError, match=r"line 1: 'image_id' must be a valid int"):
        chair.read_captions(bad)
    bad.write_text('{"image_id": 1}\n')
    with pytest.raises(DataError, match=r"line 1: missing key 'caption'"):
        chair.read_captions(bad)
    with pytest.raises(DataError, match="image 5 is not in the ground truth"):
        chair.score([(5, "a dog")], truth({1: ["dog"]}), offline)
    with pytest.raises(DataError, match="no such file"):
        chair.load_ground_truth(tmp_path / "missing.json")
