"""The ``vlmkit`` command line: ``generate``, ``tiny``, ``world`` (each module in SUBCOMMANDS adds its own)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

from vlmkit.errors import VlmkitError

#: modules that each define ``add_parser(subparsers)``; the parser's ``func(args) -> int`` runs the command
SUBCOMMANDS = ("vlmkit.cli", "vlmkit.evals.cli", "vlmkit.world.cli", "vlmkit.demo.cli")


def add_parser(subparsers) -> None:
    generate = subparsers.add_parser("generate", help="answer a prompt about an image")
    generate.add_argument("--model", required=True, help="hub id, local folder or builtin:NAME")
    generate.add_argument("--image", required=True, action="append", help="image path (repeat for a batch)")
    generate.add_argument("--prompt", required=True, action="append", help="prompt (repeat, one per image)")
    generate.add_argument("--pruner", help="pruner spec, e.g. fastv:keep=64")
    generate.add_argument("--decoder", action="append", default=[], help="decoder spec (repeatable)")
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--num-beams", type=int, default=1)
    generate.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--device")
    generate.add_argument("--dtype")
    generate.add_argument("--json", action="store_true", help="print one JSON line per answer, with stats")
    generate.set_defaults(func=run_generate)

    tiny = subparsers.add_parser("tiny", help="save a tiny random test model (llava, qwen2_vl, qwen2_5_vl) to a folder")
    tiny.add_argument("family", choices=["llava", "qwen2_vl", "qwen2_5_vl"])
    tiny.add_argument("out", help="output folder")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=run_tiny)


def run_generate(args: argparse.Namespace) -> int:
    import vlmkit

    vlm = vlmkit.load(args.model, pruner=args.pruner, decoders=args.decoder, device=args.device, dtype=args.dtype)
    if not args.json:
        def stream(row: int, text: str) -> None:
            print(text, end="", flush=True)
    outputs = vlm.generate(
        args.image, args.prompt, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
        do_sample=args.sample, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
        stream=stream if not args.json and len(args.prompt) == 1 and args.num_beams == 1 else None,
    )
    for output in outputs:
        if args.json:
            print(json.dumps({"text": output.text, "token_ids": output.token_ids, "stats": output.stats}))
        elif len(args.prompt) == 1 and args.num_beams == 1:
            print()
        else:
            print(output.text)
    return 0


def run_tiny(args: argparse.Namespace) -> int:
    from vlmkit.testing import tiny_model

    model, processor = tiny_model(args.family, seed=args.seed)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    print(f"saved a tiny random {args.family} model to {args.out} (random weights: its answers are noise)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmkit", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VlmkitError as error:
        print(f"vlmkit: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
