"""End-to-end GPU check of the built-in ``world-tiny`` model: the Triton attention path (``attn="auto"``) against
the torch reference path, dense and with three pruners, in bf16 and fp16.

    python benchmarks/world_tiny.py benchmarks/results/world-tiny-<device>.json

For each (dtype, pruner, attention path) it times 64 greedy captions (60 new tokens, batch 64) and 128 POPE-style
adversarial yes/no questions (batch 64), and counts how many of the 192 generated rows are token-identical between
the two attention paths (bf16 near-ties may flip a token). Timings include Python overhead and any Triton compiles
after the short warm-up: they are a health check, not the perf benchmark.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
import transformers
import triton

import vlmkit
from vlmkit.world.dataset import scenes
from vlmkit.world.render import render
from vlmkit.world.tasks import absent_categories, caption_sample, presence_sample

PRUNERS = (None, "fastv:keep=0.25", "visionzip:keep=64", "dart:keep=64")


def main(out: str) -> None:
    rng = np.random.default_rng(0)
    val = list(scenes("val", 64))
    images = [render(scene) for scene in val]
    caption_prompts = [caption_sample(scene).prompt for scene in val]
    pope = []
    for scene, image in zip(val, images):
        for category in (scene.categories[0], absent_categories(scene, rng, "adversarial")[0]):
            sample = presence_sample(scene, category, short=True)
            pope.append((image, sample.prompt, sample.answer.lower()))
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": transformers.__version__, "triton": triton.__version__, "runs": []}
    for dtype in ("bfloat16", "float16"):
        for spec in PRUNERS:
            tokens = {}
            for attn in ("auto", "reference"):
                vlm = vlmkit.load("builtin:world-tiny", pruner=spec, device="cuda", dtype=dtype, attn=attn)
                vlm.generate(images[:2], caption_prompts[:2], max_new_tokens=8)  # warm-up (Triton compile)
                torch.cuda.synchronize()
                start = time.perf_counter()
                captions = vlm.generate(images, caption_prompts, max_new_tokens=60)
                torch.cuda.synchronize()
                caption_s = time.perf_counter() - start
                start = time.perf_counter()
                answers = []
                for i in range(0, len(pope), 64):
                    chunk = pope[i:i + 64]
                    answers += vlm.generate([c[0] for c in chunk], [c[1] for c in chunk], max_new_tokens=2)
                torch.cuda.synchronize()
                pope_s = time.perf_counter() - start
                accuracy = float(np.mean([a.text.strip().lower().startswith(truth)
                                          for a, (_, _, truth) in zip(answers, pope)]))
                tokens[attn] = [c.token_ids for c in captions] + [a.token_ids for a in answers]
                run = {"dtype": dtype, "pruner": spec, "attn": attn, "captions_64_s": round(caption_s, 3),
                       "pope_128_s": round(pope_s, 3), "pope_adv_acc": accuracy,
                       "kept": captions[0].stats.get("visual_tokens_kept")}
                result["runs"].append(run)
                print(json.dumps(run), flush=True)
            same = sum(a == b for a, b in zip(tokens["auto"], tokens["reference"]))
            result["runs"].append({"dtype": dtype, "pruner": spec, "identical_rows": same, "rows": len(tokens["auto"])})
    with open(out, "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
