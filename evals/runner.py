"""The resumable, shardable generation loop behind ``vlmkit eval ... --model``.

An output folder holds ``manifest.json`` (what was run), ``predictions.part<rank>.jsonl`` (appended, flushed
and fsynced per record while running) and, at the end, ``predictions.jsonl`` (all records in item order).
Re-running into the same folder skips every id already on disk, so a kill -9 at any point loses nothing and
duplicates nothing; only a torn last line (a write cut by the kill) is dropped and redone. A folder whose
manifest describes a different run is refused.

Data-parallel: under torchrun or accelerate (``WORLD_SIZE`` > 1), rank r generates items r, r+W, r+2W, ... into
its own part file; after a barrier rank 0 merges. The merged file equals a single-process run's.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from tqdm import tqdm

from vlmkit.errors import ConfigError, DataError
from vlmkit.evals.files import write_atomic
from vlmkit.images import load_image

MANIFEST = "manifest.json"
MERGED = "predictions.jsonl"
#: manifest sections that may change between runs into one folder (recorded, not compared)
UNCOMPARED = ("versions", "created", "run")
PACKAGES = ("vlmkit", "torch", "transformers", "tokenizers", "pillow", "nltk", "pycocotools")

#: ``(images, prompts)`` batches in, one list of ``Generation`` per batch out, in order
GenerateBatches = Callable[[Iterable[tuple[list, list[str]]]], Iterable[list]]


def recorded_stats(stats: dict) -> dict:
    """The per-row stats a prediction record keeps: token counts, FLOPs and the methods' own reports (``sgl_exit``,
    ``dyvte_exit_layer``, ...); not timings (``*_s``, they differ between runs) or the kept indices."""
    return {key: value for key, value in stats.items() if key != "kept_visual_indices" and not key.endswith("_s")}


@dataclass(frozen=True)
class Item:
    """One generation: a unique ``id``, an image path, a prompt, and ``meta`` fields copied to its record."""

    id: str
    image: str
    prompt: str
    meta: dict = field(default_factory=dict)


# ---- the on-disk store ----------------------------------------------------------------------------------------

class PredictionStore:
    """The JSONL records of one output folder (all ranks' part files)."""

    def __init__(self, out_dir: str | Path, rank: int = 0):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.part = self.dir / f"predictions.part{rank}.jsonl"

    def done(self) -> dict[str, dict]:
        """Every finished record by id (first occurrence wins)."""
        records: dict[str, dict] = {}
        for part in sorted(self.dir.glob("predictions.part*.jsonl")):
            for record in _read_part(part, repair=part == self.part):
                records.setdefault(record["id"], record)
        return records

    def append(self, records: Sequence[dict]) -> None:
        with open(self.part, "a", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def merge(self, ids: Sequence[str]) -> list[dict]:
        """Write ``predictions.jsonl`` with the records of ``ids`` in that order; returns them."""
        done = self.done()
        missing = [i for i in ids if i not in done]
        if missing:
            raise DataError(f"{self.dir}: {len(missing)} predictions are missing (first: {missing[0]}); re-run the "
                            "same command to finish them")
        records = [done[i] for i in ids]
        write_atomic(self.dir / MERGED, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        return records


def _read_part(path: Path, repair: bool) -> list[dict]:
    """The records of a part file. A last line without its newline is a write cut short by a crash: it is
    ignored (and cut off the file when ``repair``, before this rank appends again)."""
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]
    if repair and len(complete) < len(raw):
        with open(path, "r+b") as handle:
            handle.truncate(len(complete))
    records = []
    for number, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}: line {number} is not valid JSON; delete the line (it will be redone)") from None
        if not isinstance(record, dict) or "id" not in record:
            raise DataError(f"{path}: line {number} has no 'id'; delete the line (it will be redone)")
        records.append(record)
    return records


# ---- the manifest ---------------------------------------------------------------------------------------------

def versions() -> dict[str, str]:
    found = {}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def check_manifest(out_dir: str | Path, manifest: dict, *, write: bool) -> None:
    """Write ``manifest`` into a new folder, or check it against the one there (sections in UNCOMPARED aside)."""
    path = Path(out_dir) / MANIFEST
    if path.is_file():
        try:
            existing = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise DataError(f"{path} is not valid JSON; use a new --out folder") from None
        old = {k: v for k, v in existing.items() if k not in UNCOMPARED}
        new = json.loads(json.dumps({k: v for k, v in manifest.items() if k not in UNCOMPARED}))
        if old != new:
            keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ConfigError(f"{Path(out_dir)} holds a different run (differs in: {', '.join(keys)}); "
                              "use a new --out folder or repeat the original settings")
    elif write:
        write_atomic(path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


# ---- processes ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def shard_from_env() -> Shard:
    """The process's rank under torchrun / accelerate (a gloo group on CPU, nccl on GPU), or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Shard()
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Shard(dist.get_rank(), dist.get_world_size())


# ---- the loop -------------------------------------------------------------------------------------------------

def per_batch(generate: Callable[[list, list[str]], list]) -> GenerateBatches:
    """A ``generate_batches`` for :func:`run` from a function that answers one batch ``(images, prompts)``."""
    return lambda batches: (generate(images, prompts) for images, prompts in batches)


def run(
    generate_batches: GenerateBatches,
    items: Sequence[Item],
    out_dir: str | Path,
    manifest: dict,
    *,
    batch_size: int = 1,
    shard: Shard = Shard(),
    progress: bool = True,
    desc: str = "eval",
) -> list[dict] | None:
    """Generate what is not on disk yet, then (rank 0) merge and return all records in item order.

    ``generate_batches`` takes an iterable of ``(images, prompts)`` batches and yields one list of ``Generation`` per
    batch, in order: ``VLM.generate_batches``, which loads and processes the next batch while this one runs, or
    :func:`per_batch`. Items are batched in order, so questions about one image share a batch and the image is
    decoded once. Each batch's records are on disk before the next batch's are taken. Other ranks return None.
    """
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        raise DataError("two items share an id; ids must be unique within a run")
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    store = PredictionStore(out_dir, shard.rank)
    manifest = {**manifest, "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "run": {**manifest.get("run", {}), "batch_size": batch_size, "world_size": shard.world}}
    if shard.rank == 0:
        check_manifest(out_dir, manifest, write=True)
    shard.barrier()
    if shard.rank != 0:
        check_manifest(out_dir, manifest, write=False)
    done = store.done()
    todo = [item for index, item in enumerate(items) if index % shard.world == shard.rank and item.id not in done]
    chunks = [todo[start:start + batch_size] for start in range(0, len(todo), batch_size)]
    with tqdm(total=len(todo), desc=desc, unit="item", disable=not progress or shard.rank != 0) as bar:
        for chunk, outputs in zip(chunks, generate_batches(_loaded(chunks, keep=4 * batch_size))):
            store.append([
                {"id": item.id, **item.meta, "prompt": item.prompt, "text": out.text,
                 **recorded_stats(out.stats)}
                for item, out in zip(chunk, outputs)
            ])
            bar.update(len(chunk))
    shard.barrier()
    return store.merge(ids) if shard.rank == 0 else None


def _loaded(chunks: list[list[Item]], keep: int) -> Iterator[tuple[list, list[str]]]:
    """Each chunk's images (one object per path, decoded once while at most ``keep`` are held) and prompts."""
    images: dict[str, object] = {}
    for chunk in chunks:
        pil = []
        for item in chunk:
            if item.image not in images:
                if len(images) > keep:
                    images.clear()
                images[item.image] = load_image(item.image)
            pil.append(images[item.image])
        yield pil, [item.prompt for item in chunk]
