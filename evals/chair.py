"""CHAIR (Rohrbach et al. 2018) as scored by OPERA / PAI / VISTA / lmms-eval (evals spec §1).

Ground truth is a set of COCO node words per image: the shipped COCO val2014 sets (built by the Maxlinn/OPERA
scorer; ``coco-val2014-wordnet`` for VISTA's variant), a precomputed ``{"image_id": [words]}`` JSON, a COCO
instances JSON, or a COCO annotations folder (instances plus the objects the human captions mention, parsed by the
same word pipeline; see :func:`load_ground_truth`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vlmkit.errors import DataError
from vlmkit.evals.files import checked, coco_index, data_file, read_json, read_records, read_text
from vlmkit.evals.words import WordPipeline

SYNONYMS_FILE = "chair/synonyms.txt"
IMAGE_IDS_FILE = "chair/opera_500_val2014_image_ids.txt"
#: names of the shipped ground-truth sets, usable wherever a ground-truth path is accepted
SHIPPED_GROUND_TRUTH = {
    "coco-val2014": "chair/coco_val2014_gt_objects.json.gz",
    "coco-val2014-wordnet": "chair/coco_val2014_gt_objects_wordnet.json.gz",
}
DOUBLE_WORDS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal", "stop light",
    "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat", "baseball glove",
    "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear", "hair drier",
    "potted plant", "bow tie", "laptop computer", "stove top oven", "home plate", "train track",
)
QUALIFIED_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal",
                     "cub")


@dataclass(frozen=True)
class WordTables:
    """``synonyms``: word -> node word; ``pairs``: two-word rule -> merged word; ``colours``: object words that are
    also colours, not counted where used as a colour (empty for OPERA's tables; the world's tables hold "orange")."""

    synonyms: dict[str, str]
    pairs: dict[str, str]
    colours: frozenset[str] = frozenset()

    @classmethod
    def from_synonyms(cls, path: str | Path | None = None) -> WordTables:
        """The tables of OPERA's scorer, built from a synonyms file (default: the original ``synonyms.txt``).
        Each line is ``node, synonym, ...`` split on ``", "`` exactly (so the file's quirks are kept)."""
        synonyms: dict[str, str] = {}
        for line in read_text(path or data_file(SYNONYMS_FILE)).splitlines():
            if line.strip():
                words = line.strip().split(", ")
                synonyms.update((word, words[0]) for word in words)
        pairs = {pair: pair for pair in DOUBLE_WORDS}
        for animal in QUALIFIED_ANIMALS:
            pairs[f"baby {animal}"] = pairs[f"adult {animal}"] = animal
        pairs.update({"passenger jet": "jet", "passenger train": "train", "bow tie": "tie", "toilet seat": "toilet",
                      "wine glas": "wine glass"})
        return cls(synonyms, pairs)


@dataclass
class GroundTruth:
    """Node words per image, where they came from, and image file names when the source lists them (COCO)."""

    objects: dict[int, set[str]]
    description: str
    file_names: dict[int, str] = field(default_factory=dict)
    shipped: bool = False


@dataclass
class Mentions:
    """The COCO objects a caption mentions: ``words`` as written (after lemmatising and pair merging), their
    ``nodes`` (node words, with repeats) and ``length`` (tokens after pair merging)."""

    words: list[str]
    nodes: list[str]
    length: int


def mentions(caption: str, pipeline: WordPipeline, tables: WordTables) -> Mentions:
    """Steps 3-5 of spec §1.4 on the pipeline's lemmas."""
    lemmas = pipeline.lemmas(caption)
    merged, i = [], 0
    while i < len(lemmas):
        pair = " ".join(lemmas[i:i + 2])
        if pair in tables.pairs:
            merged.append(tables.pairs[pair])
            i += 2
        else:
            merged.append(lemmas[i])
            i += 1
    words = merged
    if "toilet" in words and "seat" in words:
        words = [word for word in words if word != "seat"]
    if tables.colours:
        words = [word for k, word in enumerate(words)
                 if not (word in tables.colours and _colour_use(words[k + 1:k + 3], tables))]
    found = [word for word in words if word in tables.synonyms]
    return Mentions(found, [tables.synonyms[word] for word in found], len(merged))


def _colour_use(following: list[str], tables: WordTables) -> bool:
    """Whether a colour-or-object word is used as a colour, from the words after it: an object word ("orange
    cat"), "and" ("orange and red cats") or "in colour" follow a colour."""
    nxt = following[0] if following else ""
    return nxt in tables.synonyms or nxt == "and" or following[:2] in (["in", "colour"], ["in", "color"])


def score(
    captions: list[tuple[int, str]], ground_truth: GroundTruth, pipeline: WordPipeline,
    tables: WordTables | None = None,
) -> tuple[dict, list[dict]]:
    """CHAIR over ``(image_id, caption)`` pairs: ``(metrics, per_caption)``.

    metrics: ``chair_s``, ``chair_i``, ``recall``, ``precision``, ``f1`` (fractions), ``len`` (mean tokens / 100,
    as OPERA stores it), ``mean_tokens``, ``n``, ``pipeline``, ``pipeline_detail``. Empty denominators give 0.
    """
    tables = tables or WordTables.from_synonyms()
    hallucinated_captions = hallucinated_mentions = all_mentions = tokens = 0
    covered = gt_total = distinct = 0
    rows = []
    for image_id, caption in captions:
        if image_id not in ground_truth.objects:
            raise DataError(f"image {image_id} is not in the ground truth ({ground_truth.description}); pass the "
                            "annotations it comes from")
        gt = ground_truth.objects[image_id]
        found = mentions(caption, pipeline, tables)
        wrong = [(w, n) for w, n in zip(found.words, found.nodes) if n not in gt]
        hit = set(found.nodes) & gt
        hallucinated_captions += bool(wrong)
        hallucinated_mentions += len(wrong)
        all_mentions += len(found.nodes)
        tokens += found.length
        covered += len(hit)
        gt_total += len(gt)
        distinct += len(set(found.nodes))
        rows.append({"image_id": image_id, "mentioned": found.nodes, "hallucinated": [n for _, n in wrong],
                     "ground_truth": sorted(gt), "len": found.length})
    n = len(captions)
    recall, precision = _ratio(covered, gt_total), _ratio(covered, distinct)
    metrics = {
        "chair_s": _ratio(hallucinated_captions, n),
        "chair_i": _ratio(hallucinated_mentions, all_mentions),
        "recall": recall,
        "precision": precision,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "len": _ratio(0.01 * tokens, n),
        "mean_tokens": _ratio(tokens, n),
        "n": n,
        "pipeline": pipeline.name,
        "pipeline_detail": pipeline.detail,
        "ground_truth": ground_truth.description,
    }
    return metrics, rows


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def read_captions(path: str | Path) -> list[tuple[int, str]]:
    """``{"image_id": int, "caption": str}`` records (JSON lines or array); an image may appear once."""
    captions, seen = [], set()
    for line, record in read_records(path):
        where = f"{path}: line {line}"
        image_id = checked(record, "image_id", int, where)
        caption = checked(record, "caption", str, where)
        if image_id in seen:
            raise DataError(f"{where}: image {image_id} appears twice; keep one caption per image")
        seen.add(image_id)
        captions.append((image_id, caption))
    return captions


def read_image_ids(path: str | Path | None = None) -> list[int]:
    """One integer image id per line (default: the 500 val2014 ids of OPERA and VISTA)."""
    path = path or data_file(IMAGE_IDS_FILE)
    ids = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if line.strip():
            if not line.strip().isdigit():
                raise DataError(f"{path}: line {number}: expected an integer image id, got {line.strip()!r}")
            ids.append(int(line))
    return ids


def load_ground_truth(source: str | Path = "coco-val2014", pipeline: WordPipeline | None = None,
                      tables: WordTables | None = None) -> GroundTruth:
    """The ground truth from a shipped set name, an objects JSON, a COCO instances JSON
    (plus ``captions_X.json`` next to ``instances_X.json`` when present) or a folder of COCO annotation files
    (every ``instances_*.json`` with its captions file). Caption objects are parsed with ``pipeline``."""
    if str(source) in SHIPPED_GROUND_TRUTH:
        return GroundTruth(_objects_json(data_file(SHIPPED_GROUND_TRUTH[str(source)])), f"shipped {source}",
                           shipped=True)
    path = Path(source)
    if path.is_dir():
        instances = sorted(path.glob("instances_*.json"))
        if not instances:
            raise DataError(f"{path}: no instances_*.json in this folder; pass a COCO annotations folder")
        preloaded = {}
    elif path.is_file():
        data = read_json(path)
        if not (isinstance(data, dict) and "annotations" in data):
            return GroundTruth(_objects(data, path), f"objects file {path}")
        instances, preloaded = [path], {path: data}
    else:
        raise DataError(f"{path}: no such file or folder; pass COCO annotations or a ground-truth objects JSON")
    tables = tables or WordTables.from_synonyms()
    if pipeline is None:
        from vlmkit.evals.words import pipeline as make_pipeline
        pipeline = make_pipeline()
    truth: dict[int, set[str]] = {}
    file_names: dict[int, str] = {}
    for instances_file in instances:
        coco = coco_index(instances_file, preloaded.get(instances_file))
        for image_id, image in coco.imgs.items():
            truth.setdefault(image_id, set())
            if "file_name" in image:
                file_names[image_id] = image["file_name"]
        for annotation in coco.dataset.get("annotations", []):
            if annotation.get("category_id") not in coco.cats:
                raise DataError(f"{instances_file}: annotation {annotation.get('id')} has an unknown category_id")
            name = coco.cats[annotation["category_id"]]["name"]
            if name not in tables.synonyms:
                raise DataError(f"{instances_file}: category {name!r} is not a CHAIR word; use COCO category names")
            truth.setdefault(annotation["image_id"], set()).add(tables.synonyms[name])
        captions_file = instances_file.with_name(instances_file.name.replace("instances_", "captions_", 1))
        if captions_file.is_file():
            for annotation in coco_index(captions_file).dataset.get("annotations", []):
                nodes = mentions(annotation["caption"], pipeline, tables).nodes
                truth.setdefault(annotation["image_id"], set()).update(nodes)
    detail = "+".join(p.name for p in instances)
    return GroundTruth(truth, f"COCO annotations {detail} (caption objects by the {pipeline.name} pipeline)",
                       file_names)


def _objects_json(path: Path) -> dict[int, set[str]]:
    return _objects(read_json(path), path)


def _objects(data, path: Path) -> dict[int, set[str]]:
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected {{\"image_id\": [object, ...]}}")
    truth = {}
    for key, words in data.items():
        if not str(key).isdigit() or not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise DataError(f"{path}: entry {key!r}: expected an integer image id with a list of object words")
        truth[int(key)] = set(words)
    return truth
