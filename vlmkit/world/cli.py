"""``vlmkit world build --out DIR --n N --seed S [--split val]``."""

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


def run_build(args: argparse.Namespace) -> int:
    from vlmkit.errors import ConfigError
    from vlmkit.world.dataset import build

    if args.n < 1:
        raise ConfigError(f"--n must be at least 1, got {args.n}")
    out = build(args.out, args.n, seed=args.seed, split=args.split)
    print(f"wrote {args.n} {args.split} images with COCO instances and captions to {out}")
    return 0
