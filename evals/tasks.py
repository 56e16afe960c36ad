"""The three benchmarks end to end: building the generation items, running a model through the resumable runner,
and scoring (also for predictions made elsewhere)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vlmkit.errors import ConfigError, DataError
from vlmkit.evals import chair, mmhal, pope, report, runner
from vlmkit.evals.files import checked, data_file, md5, read_records
from vlmkit.evals.judge import Judge
from vlmkit.evals.words import WordPipeline
from vlmkit.evals.words import pipeline as word_pipeline

CHAIR_PROMPT = "Please describe this image in detail."
SHIPPED_POPE = {
    "coco": [f"pope/coco/coco_pope_{s}.json.gz" for s in pope.SPLITS],
    "coco-e3e3926": [f"pope/coco_e3e3926/coco_pope_{s}.json.gz" for s in pope.SPLITS],
}


@dataclass
class ModelRun:
    """A model to evaluate and what identifies it in the manifest."""

    vlm: object  # vlmkit.VLM
    model: str
    pruner: str | None = None
    decoders: Sequence[str] = ()
    max_new_tokens: int = 128
    batch_size: int = 1
    shard: runner.Shard = field(default_factory=runner.Shard)
    progress: bool = True

    def generate_batches(self, batches: Iterable[tuple[list, list[str]]]) -> Iterator[list]:
        return self.vlm.generate_batches(batches, max_new_tokens=self.max_new_tokens)

    def effective_batch_size(self) -> int:
        """1 when an attached method runs one sample at a time."""
        batchable = all(m.supports_batch for m in self.vlm.interventions)
        return self.batch_size if batchable else 1

    def manifest(self, task: str, data: dict[str, str], scoring: dict, prompt: str) -> dict:
        return {"task": task, "model": self.model, "pruner": self.pruner, "decoders": list(self.decoders),
                "prompt": prompt, "decoding": {"greedy": True, "max_new_tokens": self.max_new_tokens},
                "data": data, "scoring": scoring}

    def run(self, items: list[runner.Item], out: str | Path, manifest: dict, task: str) -> list[dict] | None:
        return runner.run(self.generate_batches, items, out, manifest, batch_size=self.effective_batch_size(),
                          shard=self.shard, progress=self.progress, desc=task)


def _image(folder: str | Path, names: Sequence[str], what: str) -> str:
    for name in names:
        if name and (Path(folder) / name).is_file():
            return str(Path(folder) / name)
    raise DataError(f"{folder}: no image for {what} (looked for {', '.join(n for n in names if n)}); pass the "
                    "folder that holds the benchmark images with --images")


def _data_md5s(paths: Sequence[str | Path]) -> dict[str, str]:
    return {Path(p).name: md5(p) for p in paths if Path(p).is_file()}


# ---- CHAIR ----------------------------------------------------------------------------------------------------

def score_chair(captions: list[tuple[int, str]], truth: chair.GroundTruth, pipeline: WordPipeline,
                out: str | Path | None = None, tables: chair.WordTables | None = None) -> dict:
    metrics, rows = chair.score(captions, truth, pipeline, tables)
    if out is not None:
        report.write_metrics(out, metrics)
        (Path(out) / "chair_details.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return metrics


def run_chair(model: ModelRun, images: str | Path, out: str | Path, truth: chair.GroundTruth,
              pipeline: WordPipeline, *, ids: Sequence[int] | None = None, ids_file: str | Path | None = None,
              prompt: str = CHAIR_PROMPT, limit: int | None = None,
              tables: chair.WordTables | None = None) -> dict | None:
    """Caption each image, then score (``tables``: default OPERA's). ``ids`` default: the shipped 500 OPERA ids
    for the shipped ground truth, else every image of the ground truth."""
    if ids is None:
        ids = chair.read_image_ids(ids_file) if ids_file or truth.shipped else sorted(truth.objects)
    ids = list(ids)[:limit]
    items = [runner.Item(str(i), _image(images, [truth.file_names.get(i, ""), f"COCO_val2014_{i:012d}.jpg",
                                                 f"{i:012d}.jpg", f"{i}.jpg", f"{i}.png"], f"image id {i}"),
                         prompt, {"image_id": i}) for i in ids]
    data = _data_md5s([ids_file] if ids_file else [])
    manifest = model.manifest("chair", data, {"pipeline": pipeline.detail, "ground_truth": truth.description,
                                              "ids": ids_file and str(ids_file)}, prompt)
    records = model.run(items, out, manifest, "chair")
    if records is None:
        return None
    return score_chair([(r["image_id"], r["text"]) for r in records], truth, pipeline, out, tables)


# ---- POPE -----------------------------------------------------------------------------------------------------

def question_files(names: Sequence[str] | None) -> list[Path]:
    """Question file paths; ``coco`` and ``coco-e3e3926`` name the shipped official sets (3 splits each)."""
    paths: list[Path] = []
    for name in names or ["coco"]:
        paths += [data_file(p) for p in SHIPPED_POPE[name]] if name in SHIPPED_POPE else [Path(name)]
    return paths


def read_question_sets(paths: Sequence[str | Path]) -> list[pope.Question]:
    questions: list[pope.Question] = []
    seen: set[str] = set()
    for path in paths:
        split_questions = pope.read_questions(path)
        if split_questions[0].split in seen:
            raise ConfigError(f"two question files hold split {split_questions[0].split!r}; pass one file per split")
        seen.add(split_questions[0].split)
        questions += split_questions
    return questions


def read_answers(prediction_files: Sequence[str | Path], questions: Sequence[pope.Question]) -> dict:
    """``(split, question_id) -> text``. Lines are ``{"question_id": int, "text": str}``, with a ``split`` key
    when one file answers several splits; without it, files pair with the splits in order."""
    splits = list(dict.fromkeys(q.split for q in questions))
    answers: dict[tuple[str, int], str] = {}
    if len(prediction_files) not in (1, len(splits)):
        raise ConfigError(f"got {len(prediction_files)} predictions files for {len(splits)} question files; pass "
                          "one per questions file, or one whose lines carry 'split'")
    for index, path in enumerate(prediction_files):
        for line, record in read_records(path):
            where = f"{path}: line {line}"
            qid = checked(record, "question_id", int, where)
            text = checked(record, "text", str, where)
            if "split" in record:
                split = checked(record, "split", str, where)
            elif len(prediction_files) == 1 and len(splits) > 1:
                raise DataError(f"{where}: no 'split' key, but {len(splits)} question files were given")
            else:
                split = splits[index]
            if (split, qid) in answers:
                raise DataError(f"{where}: a second answer to question {qid} ({split})")
            answers[split, qid] = text
    return answers


def score_pope(questions: Sequence[pope.Question], answers: dict, parser: pope.Parser,
               out: str | Path | None = None) -> dict:
    metrics = pope.score(questions, answers, parser)
    if out is not None:
        report.write_metrics(out, metrics)
    return metrics


def run_pope(model: ModelRun, files: Sequence[str | Path], images: str | Path, out: str | Path,
             parser: pope.Parser, *, suffix: str = "", limit: int | None = None) -> dict | None:
    """Answer every question (``limit``: the first N of each split), then score."""
    questions = read_question_sets(files)
    if limit is not None:
        counts: dict[str, int] = {}
        kept = []
        for q in questions:
            counts[q.split] = counts.get(q.split, 0) + 1
            if counts[q.split] <= limit:
                kept.append(q)
        questions = kept
    items = [runner.Item(f"{q.split}/{q.question_id}", _image(images, [q.image], f"question {q.question_id}"),
                         q.text + suffix, {"split": q.split, "question_id": q.question_id}) for q in questions]
    manifest = model.manifest("pope", _data_md5s(files), {"parser": parser.name}, "{question}" + suffix)
    records = model.run(items, out, manifest, "pope")
    if records is None:
        return None
    answers = {(r["split"], r["question_id"]): r["text"] for r in records}
    return score_pope(questions, answers, parser, out)


# ---- MMHal-Bench ----------------------------------------------------------------------------------------------

def score_mmhal(records: list[dict], out: str | Path | None, *, judge: Judge | None = None,
                pipeline: WordPipeline | None = None, progress: bool = True) -> dict:
    """Rate every record with ``judge``, or with the rules (CHAIR words by ``pipeline``) when ``judge`` is None;
    judgements go to
    ``out/judgements.jsonl`` and metrics to ``out/metrics.json``. A :class:`JudgeError` leaves every finished
    judgement in the judge's cache."""
    from tqdm import tqdm

    if judge is None:
        pipeline = pipeline or word_pipeline()
    ratings, judgements = [], []
    for index, record in enumerate(tqdm(records, desc="mmhal judge", disable=not progress)):
        if judge is None:
            rating, reply = mmhal.rule_rating(record, pipeline), None
        else:
            reply = judge.complete(mmhal.judge_prompt(record))
            rating = mmhal.parse_rating(reply)
        ratings.append(rating)
        judgements.append({"index": index, "question_type": record["question_type"], "rating": rating,
                           "reply": reply})
    metrics = {**mmhal.metrics(records, ratings), "judge": judge.id if judge else "rules"}
    if out is not None:
        (Path(out) / "judgements.jsonl").write_text("".join(json.dumps(j) + "\n" for j in judgements))
        report.write_metrics(out, metrics)
    return metrics


def run_mmhal(model: ModelRun, template: str | Path | None, images: str | Path, out: str | Path, *,
              judge: Judge | None, rules: bool, pipeline: WordPipeline | None = None,
              limit: int | None = None) -> dict | None:
    """Answer each record's question, write ``out/filled_template.json``, then rate (judge or rules; neither:
    only the filled template)."""
    records = mmhal.read_template(template)[:limit]
    items = []
    for index, record in enumerate(records):
        names = [record.get("image", ""), Path(record.get("image_src", "")).name,
                 f"{record.get('image_id', '')}.jpg", f"{record.get('image_id', '')}.png"]
        items.append(runner.Item(str(index), _image(images, names, f"record {index + 1}"), record["question"],
                                 {"index": index}))
    scoring = {"judge": judge.id if judge else "rules" if rules else None}
    manifest = model.manifest("mmhal", _data_md5s([template or data_file(mmhal.TEMPLATE_FILE)]), scoring,
                              "{question}")
    done = model.run(items, out, manifest, "mmhal")
    if done is None:
        return None
    filled = [{**record, "model_answer": r["text"]} for record, r in zip(records, done)]
    (Path(out) / "filled_template.json").write_text(json.dumps(filled, indent=2, ensure_ascii=False) + "\n")
    if judge is None and not rules:
        return None
    return score_mmhal(filled, out, judge=judge, pipeline=pipeline, progress=model.progress)
