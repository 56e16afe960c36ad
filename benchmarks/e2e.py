"""End-to-end speed on random-weight 7B-shaped models: HF ``generate`` (sdpa) against vlmkit dense, vlmkit with each
pruner at 64 visual tokens, and vlmkit with each decoder.

    python benchmarks/e2e.py --model llava-1.5-7b --out benchmarks/results/e2e-llava-1.5-7b-<device>.json
    python benchmarks/e2e.py --model qwen2.5-vl-7b --out ...
    python benchmarks/e2e.py --plot benchmarks/results/e2e-*.json --png docs/e2e.png
    python benchmarks/e2e.py --tiny llava --out /tmp/e2e.json   # CPU smoke run of this script on a tiny model

Per configuration, at batch 1 on one random image (576 visual tokens for both shapes):

* ``ttft_ms``: time to first token. HF: ``generate(max_new_tokens=1)`` on already processed inputs; vlmkit: the
  engine's ``prefill_s`` (vision encoder, projector, pruning and the LLM prefill; image processing excluded in both).
* ``decode_ms_per_token``: HF: (``generate`` of N forced tokens - TTFT) / (N - 1); vlmkit: ``decode_s`` over the
  N - 1 decode steps it ran. Medians over the repeats, after one warm-up run (Triton compiles).
* ``e2e_ms``: wall time of one whole call (vlmkit: ``VLM.generate`` including image processing).
* ``peak_gib``: peak allocated GPU memory over the configuration's runs, weights included.
* POPE-style throughput (``--throughput``, default dense only): questions per second for one-word answers (3 new
  tokens) at batch 16 and 64, wall time including image processing for both, with 1 and with 6 questions per image
  (POPE asks 6 about each image; vlmkit then processes each image and prefills its prompt prefix once, HF has no
  such reuse). HF: ``generate`` calls one after another. vlmkit: ``questions_per_s`` runs 8 batches through
  ``VLM.generate_batches`` (the evaluation loop: the next batch's image processing and tokenization run on a worker
  thread while this batch is on the GPU); ``questions_per_s_one_call_at_a_time`` makes one ``generate`` call after
  another. vlmkit's figures follow two warm-up calls (the second call of a batch layout captures its decode
  graph, as the second batch of an evaluation does); ``call_ms``, ``prefill_ms`` and ``decode_ms`` are medians per
  call, ``processor_ms`` the rest of the call (image processing, tokenization, bookkeeping), ``decode_path`` how
  the timed calls decoded and ``prefill_path`` how they prefilled (below); ``warm_up_s`` the two warm-up calls
  (with ``compile=True``, the first compiles).
  ``vlmkit-dense-compiled``: ``compile=True`` (the decoder layers of prefills too large for graphs run through
  ``torch.compile``); ``--compile`` sets it for every vlmkit configuration.
  ``tokens_match_unshared``: whether those answers equal vlmkit's own without prefix sharing;
  ``answers_differing_from_unshared`` counts the rows that differ, and ``unshared_answers_differing_from_batch_1``
  the unshared batch's rows that differ from asking each question alone (bf16 rounding depends on the batch layout).
* ``decode_path``: ``cuda-graph`` when vlmkit replayed the decode steps as a CUDA graph over its static KV cache
  (``decode="auto"``: no decoder edits the steps), else ``dynamic``. ``prefill_path``: ``cuda-graph`` when it
  replayed the language-model prefill, or the runs of layers between those where a pruner acts, as CUDA graphs of
  bucketed length (``prefill="auto"``), else ``dynamic``. For graph runs, ``tokens_match_dynamic`` says whether the same greedy call
  with ``decode="dynamic", prefill="dynamic"`` (the eager layer walk) gave the same tokens.
  ``vlmkit-dense-dynamic`` times that eager path.
* ``sgl`` (LLaVA shape only): the small model is a random-weight TinyLlama-1.1B-shaped LLaVA with the same CLIP
  tower (``llava-tinyllama-1.1b``); ``sgl_exit_rate`` is the fraction of timed calls the small model answered alone.

Random weights produce gibberish, so the outputs are not scored here; parity with HF ``generate`` is what the test
suite checks (tests/test_parity.py). Every configuration is isolated: an error is recorded and the run goes on.
Results are written after every configuration, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

import vlmkit
from vlmkit.decoders.base import Decoder
from vlmkit.testing import SHAPED, shaped_model, tiny_model, tokens_of

PRUNERS = ["uniform", "random", "fastv", "pdrop", "divprune", "visionzip", "fastervlm", "dart", "zoo", "agile"]
EXTRA_PRUNERS = ["dyvte:exit_layer=2", "fastv:keep={keep},debias=exp"]
DECODERS = ["vista", "gift", "locore", "cca:training_free=true", "sgrs", "vcd", "pai", "var"]
COMBINED = [("divprune:keep={keep}", "vista")]  # divprune: runs on both families
PROMPT = "Describe the image in detail."
QUESTION = "Is there a {} in the image? Answer the question using a single word or phrase."
OBJECTS = ["dog", "car", "cup", "person", "chair", "bird"]
PIPELINED_BATCHES = 8  # batches per pipelined throughput figure (VLM.generate_batches)
TTFT_TARGET_MS, DECODE_TARGET_MS, THROUGHPUT_TARGET = 20, 10, 5  # issue #9's targets (TTFT: 64 kept visual tokens;
# decode: dense; throughput: times HF batched generate)


def now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def environment(model: torch.nn.Module) -> dict:
    """The device and library versions a result was measured with."""
    device = model.device
    meta = {
        "weights": "random", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "transformers": transformers.__version__, "vlmkit": vlmkit.__version__,
        "parameters_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 2),
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    return meta


def random_images(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


class Bench:
    def __init__(self, model, processor, image_size: int, new_tokens: int, repeats: int, out: Path, meta: dict):
        self.model, self.processor, self.device = model, processor, model.device
        self.image = random_images(1, image_size)[0]
        self.image_size, self.new_tokens, self.repeats, self.out = image_size, new_tokens, repeats, out
        self.results = {**meta, "configs": [], "throughput": []}

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.results, indent=1))

    def record(self, name: str, run) -> None:
        """Run one configuration (``run`` returns its measurements) and save, keeping errors as results."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            entry = {"config": name, **run()}
        except Exception as error:  # noqa: BLE001 - one failing method must not lose the others' numbers
            entry = {"config": name, "error": f"{type(error).__name__}: {error}"}
        if self.device.type == "cuda":
            entry["peak_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        self.results["configs"].append(entry)
        print(json.dumps(entry), flush=True)
        self.save()

    # ---- HF transformers generate (sdpa) ----

    def hf_inputs(self, images: list[Image.Image], prompts: list[str]) -> dict:
        """The processor's left-padded inputs for one chat prompt per image."""
        texts = [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
            add_generation_prompt=True) for prompt in prompts]
        self.processor.tokenizer.padding_side = "left"
        return self.processor(images=images, text=texts, return_tensors="pt", padding=True).to(self.device)

    def hf_generate(self, inputs: dict, tokens: int) -> float:
        started = now(self.device)
        with torch.inference_mode():
            self.model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        return now(self.device) - started

    def hf(self) -> dict:
        inputs = self.hf_inputs([self.image], [PROMPT])
        self.hf_generate(inputs, 2)  # warm-up
        ttft = statistics.median(self.hf_generate(inputs, 1) for _ in range(self.repeats))
        full = statistics.median(self.hf_generate(inputs, self.new_tokens) for _ in range(self.repeats))
        return {"ttft_ms": 1e3 * ttft, "decode_ms_per_token": 1e3 * (full - ttft) / (self.new_tokens - 1),
                "e2e_ms": 1e3 * full, "new_tokens": self.new_tokens}

    def pope_batch(self, batch: int, per_image: int) -> tuple[list[Image.Image], list[str]]:
        """``batch`` questions, ``per_image`` about each image (the same object, as an eval loader passes it)."""
        distinct = random_images(-(-batch // per_image), self.image_size, seed=batch)
        images = [distinct[i // per_image] for i in range(batch)]
        return images, [QUESTION.format(OBJECTS[i % len(OBJECTS)]) for i in range(batch)]

    def hf_throughput(self, batch: int, per_image: int) -> float:
        images, questions = self.pope_batch(batch, per_image)
        # the processor runs in every call: image processing is in the wall time, as for vlmkit
        self.hf_generate(self.hf_inputs(images, questions), 3)  # warm-up
        started = now(self.device)
        for _ in range(self.repeats):
            self.hf_generate(self.hf_inputs(images, questions), 3)
        return batch * self.repeats / (now(self.device) - started)

    # ---- vlmkit ----

    def vlmkit(self, make) -> dict:
        """Time ``make(mode)``'s VLM (``mode`` for its prefill and decode); check a graph-replayed greedy call
        against the dynamic path."""
        vlm = make("auto")
        vlm.generate(self.image, PROMPT, max_new_tokens=self.new_tokens)  # warm-up (Triton compiles, graph capture)
        runs = []
        for _ in range(self.repeats):
            started = now(self.device)
            generation = vlm.generate(self.image, PROMPT, max_new_tokens=self.new_tokens)[0]
            runs.append((now(self.device) - started, generation.stats, generation.token_ids))
        steps = [max(1, stats["new_tokens"] - 1) for _, stats, _ in runs]
        stats = runs[0][1]
        graph = bool(vlm.engine.static_decoders.items)
        check = {}
        if graph or prefill_path(vlm) == "cuda-graph":
            slow = make("dynamic").generate(self.image, PROMPT, max_new_tokens=self.new_tokens)[0]
            check = {"tokens_match_dynamic": slow.token_ids == runs[0][2]}
        exits = [s.get("sgl_exit") for _, s, _ in runs]
        if exits[0] is not None:
            check["sgl_exit_rate"] = sum(map(bool, exits)) / len(exits)
        return {
            "ttft_ms": 1e3 * statistics.median(s["prefill_s"] for _, s, _ in runs),
            "decode_ms_per_token": 1e3 * statistics.median(s["decode_s"] / n for (_, s, _), n in zip(runs, steps)),
            "e2e_ms": 1e3 * statistics.median(wall for wall, _, _ in runs),
            "new_tokens": stats["new_tokens"],
            "visual_tokens_in": stats["visual_tokens_in"],
            "visual_tokens_mean_over_layers": float(np.mean(stats["visual_tokens_by_layer"])),
            "decode_path": "cuda-graph" if graph else "dynamic",
            "prefill_path": prefill_path(vlm),
            **check,
        }

    def vlmkit_throughput(self, vlm: vlmkit.VLM, batch: int, per_image: int) -> dict:
        """Questions per second and where a call's time goes; with several questions per image, also whether the
        shared-prefix answers are the unshared ones."""
        images, questions = self.pope_batch(batch, per_image)
        for pool in (vlm.engine.static_prefills, vlm.engine.static_decoders):
            pool.clear()  # the graphs of earlier batch shapes: the paths reported are this shape's
        started = now(self.device)
        for _ in range(2):  # warm-up: Triton compiles; the second call of a layout captures its decode graph
            answers = vlm.generate(images, questions, max_new_tokens=3)
        warm_up_s = now(self.device) - started
        calls = []
        started = now(self.device)
        for _ in range(self.repeats):
            call_started = now(self.device)
            stats = vlm.generate(images, questions, max_new_tokens=3)[0].stats
            calls.append((now(self.device) - call_started, stats["prefill_s"], stats["decode_s"]))
        one_at_a_time = batch * self.repeats / (now(self.device) - started)
        started = now(self.device)
        for _ in vlm.generate_batches([(images, questions)] * PIPELINED_BATCHES, max_new_tokens=3):
            pass
        result = {"questions_per_s": batch * PIPELINED_BATCHES / (now(self.device) - started),
                  "questions_per_s_one_call_at_a_time": one_at_a_time, "warm_up_s": warm_up_s,
                  "decode_path": "cuda-graph" if vlm.engine.static_decoders.items else "dynamic",
                  "prefill_path": prefill_path(vlm)}
        for index, part in enumerate(("call_ms", "prefill_ms", "decode_ms")):
            result[part] = 1e3 * statistics.median(call[index] for call in calls)
        result["processor_ms"] = result["call_ms"] - result["prefill_ms"] - result["decode_ms"]
        if per_image > 1:
            vlm.engine.share_image_prefix = False
            unshared = tokens_of(vlm.generate(images, questions, max_new_tokens=3))
            alone = [tokens_of(vlm.generate(image, question, max_new_tokens=3))[0]
                     for image, question in zip(images, questions)]
            vlm.engine.share_image_prefix = True
            result["tokens_match_unshared"] = unshared == tokens_of(answers)
            result["answers_differing_from_unshared"] = sum(a != b for a, b in zip(tokens_of(answers), unshared))
            result["unshared_answers_differing_from_batch_1"] = sum(a != b for a, b in zip(unshared, alone))
            result.update(eager_ties(vlm, images, questions, tokens_of(answers)))
        return result


def prefill_path(vlm: vlmkit.VLM) -> str:
    """``cuda-graph`` when the engine replayed (some of) its language-model prefills as CUDA graphs."""
    graphed = any(segment.graph is not None for segment in vlm.engine.static_prefills.items.values())
    return "cuda-graph" if graphed else "dynamic"


class LogitRecorder(Decoder):
    """Records every row's next-token logits at every step and changes nothing (its hook keeps generation on the
    eager walk, without shared prefixes)."""

    name = "logit-recorder"

    def __init__(self):
        self.seen: list[torch.Tensor] = []

    def edit_logits(self, ctx, logits, hidden_by_layer):
        self.seen.append(logits.clone())


def eager_ties(vlm: vlmkit.VLM, images, questions, answers: list[list[int]]) -> dict:
    """Where ``answers`` leave the eager walk's (unshared, one row per question): how many rows differ and, over those
    rows, the largest gap between the eager walk's top logit and its logit for the answer's token at the first
    differing step. A gap of 0 or about one bf16 step of the logits is a tie that rounding split."""
    recorder = LogitRecorder()
    eager = vlmkit.wrap(vlm.model, vlm.processor, pruner=vlm.pruner, decoders=[recorder], decode="dynamic",
                        prefill="dynamic")
    reference = tokens_of(eager.generate(images, questions, max_new_tokens=3))
    gaps = []
    for row, (mine, theirs) in enumerate(zip(answers, reference)):
        step = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
        if step is not None:
            logits = recorder.seen[step][row]
            gaps.append(float(logits.max() - logits[mine[step]]))
    return {"answers_differing_from_eager": len(gaps),
            "largest_eager_logit_gap_where_differing": max(gaps, default=0.0)}


def benchmark_model(model_name: str, tiny: str | None):
    """``(model, processor, name, image_size)``: the random-weight 7B shape on CUDA, or a tiny model on the CPU."""
    if tiny:
        model, processor = tiny_model(tiny)
        return model, processor, f"tiny-{tiny}", 32
    model, processor = shaped_model(model_name, dtype=torch.bfloat16, device="cuda")
    return model, processor, model_name, SHAPED[model_name][1]["image_size"]


def run(args: argparse.Namespace) -> None:
    model, processor, name, image_size = benchmark_model(args.model, args.tiny)
    meta = {"model": name, **environment(model), "batch": 1, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "keep": args.keep, "compile": args.compile}
    bench = Bench(model, processor, image_size, args.new_tokens, args.repeats, Path(args.out), meta)
    model.set_attn_implementation("sdpa")
    bench.record("hf-sdpa", bench.hf)
    for batch in args.batches:
        for per_image in args.questions_per_image:
            bench.results["throughput"].append({"config": "hf-sdpa", "batch": batch, "questions_per_image": per_image,
                                                "questions_per_s": bench.hf_throughput(batch, per_image)})
            bench.save()
    def with_vlmkit(pruner=None, decoders=(), compile=False):
        return lambda mode: vlmkit.wrap(model, processor, pruner=pruner, decoders=list(decoders), decode=mode,
                                        prefill=mode, compile=compile or args.compile)

    wanted = set(args.only or [])
    configs = {"vlmkit-dense": with_vlmkit(), "vlmkit-dense-compiled": with_vlmkit(compile=True)}
    configs.update({p: with_vlmkit(pruner=p) for p in
                    [f"{p}:keep={args.keep}" for p in PRUNERS] + [p.format(keep=args.keep) for p in EXTRA_PRUNERS]})
    if args.model == "llava-1.5-7b" and not args.tiny:
        small = vlmkit.wrap(*shaped_model("llava-tinyllama-1.1b", dtype=torch.bfloat16, device="cuda"))
        from vlmkit.pruners.sgl import SmallGuidance

        configs[f"sgl:keep={args.keep}"] = lambda mode: vlmkit.wrap(
            model, processor, pruner=SmallGuidance(small=small, keep=args.keep), decode=mode, prefill=mode)
        configs[f"sgl:keep={args.keep},exit_threshold=0"] = lambda mode: vlmkit.wrap(
            model, processor, pruner=SmallGuidance(small=small, keep=args.keep, exit_threshold=0.0), decode=mode,
            prefill=mode)
    configs.update({d: with_vlmkit(decoders=[d]) for d in DECODERS})
    for pruner, decoder in COMBINED:
        pruner = pruner.format(keep=args.keep)
        configs[f"{pruner} + {decoder}"] = with_vlmkit(pruner, [decoder])
    for name, make in configs.items():
        if wanted and name not in wanted and name.split(":")[0] not in wanted:
            continue
        bench.record(name, lambda: bench.vlmkit(make))
        if name == "vlmkit-dense":
            eager = make("dynamic")
            bench.record("vlmkit-dense-dynamic", lambda: bench.vlmkit(lambda mode: eager))
        if name in args.throughput:
            vlm = make("auto")
            for batch in args.batches:
                for per_image in args.questions_per_image:
                    bench.results["throughput"].append({
                        "config": name, "batch": batch, "questions_per_image": per_image,
                        **bench.vlmkit_throughput(vlm, batch, per_image)})
                    bench.save()
            del vlm  # its static decoders hold batch-64 caches: later configurations' peak memory must not count them


def plot(files: list[str], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [json.loads(Path(f).read_text()) for f in files]
    fig, axes = plt.subplots(len(results), 3, figsize=(19, 4.2 * len(results)), squeeze=False)
    for row, result in zip(axes, results):
        configs = [c for c in result["configs"] if "error" not in c]
        names = [c["config"] for c in configs]
        for ax, key, path, label, target in (
                (row[0], "ttft_ms", "prefill_path", "time to first token (ms)", TTFT_TARGET_MS),
                (row[1], "decode_ms_per_token", "decode_path", "decode (ms per token)", DECODE_TARGET_MS)):
            colors = ["tab:gray" if n == "hf-sdpa" else "tab:orange" if c.get(path) == "cuda-graph" else "tab:red"
                      for n, c in zip(names, configs)]
            ax.barh(names, [c[key] for c in configs], color=colors)
            ax.axvline(target, color="black", linestyle="--", linewidth=1)
            ax.invert_yaxis()
            ax.set_xlabel(f"{label}; dashed: #9 target")
            ax.set_title(f"{model_label(result)}: {path.split('_')[0]} (orange: CUDA graph, red: eager, gray: HF)",
                         fontsize=9)
            ax.tick_params(axis="y", labelsize=7)
        plot_throughput(row[2], result)
    fig.suptitle(f"random weights, {results[0]['device']}; TTFT and decode at batch 1", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def model_label(result: dict) -> str:
    return result["model"] + (" (all compile=True)" if result.get("compile") else "")


def plot_throughput(ax, result: dict) -> None:
    """POPE-style throughput of each measured configuration as a multiple of HF's, per batch and layout."""
    rows = result.get("throughput", [])
    hf = {(r["batch"], r["questions_per_image"]): r["questions_per_s"] for r in rows if r["config"] == "hf-sdpa"}
    layouts = sorted(hf)
    configs = list(dict.fromkeys(r["config"] for r in rows if r["config"] != "hf-sdpa"))
    width = 0.8 / max(1, len(configs))
    for index, config in enumerate(configs):
        ours = {(r["batch"], r["questions_per_image"]): r["questions_per_s"] for r in rows if r["config"] == config}
        ax.bar([i + index * width for i in range(len(layouts))], [ours[l] / hf[l] for l in layouts], width,
               label=config)
    ax.axhline(THROUGHPUT_TARGET, color="black", linestyle="--", linewidth=1)
    ax.set_xticks([i + width * (len(configs) - 1) / 2 for i in range(len(layouts))],
                  [f"batch {b}\n{q} per image" for b, q in layouts], fontsize=7)
    ax.set_ylabel("questions/s over HF generate's; dashed: #9 target")
    ax.set_title(f"{model_label(result)}: POPE-style throughput, generate_batches (HF: dense generate)", fontsize=9)
    ax.legend(fontsize=7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SHAPED), default="llava-1.5-7b")
    parser.add_argument("--tiny", help="CPU smoke run on a tiny model of this family (llava, qwen2_5_vl)")
    parser.add_argument("--out", help="JSON results file")
    parser.add_argument("--keep", type=int, default=64, help="visual tokens kept by every pruner")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="*", default=[16, 64])
    parser.add_argument("--questions-per-image", type=int, nargs="+", default=[1, 6],
                        help="POPE-style throughput: questions asked about each image in a batch (POPE asks 6)")
    parser.add_argument("--throughput", nargs="*", default=["vlmkit-dense"],
                        help="configurations whose POPE-style throughput is measured too")
    parser.add_argument("--only", nargs="*", help="run only these configurations (names or method names) after HF")
    parser.add_argument("--compile", action="store_true", help="every vlmkit configuration with compile=True")
    parser.add_argument("--plot", nargs="+", help="JSON results files to plot (no benchmark run)")
    parser.add_argument("--png", default="docs/e2e.png")
    args = parser.parse_args()
    if args.plot:
        plot(args.plot, args.png)
    else:
        run(args)


if __name__ == "__main__":
    main()
