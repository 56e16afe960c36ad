"""Where a graph configuration's greedy tokens leave the eager walk's, and whether the eager logits are tied there.

    cd benchmarks && python token_ties.py   # on a GPU: the 7B shapes, in bf16
    cd benchmarks && python token_ties.py --model llava-1.5-7b --only pdrop:keep=64   # some of them

``e2e.py``'s ``tokens_match_dynamic`` says whether a configuration's CUDA-graph path gives the eager layer walk's
greedy tokens. For each configuration here (the ones that differed in a run, fastv as a control, the eager walk
through ``torch.compile``'d layers, ``compile=True``, forced onto this batch-1 walk, which is below the size that
compiles by default, and ``compile=True``'s graph paths: compiled layers and, on Qwen, the compiled ViT) this prints
the first token where the fast path and the eager walk differ, the eager walk's top-2 logit margin at that token
(read by a logit-recording decoder, which keeps the walk eager) and the score the eager walk gave the graph path's
token. A margin of 0 or one bf16 step means the two paths split a tie by rounding, not by computing something else.
"""

from __future__ import annotations

import argparse

import torch

import vlmkit
from e2e import PROMPT, LogitRecorder, random_images
from vlmkit.runtime import engine
from vlmkit.testing import SHAPED, shaped_model

COMPILED_WALK = {"compile": True, "decode": "dynamic", "prefill": "dynamic"}
COMPILED_GRAPHS = {"compile": True}
LABELS = [(COMPILED_WALK, " (compiled walk)"), (COMPILED_GRAPHS, " (compiled graphs)")]  # fast-path options: name
#: per model: (pruner, the fast path's options: {} for CUDA graphs)
CONFIGS = {"llava-1.5-7b": [("dyvte:exit_layer=2", {}), ("pdrop:keep=64", {}), ("fastv:keep=64", {}),
                            (None, COMPILED_WALK), (None, COMPILED_GRAPHS)],
           "qwen2.5-vl-7b": [("pdrop:keep=64", {}), ("dyvte:exit_layer=2", {}), ("fastv:keep=64", {}),
                             (None, COMPILED_WALK), (None, COMPILED_GRAPHS), ("uniform:keep=64", COMPILED_GRAPHS),
                             ("random:keep=64", COMPILED_GRAPHS), ("pdrop:keep=64", COMPILED_GRAPHS),
                             ("dyvte:exit_layer=2", COMPILED_GRAPHS), ("fastv:keep=64,debias=exp", COMPILED_GRAPHS)]}
NEW_TOKENS = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(CONFIGS), nargs="*", default=list(CONFIGS))
    parser.add_argument("--only", nargs="*", help="these configurations only, as CONFIGS spells the pruner ('dense': "
                        "none) or as the output names them ('uniform:keep=64 (compiled graphs)')")
    args = parser.parse_args()
    compile_min_tokens = engine.COMPILE_MIN_TOKENS
    for model_name in args.model:
        specs = [(spec, path) for spec, path in CONFIGS[model_name]
                 if not args.only or {spec or "dense", label(spec, path)} & set(args.only)]
        model, processor = shaped_model(model_name, dtype=torch.bfloat16, device="cuda")
        image = random_images(1, SHAPED[model_name][1]["image_size"])[0]
        for spec, fast_path in specs:
            def tokens(**kwargs) -> list[int]:
                vlm = vlmkit.wrap(model, processor, pruner=spec, **kwargs)
                return vlm.generate(image, PROMPT, max_new_tokens=NEW_TOKENS)[0].token_ids

            name = label(spec, fast_path)
            # the compiled walk at batch 1: where do compiled layers round differently? (graphs as e2e.py runs them)
            engine.COMPILE_MIN_TOKENS = 0 if fast_path == COMPILED_WALK else compile_min_tokens
            fast = tokens(**fast_path)
            slow = tokens(decode="dynamic", prefill="dynamic")
            recorder = LogitRecorder()
            assert tokens(decoders=[recorder], decode="dynamic", prefill="dynamic") == slow
            step = next((i for i, (a, b) in enumerate(zip(fast, slow)) if a != b), None)
            if step is None:
                print(model_name, name, "same tokens", flush=True)
                continue
            logits = recorder.seen[step][0].float()
            top = logits.topk(2)
            print(model_name, name, f"first difference at token {step} of {len(slow)}; eager top-2 margin "
                  f"{float(top.values[0] - top.values[1]):.4f}; the fast path's token scores "
                  f"{float(logits[fast[step]]):.3f} vs the eager top {float(top.values[0]):.3f}; logit scale (std) "
                  f"{float(logits.std()):.3f}", flush=True)
        del model
        torch.cuda.empty_cache()


def label(spec: str | None, fast_path: dict) -> str:
    return (spec or "dense") + next((name for options, name in LABELS if options == fast_path), "")


if __name__ == "__main__":
    main()
