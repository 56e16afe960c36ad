"""``vlmkit eval chair|pope|mmhal``: score a predictions file, or run a model (resumable) and score it. Without
data arguments a run uses the built-in world set and, without ``--model``, the built-in world-tiny model."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from vlmkit.errors import ConfigError

TASKS = ("chair", "pope", "mmhal")
DEFAULT_MAX_NEW_TOKENS = {"chair": 512, "pope": 32, "mmhal": 512}
#: items a run on the built-in world set takes by default (POPE: per split); about 2 minutes on 2 CPU cores
WORLD_LIMITS = {"pope": 100, "chair": 60, "mmhal": 96}
WORLD_MODEL = "builtin:world-tiny"


def add_parser(subparsers) -> None:
    evaluate = subparsers.add_parser("eval", help="CHAIR, POPE and MMHal-Bench: score predictions or run a model")
    tasks = evaluate.add_subparsers(dest="task", required=True)

    chair = tasks.add_parser("chair", help="CHAIR object hallucination in captions")
    chair.add_argument("--predictions", help='JSON lines {"image_id": int, "caption": str} (score only)')
    chair.add_argument("--annotations",
                       help="COCO annotations folder, instances JSON, ground-truth objects JSON, or a named set: "
                            "coco-val2014 (default with --predictions or --images), coco-val2014-wordnet, world "
                            "(the built-in world; default otherwise)")
    chair.add_argument("--ids", "--data", dest="ids", help="image-id list, one per line (default: the 500 OPERA ids)")
    chair.add_argument("--pipeline", default="auto", choices=["auto", "nltk", "offline"],
                       help="word pipeline (auto: nltk when nltk and WordNet are installed)")
    chair.add_argument("--prompt", help='caption prompt (default "Please describe this image in detail."; on the '
                                        'world "Describe the image in detail.")')

    pope = tasks.add_parser("pope", help="POPE yes/no object probing")
    pope.add_argument("--predictions", nargs="+", help='JSON lines {"question_id": int, "text": str} (score only)')
    pope.add_argument("--questions", "--data", dest="questions", nargs="+",
                      help="POPE question files, one per split, or a named set: coco (default with --images), "
                           "coco-e3e3926, world (the built-in world; default otherwise)")
    pope.add_argument("--parser", default="official",
                      help="answer parser: official (P1, default), opera (P2), vcd (P3), lmms-eval (P4), "
                           "vlmevalkit (P5)")
    pope.add_argument("--prompt-suffix", help="appended to each question, e.g. ' Please answer yes or no.' (default: "
                                              "none; on the world the short-answer suffix world-tiny was trained on)")

    mmhal = tasks.add_parser("mmhal", help="MMHal-Bench, rated by an LLM judge or by rules")
    mmhal.add_argument("--predictions", help="a filled response template (JSON array with model_answer) "
                                             "(score only)")
    mmhal.add_argument("--data", dest="template",
                       help="response template (default with --images: the 96 MMHal-Bench records), or world (the "
                            "built-in world, rated by rules unless a judge is given; default otherwise)")
    mmhal.add_argument("--judge-url", help="OpenAI-compatible API base, e.g. http://localhost:8000/v1")
    mmhal.add_argument("--judge-model", help="judge model name")
    mmhal.add_argument("--judge-key-env", default="OPENAI_API_KEY",
                       help="environment variable holding the judge API key (default OPENAI_API_KEY)")
    mmhal.add_argument("--judge-cache", help="judge cache folder (default: OUT/judge_cache, or "
                                             "~/.cache/vlmkit/judge without --out)")
    mmhal.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per judge call")
    mmhal.add_argument("--judge-retries", type=int, default=4)
    mmhal.add_argument("--rules", action="store_true", help="rate with rules (records with structured 'facts')")

    for task, sub in (("chair", chair), ("pope", pope), ("mmhal", mmhal)):
        world_limits = WORLD_LIMITS[task]
        sub.add_argument("--out", help="output folder: metrics.json and, when running a model, the resumable "
                                        "predictions (default vlmkit-eval/TASK-MODEL[-METHODS])")
        model = sub.add_argument_group("running a model")
        model.add_argument("--model", help="hub id, local folder or builtin:NAME (default builtin:world-tiny)")
        model.add_argument("--images", help="folder with the benchmark images (not for the world set, which renders "
                                            "its own)")
        model.add_argument("--pruner", action="append", default=[],
                           help="pruner spec; repeat to sweep (one subfolder each, plus sweep.png)")
        model.add_argument("--decoder", action="append", default=[], help="decoder spec (repeatable)")
        model.add_argument("--batch-size", type=int, default=8)
        model.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS[task])
        model.add_argument("--limit", type=int,
                           help="evaluate only the first N items, per split for POPE (world set default: "
                                f"{world_limits})")
        model.add_argument("--device")
        model.add_argument("--compile", action="store_true",
                           help="torch.compile the layers of graphed and large prefills, the decode step and Qwen's ViT "
                                "(vlmkit.wrap(compile=True))")
        model.add_argument("--dtype")
        model.add_argument("--no-progress", action="store_true", help="no progress bar")
        sub.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from vlmkit.evals import report

    if args.predictions and args.model:
        raise ConfigError("pass either --predictions (score a file) or --model (run a model), not both")
    if not args.predictions:
        return _run_model(args)
    metrics = SCORERS[args.task](args)
    print(report.summary(args.task, metrics))
    if args.out:
        print(f"metrics written to {Path(args.out) / 'metrics.json'}")
    return 0


# ---- score only -----------------------------------------------------------------------------------------------

def _score_chair(args) -> dict:
    from vlmkit.evals import chair, tasks, words, world

    pipeline = words.pipeline(args.pipeline)
    captions = chair.read_captions(args.predictions)
    if args.annotations == "world":
        return tasks.score_chair(captions, world.ground_truth([i for i, _ in captions]), pipeline, args.out,
                                 world.word_tables())
    truth = chair.load_ground_truth(args.annotations or "coco-val2014", pipeline)
    return tasks.score_chair(captions, truth, pipeline, args.out)


def _score_pope(args) -> dict:
    from vlmkit.evals import pope, tasks

    questions = tasks.read_question_sets(tasks.question_files(args.questions))
    answers = tasks.read_answers(args.predictions, questions)
    return tasks.score_pope(questions, answers, pope.parser(args.parser), args.out)


def _judge(args, out: str | None, running: bool = False):
    """The judge the arguments ask for; None for rules, or (``running`` a model) for no rating at all."""
    from vlmkit.evals.judge import Judge

    if args.rules and (args.judge_url or args.judge_model):
        raise ConfigError("pass --rules or a judge (--judge-url, --judge-model), not both")
    if args.rules:
        return None
    if not (args.judge_url and args.judge_model):
        if running:
            return None
        raise ConfigError("MMHal-Bench needs a judge: pass --judge-url URL --judge-model NAME (key in "
                          f"${args.judge_key_env}), or --rules for records with structured facts")
    cache = args.judge_cache or (Path(out) / "judge_cache" if out else
                                 Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vlmkit" / "judge")
    return Judge(args.judge_url, args.judge_model, api_key_env=args.judge_key_env, cache_dir=cache,
                 timeout=args.judge_timeout, retries=args.judge_retries)


def _score_mmhal(args) -> dict:
    from vlmkit.evals import mmhal, tasks

    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    return tasks.score_mmhal(mmhal.read_template(args.predictions), args.out, judge=_judge(args, args.out),
                             progress=not args.no_progress)


SCORERS = {"chair": _score_chair, "pope": _score_pope, "mmhal": _score_mmhal}


# ---- running a model ------------------------------------------------------------------------------------------

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_") or "run"


def _on_world(args) -> bool:
    """Whether a model run uses the built-in world set: named ``world``, or no data and no --images given."""
    data = getattr(args, {"chair": "annotations", "pope": "questions", "mmhal": "template"}[args.task])
    named = data in ("world", ["world"])
    if named and args.images:
        raise ConfigError("the world set renders its own images; leave out --images")
    return named or (data is None and not args.images)


def _run_model(args) -> int:
    import vlmkit
    from vlmkit.evals import report, runner, tasks

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {args.limit}")
    on_world = _on_world(args)
    if not on_world and not args.images:
        raise ConfigError("benchmark files need --images, the folder with the benchmark images (leave out the data "
                          "arguments to run the built-in world set)")
    name = args.model or WORLD_MODEL
    pruners = args.pruner or [None]
    for spec in filter(None, pruners):
        vlmkit.pruners.create_from_spec(spec)  # every spec of a sweep fails before any run, not after the others
    methods = (pruners if len(pruners) == 1 and pruners[0] else []) + args.decoder
    out = Path(args.out or Path("vlmkit-eval") / "-".join([args.task, _slug(name), *map(_slug, methods)]))
    shard = runner.shard_from_env()
    limit = WORLD_LIMITS[args.task] if on_world and args.limit is None else args.limit
    prepare = (WORLD_SETUP if on_world else TASK_SETUP)[args.task](args, out, limit)
    device = args.device
    if shard.world > 1 and device is None:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{os.environ.get('LOCAL_RANK', shard.rank)}"
    base = vlmkit.load(name, decoders=args.decoder, device=device, dtype=args.dtype)
    results = []
    for spec in pruners:
        vlm = vlmkit.wrap(base.model, base.processor, pruner=spec, decoders=args.decoder, compile=args.compile)
        run_dir = out / _slug(spec) if len(pruners) > 1 else out
        model = tasks.ModelRun(vlm, name, spec, args.decoder, args.max_new_tokens, args.batch_size, shard,
                               not args.no_progress)
        metrics = prepare(model, run_dir)
        if metrics is not None:
            kept = _mean_kept(run_dir)
            results.append((spec or "no pruner", kept, metrics))
            print(f"\n{spec or 'no pruner'}  ({run_dir})")
            print(report.summary(args.task, metrics))
            for key, (exits, total) in _early_exits(run_dir).items():
                print(f"early exits ({key}): {exits} of {total} ({100 * exits / total:.1f}%)")
    if shard.rank == 0 and not results and args.task == "mmhal":
        print(f"answers written to {out / 'filled_template.json'}; rate them with --judge-url/--judge-model or "
              "--rules")
    if len(results) > 1:
        headline = report.HEADLINE[args.task]
        print("\nsweep")
        print(report.table([(f"{s} ({k:.0f} kept)", m) for s, k, m in results], report.TABLE_KEYS[args.task]))
        path = report.sweep_plot([(s, k, m[headline]) for s, k, m in results], args.task, out / "sweep.png")
        print(f"plot: {path}")
    return 0


def _mean_kept(run_dir: Path) -> float:
    """Visual tokens kept, averaged over the LLM layers (in-LLM pruners such as FastV prune after layer K) and
    the predictions."""
    import json

    kept = []
    for line in (run_dir / "predictions.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_layer = record.get("visual_tokens_by_layer") or [record.get("visual_tokens_kept", 0)]
        kept.append(sum(by_layer) / len(by_layer))
    return sum(kept) / len(kept) if kept else 0.0


def _early_exits(run_dir: Path) -> dict[str, tuple[int, int]]:
    """For each boolean per-row ``*_exit`` stat a method reported (sgl's early exit): rows that exited, rows."""
    import json

    counts: dict[str, list[int]] = {}
    for line in (run_dir / "predictions.jsonl").read_text().splitlines():
        for key, value in json.loads(line).items():
            if key.endswith("_exit") and isinstance(value, bool):
                counts.setdefault(key, [0, 0])
                counts[key][0] += value
                counts[key][1] += 1
    return {key: (exits, total) for key, (exits, total) in counts.items()}


def _setup_chair(args, out: Path, limit: int | None):
    from vlmkit.evals import chair, tasks, words

    pipeline = words.pipeline(args.pipeline)
    truth = chair.load_ground_truth(args.annotations or "coco-val2014", pipeline)
    return lambda model, run_dir: tasks.run_chair(model, args.images, run_dir, truth, pipeline, ids_file=args.ids,
                                                  prompt=args.prompt or tasks.CHAIR_PROMPT, limit=limit)


def _setup_pope(args, out: Path, limit: int | None):
    from vlmkit.evals import pope, tasks

    files, parser = tasks.question_files(args.questions), pope.parser(args.parser)
    return lambda model, run_dir: tasks.run_pope(model, files, args.images, run_dir, parser,
                                                 suffix=args.prompt_suffix or "", limit=limit)


def _setup_mmhal(args, out: Path, limit: int | None):
    from vlmkit.evals import tasks

    judge = _judge(args, str(out), running=True)
    return lambda model, run_dir: tasks.run_mmhal(model, args.template, args.images, run_dir, judge=judge,
                                                  rules=args.rules, limit=limit)


TASK_SETUP = {"chair": _setup_chair, "pope": _setup_pope, "mmhal": _setup_mmhal}


# ---- the built-in world set (written into OUT/world; see vlmkit.evals.world) ----------------------------------

def _world_chair(args, out: Path, limit: int | None):
    from vlmkit.evals import tasks, words, world

    if args.ids:
        raise ConfigError("--ids selects COCO images; on the world set, choose how many images with --limit")
    pipeline = words.pipeline(args.pipeline)
    ids, truth, images = world.chair_set(out / "world", limit)
    return lambda model, run_dir: tasks.run_chair(model, images, run_dir, truth, pipeline, ids=ids,
                                                  prompt=args.prompt or world.CAPTION_PROMPT,
                                                  tables=world.word_tables())


def _world_pope(args, out: Path, limit: int | None):
    from vlmkit.evals import pope, tasks, world

    parser = pope.parser(args.parser)
    files, images = world.pope_set(out / "world", limit)
    suffix = world.POPE_SUFFIX if args.prompt_suffix is None else args.prompt_suffix
    return lambda model, run_dir: tasks.run_pope(model, files, images, run_dir, parser, suffix=suffix, limit=limit)


def _world_mmhal(args, out: Path, limit: int | None):
    from vlmkit.evals import tasks, world

    judge = _judge(args, str(out), running=True)
    template, images = world.mmhal_set(out / "world", limit)
    return lambda model, run_dir: tasks.run_mmhal(model, template, images, run_dir, judge=judge,
                                                  rules=judge is None, limit=limit)


WORLD_SETUP = {"chair": _world_chair, "pope": _world_pope, "mmhal": _world_mmhal}
