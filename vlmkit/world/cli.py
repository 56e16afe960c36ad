"""``vlmkit world build --out DIR --n N --seed S``, ``vlmkit world train --model world-tiny --out DIR``,
``vlmkit world train-clip --out DIR``, ``vlmkit world eval-clip --model builtin:world-clip`` and
``vlmkit world train-dyvte-gates --out FILE``."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    world = subparsers.add_parser("world", help="the built-in synthetic world")
    commands = world.add_subparsers(dest="world_command", required=True)
    build = commands.add_parser("build", help="render a world dataset (images, COCO instances and captions)")
    build.add_argument("--out", required=True, help="output folder")
    build.add_argument("--n", type=int, default=500, help="number of images")
    build.add_argument("--seed", type=int, default=0, help="world seed")
    build.add_argument("--split", choices=["train", "val", "test"], default="val")
    build.set_defaults(func=run_build)

    train = commands.add_parser("train", help="train a built-in world model (GPU)")
    train.add_argument("--model", default="world-tiny", help="size: world-tiny, world-small")
    _add_schedule_arguments(train, steps=6000, batch_size=64, lr=1e-3)
    train.add_argument("--init", help="start from this checkpoint (folder or builtin:NAME) instead of random weights")
    train.add_argument("--init-vision", help="copy the vision tower of this checkpoint (same vision config)")
    train.add_argument("--concentric", action="store_true",
                       help="train with CCA's concentric positions and mask (a world-*-cca twin; run it with --decoder cca)")
    train.set_defaults(func=run_train)

    clip = commands.add_parser("train-clip", help="train the world CLIP presence checker (GPU)")
    _add_schedule_arguments(clip, steps=100_000, batch_size=128, lr=2e-3)
    clip.set_defaults(func=run_train_clip)

    eval_clip = commands.add_parser("eval-clip", help="precision / recall / F1 of a world CLIP presence check")
    eval_clip.add_argument("--model", default="builtin:world-clip", help="builtin:world-clip or a train-clip folder")
    eval_clip.add_argument("--n", type=int, default=500, help="number of val-split images")
    eval_clip.add_argument("--seed", type=int, default=0, help="world seed")
    eval_clip.add_argument("--batch-size", type=int, default=50)
    eval_clip.add_argument("--device")
    eval_clip.set_defaults(func=run_eval_clip)

    from vlmkit.pruners import dyvte_train

    gates = commands.add_parser("train-dyvte-gates", help="train DyVTE exit gates for a world model (CPU, minutes)")
    dyvte_train.add_arguments(gates)
    gates.set_defaults(func=dyvte_train.run)


def _add_schedule_arguments(parser: argparse.ArgumentParser, *, steps: int, batch_size: int, lr: float) -> None:
    """The options of a world trainer (``vlmkit.world.train.Schedule``), its output folder and device."""
    parser.add_argument("--out", required=True, help="output folder for the checkpoint")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, help="stop after this long (the lr schedule follows time)")
    parser.add_argument("--device")


def _schedule(args: argparse.Namespace) -> dict:
    """The ``Schedule`` fields given on the command line."""
    return {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "workers": args.workers,
            "seed": args.seed, "max_seconds": args.max_minutes * 60 if args.max_minutes else None}


def run_build(args: argparse.Namespace) -> int:
    from vlmkit.errors import ConfigError
    from vlmkit.world.dataset import build

    if args.n < 1:
        raise ConfigError(f"--n must be at least 1, got {args.n}")
    out = build(args.out, args.n, seed=args.seed, split=args.split)
    print(f"wrote {args.n} {args.split} images with COCO instances and captions to {out}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from vlmkit.errors import ConfigError
    from vlmkit.world.model import SIZES
    from vlmkit.world.train import TrainConfig, train

    if args.model not in SIZES:
        raise ConfigError(f"unknown world model size {args.model!r}; choose one of {', '.join(SIZES)}")
    config = TrainConfig(model=args.model, init=args.init, init_vision=args.init_vision, concentric=args.concentric,
                         **_schedule(args))
    out = train(config, args.out, device=args.device)
    print(f"saved the checkpoint to {out}")
    return 0


def run_train_clip(args: argparse.Namespace) -> int:
    from vlmkit.world.clip import ClipTrainConfig, train_clip

    train_clip(ClipTrainConfig(**_schedule(args)), args.out, device=args.device)
    print(f"saved the world CLIP checkpoint to {args.out}")
    return 0


def run_eval_clip(args: argparse.Namespace) -> int:
    import torch

    from vlmkit.errors import ConfigError
    from vlmkit.world.clip import evaluate_presence, load_world_clip

    if args.n < 1:
        raise ConfigError(f"--n must be at least 1, got {args.n}")
    clip = load_world_clip(args.model, device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = evaluate_presence(clip.probabilities, n=args.n, seed=args.seed, batch_size=args.batch_size)
    print(f"presence check on {args.n} val images x 50 categories (present: probability > 0.5)")
    print(f"precision {result['precision']:.3f}  recall {result['recall']:.3f}  F1 {result['f1']:.3f}  "
          f"macro F1 {result['macro_f1']:.3f}  accuracy {result['accuracy']:.3f}")
    print(f"chance: F1 {result['base_rate']:.3f} (guessing at the base rate), accuracy {1 - result['base_rate']:.3f} "
          "(always absent)")
    worst = sorted(result["per_category"].items(), key=lambda item: item[1]["f1"])[:5]
    print("lowest F1: " + ", ".join(f"{name} {m['f1']:.2f} (n={m['support']})" for name, m in worst))
    return 0
