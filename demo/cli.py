"""``vlmkit demo``: serve the side-by-side Gradio demo."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    demo = subparsers.add_parser("demo", help="serve the side-by-side Gradio demo")
    demo.add_argument("--model", default="builtin:world-tiny", help="hub id, local folder or builtin:NAME")
    demo.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    demo.add_argument("--port", type=int, default=7860)
    demo.add_argument("--columns", type=int, choices=[2, 3], default=3)
    demo.add_argument("--clip-model", default="auto",
                      help="presence check of the objects named for uploaded images: builtin:world-clip, a world CLIP "
                           "folder or open_clip ARCH:PRETRAINED; auto (default): builtin:world-clip when shipped; "
                           "none: no check")
    demo.add_argument("--max-new-tokens", type=int, default=96)
    demo.add_argument("--concurrency", type=int, default=1, help="requests generating at the same time")
    demo.add_argument("--device")
    demo.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from vlmkit.demo.app import build_app, launch

    clip_model = None if args.clip_model == "none" else args.clip_model
    app = build_app(args.model, columns=args.columns, clip_model=clip_model, max_new_tokens=args.max_new_tokens,
                    concurrency_limit=args.concurrency, device=args.device)
    launch(app, host=args.host, port=args.port)
    return 0
