"""Where the time to first token goes, batch 1, on a random-weight 7B-shaped model: image processing, the vision side
(vision tower, projector, the pruner's selection, packing) and the language-model prefill, with CUDA graphs
(``prefill="auto"``) and without (``prefill="dynamic"``).

    python benchmarks/ttft_parts.py --model llava-1.5-7b --out benchmarks/results/ttft-parts-llava-1.5-7b-<device>.json
    python benchmarks/ttft_parts.py --tiny llava --out /tmp/ttft.json   # CPU smoke run on a tiny model

``--compile`` runs every configuration with ``compile=True``.

Per configuration (dense and each ``--pruners`` at ``--keep`` tokens): ``ttft_ms`` is the engine's ``prefill_s``
(median over ``--repeats`` calls, after warm-up calls that compile and capture); ``processor_ms`` the processor
call; ``vision_side_ms`` ``Engine.initial_state`` (embedding, vision tower, projector, selection, packing);
``llm_prefill_ms`` the language-model prefill of the packed sequence (``Engine.prefill_state``: graph-replayed
segments and eager layers, or the eager walk) and its logits; ``packed_length`` the tokens that enter the language model.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import vlmkit
from e2e import PROMPT, benchmark_model, environment, now, random_images
from vlmkit.runtime.cache import LayeredKVCache
from vlmkit.runtime.hooks import GenerationContext
from vlmkit.testing import SHAPED


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        started = now(device)
        fn()
        times.append(now(device) - started)
    return 1e3 * statistics.median(times)


@torch.no_grad()
def parts(vlm: vlmkit.VLM, image, repeats: int) -> dict:
    engine, adapter = vlm.engine, vlm.adapter
    for _ in range(2):  # Triton compiles, graph captures
        vlm.generate(image, PROMPT, max_new_tokens=1)
    ttft = statistics.median(vlm.generate(image, PROMPT, max_new_tokens=1)[0].stats["prefill_s"]
                             for _ in range(repeats))
    batch = adapter.prepare([image], [PROMPT])
    ctx = GenerationContext(adapter=adapter, prompts=[PROMPT], images=[image], engine=engine, max_new_tokens=1)
    packed, _, _ = engine.initial_state(ctx, batch)

    def llm_prefill():
        state, _, _ = engine.initial_state(ctx, batch)  # the walk edits the state: a fresh one per call
        engine.prefill_state(ctx, state, LayeredKVCache(len(adapter.layers)))

    device = adapter.device
    vision_side = timed(lambda: engine.initial_state(ctx, batch), device, repeats)
    return {
        "ttft_ms": 1e3 * ttft,
        "processor_ms": timed(lambda: adapter.prepare([image], [PROMPT]), device, repeats),
        "vision_side_ms": vision_side,
        "llm_prefill_ms": timed(llm_prefill, device, repeats) - vision_side,
        "packed_length": packed.valid.shape[1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPED), default="llava-1.5-7b")
    parser.add_argument("--tiny", help="CPU smoke run on a tiny model of this family (llava, qwen2_5_vl)")
    parser.add_argument("--out", required=True, help="JSON results file")
    parser.add_argument("--pruners", nargs="*", default=["fastervlm", "uniform", "divprune", "visionzip"])
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="every configuration with compile=True")
    args = parser.parse_args()
    model, processor, name, image_size = benchmark_model(args.model, args.tiny)
    image = random_images(1, image_size)[0]
    results = {"model": name, **environment(model), "batch": 1, "keep": args.keep, "repeats": args.repeats,
               "compile": args.compile,
               "configs": []}
    out = Path(args.out)
    for pruner in [None] + [f"{p}:keep={args.keep}" for p in args.pruners]:
        for mode in ("auto", "dynamic"):
            vlm = vlmkit.wrap(model, processor, pruner=pruner, prefill=mode, decode=mode, compile=args.compile)
            entry = {"config": pruner or "dense", "prefill": mode, **parts(vlm, image, args.repeats)}
            results["configs"].append(entry)
            print(json.dumps(entry), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
