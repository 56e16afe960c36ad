"""Benchmark and GPU check of the fused Triton attention kernel (``vlmkit.kernels.attention``).

    python benchmarks/attention.py --check        # kernel vs float64 reference at real shapes (bf16/fp16)
    python benchmarks/attention.py --sweep        # time candidate prefill block configs
    python benchmarks/attention.py                # the benchmark: JSON + markdown table

Run it from outside the repository root or as a script (``python benchmarks/attention.py``), never with ``-m`` from
the root (the ``kernels/`` folder would shadow the ``kernels`` package transformers probes).

Throughput is 4·B·Hq·Lq·Lk·D FLOPs (half of it when causal over a square matrix) over the median time of
``triton.testing.do_bench``. Shapes: LLaVA-7B-like (32 heads, d=128) and Qwen2.5-VL-7B-like GQA (28 query heads over
4 KV heads, d=128), causal prefill at 1k-8k tokens, batch 1-8, bf16; decode steps (one query over a KV cache).
Compared with torch SDPA's flash and cuDNN backends, SDPA with the boolean padding mask that a plain attention
function must pass (the masked path), FlexAttention (LLaVA shapes, batch 1), and eager attention that materialises
the probabilities (LLaVA, batch 1, up to 4k).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from vlmkit.kernels import attention, attention_reference, ring_table_mask
from vlmkit.kernels.reference import allowed_mask

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"llava-7b": (32, 32), "qwen2.5-vl-7b": (28, 4)}  # (query heads, KV heads), head dim 128
PREFILL = [(1024, 1), (1024, 8), (2048, 1), (2048, 8), (4096, 1), (4096, 4), (8192, 1), (8192, 2)]  # (seq, batch)
DECODE = [(1024, 1), (4096, 1), (8192, 1), (16384, 1), (4096, 8), (8192, 8)]  # (cache length, batch)
MASS_SPAN = 64  # key-mass statistics: the last 64 queries over every key
GRAPHED = ("triton", "triton+key_mass", "sdpa-flash")  # also timed as CUDA-graph replays at short lengths
DIM = 128


def bench(fn) -> float:
    """Median milliseconds."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_graph(fn) -> float:
    """Median milliseconds of a CUDA-graph replay of ``fn``: GPU time without the host's launch overhead (what a
    graph-captured decode loop pays)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and allocate outside the capture
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay)


def tflops(batch, q_heads, q_len, k_len, causal, ms) -> float:
    flops = 4 * batch * q_heads * q_len * k_len * DIM * (0.5 if causal and q_len == k_len else 1.0)
    return flops / ms / 1e9


def qkv(batch, q_heads, kv_heads, q_len, k_len, dtype=torch.bfloat16):
    q = torch.randn(batch, q_heads, q_len, DIM, device="cuda", dtype=dtype)
    k = torch.randn(batch, kv_heads, k_len, DIM, device="cuda", dtype=dtype)
    v = torch.randn(batch, kv_heads, k_len, DIM, device="cuda", dtype=dtype)
    return q, k, v


def sdpa(backend, q, k, v, causal, mask=None):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                              enable_gqa=q.shape[1] != k.shape[1])


def eager_with_probs(q, k, v):
    """What attention-score methods use today: the probabilities materialised (``output_attentions=True``)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    length = q.shape[2]
    logits = logits.masked_fill(torch.ones(length, length, device=q.device, dtype=torch.bool).triu(1), float("-inf"))
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
    return probs @ v, probs


def peak_memory(fn) -> float:
    """Peak extra GiB allocated by one call."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def run_prefill(rows: list[dict], flex: bool) -> None:
    flex_attention = create_block_mask = None
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex_attention = torch.compile(flex_attention, dynamic=False)
        torch._dynamo.config.cache_size_limit = 64
    for model, (q_heads, kv_heads) in MODELS.items():
        for seq, batch in PREFILL:
            q, k, v = qkv(batch, q_heads, kv_heads, seq, seq)
            key_valid = torch.ones(batch, seq, device="cuda", dtype=torch.bool)
            key_valid[-1, : seq // 8] = False  # left padding in the last row (none when batch is 1)
            if batch == 1:
                key_valid[0] = True
            methods = {
                "triton": lambda: attention(q, k, v),
                "triton+key_mass": lambda: attention(q, k, v, mass_queries=(seq - MASS_SPAN, seq)),
                "triton+padding": lambda: attention(q, k, v, key_valid=key_valid),
                "sdpa-flash": lambda: sdpa(SDPBackend.FLASH_ATTENTION, q, k, v, True),
                "sdpa-cudnn": lambda: sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v, True),
            }
            mask = allowed_mask(batch, 1, seq, seq, causal=True, key_valid=key_valid, mask_mod=None, device=q.device)
            methods["sdpa-masked"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                             enable_gqa=q_heads != kv_heads)
            if flex and batch == 1 and model == "llava-7b":  # one compile per shape: a few shapes only
                block_mask = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, seq, seq, device="cuda")
                methods["flex"] = lambda: flex_attention(q, k, v, block_mask=block_mask, enable_gqa=q_heads != kv_heads)
            if batch == 1 and seq <= 4096 and model == "llava-7b":
                methods["eager-probs"] = lambda: eager_with_probs(q, k, v)
            timings = [(name, "eager", fn) for name, fn in methods.items()]
            timings += [(name, "graph", methods[name]) for name in GRAPHED if seq <= 2048]
            for name, launch, fn in timings:
                try:
                    ms = bench(fn) if launch == "eager" else bench_graph(fn)
                except Exception as error:  # a backend that does not take this shape (reported, not fatal)
                    print(f"{model} {name} L={seq} B={batch}: {type(error).__name__}: {str(error)[:120]}")
                    continue
                row = dict(suite="prefill", model=model, method=name, launch=launch, batch=batch, q_len=seq,
                           k_len=seq, q_heads=q_heads, kv_heads=kv_heads, head_dim=DIM, causal=True, dtype="bfloat16",
                           ms=ms, tflops=tflops(batch, q_heads, seq, seq, True, ms))
                if seq == 4096 and batch == 1 and launch == "eager" and name in ("triton", "triton+key_mass",
                                                                                 "eager-probs"):
                    row["peak_gib"] = peak_memory(fn)
                rows.append(row)
                print(json.dumps(row))
            del q, k, v, mask, methods
            torch.cuda.empty_cache()


def run_decode(rows: list[dict]) -> None:
    for model, (q_heads, kv_heads) in MODELS.items():
        for cache, batch in DECODE:
            q, k, v = qkv(batch, q_heads, kv_heads, 1, cache)
            methods = {
                "triton": lambda: attention(q, k, v),
                "triton+key_mass": lambda: attention(q, k, v, mass_queries=(0, 1)),
                "sdpa-flash": lambda: sdpa(SDPBackend.FLASH_ATTENTION, q, k, v, False),
                "sdpa-default": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=q_heads != kv_heads),
            }
            for name, launch, fn in [(n, launch, f) for launch in ("eager", "graph") for n, f in methods.items()]:
                try:
                    ms = bench(fn) if launch == "eager" else bench_graph(fn)
                except Exception as error:
                    print(f"{model} decode {name} L={cache} B={batch}: {type(error).__name__}: {str(error)[:120]}")
                    continue
                kv_bytes = 2 * batch * kv_heads * cache * DIM * q.element_size()
                row = dict(suite="decode", model=model, method=name, launch=launch, batch=batch, q_len=1, k_len=cache,
                           q_heads=q_heads, kv_heads=kv_heads, head_dim=DIM, causal=True, dtype="bfloat16",
                           ms=ms, us=ms * 1e3, kv_tb_per_s=kv_bytes / ms / 1e9)
                rows.append(row)
                print(json.dumps(row))


def check() -> bool:
    """The kernel against the float64 reference on the GPU, at real shapes, every feature; poisoned outputs."""
    torch.manual_seed(0)
    tol = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3, torch.float32: 1e-5}
    ok = True
    cases = [
        ("llava prefill bf16, padding+bias+mass", torch.bfloat16, 2, 32, 32, 1500, 1500, 128, "span", "pad+bias"),
        ("qwen prefill fp16 GQA, weights mass", torch.float16, 2, 28, 4, 1200, 1200, 128, "weights", "pad"),
        ("qwen decode bf16 split-KV", torch.bfloat16, 4, 28, 4, 1, 8000, 128, "span", "pad"),
        ("llava decode fp16 Lq=4", torch.float16, 2, 32, 32, 4, 5000, 128, "span", "pad+bias"),
        ("chunk bf16 Lq=300 over 2000", torch.bfloat16, 1, 28, 4, 300, 2000, 128, "span", ""),
        ("prefill fp16 d=80", torch.float16, 1, 16, 16, 777, 777, 80, "span", "bias"),
        ("prefill bf16 d=96", torch.bfloat16, 1, 12, 4, 640, 640, 96, None, "pad"),
        ("prefill fp32 d=64", torch.float32, 1, 8, 8, 513, 513, 64, "span", ""),
        ("cca ring mask bf16 24x24", torch.bfloat16, 2, 32, 32, 700, 700, 128, "span", "cca"),
    ]
    for name, dtype, batch, hq, hkv, lq, lk, dim, mass, extras in cases:
        q = torch.randn(batch, hq, lq, dim, device="cuda", dtype=dtype)
        k = torch.randn(batch, hkv, lk, dim, device="cuda", dtype=dtype)
        v = torch.randn(batch, hkv, lk, dim, device="cuda", dtype=dtype)
        kwargs = {}
        if "pad" in extras:
            key_valid = torch.ones(batch, lk, device="cuda", dtype=torch.bool)
            key_valid[-1, : lk // 7] = False
            kwargs["key_valid"] = key_valid
        if "bias" in extras:
            kwargs["key_bias"] = torch.randn(batch, 1, lk, device="cuda")
        if "cca" in extras:
            rings = torch.full((batch, lk), -1, device="cuda", dtype=torch.long)
            r, c = torch.arange(24, device="cuda").view(-1, 1), torch.arange(24, device="cuda").view(1, -1)
            grid = torch.minimum(torch.minimum(r, c), torch.minimum(23 - r, 23 - c)).flatten()
            rings[0, 35:611], rings[1, 60:636] = grid, grid
            kwargs["mask_mod"] = ring_table_mask(rings)
            kwargs["causal"] = False
        if mass == "span":
            kwargs["mass_queries"] = (max(0, lq - 64), lq)
            kwargs["mass_keys"] = (min(35, lk - 1), min(611, lk))
        elif mass == "weights":
            weights = torch.rand(batch, lq, device="cuda")
            weights[:, : lq // 2] = 0
            kwargs["mass_queries"] = weights
        out = torch.full((batch, lq, hq, dim), float("nan"), device="cuda", dtype=dtype)
        got, stats = attention(q, k, v, out=out, **kwargs)
        ref, ref_stats = attention_reference(q, k, v, compute_dtype=torch.float64, **kwargs)
        rel = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
        lse_err = (stats.lse - ref_stats.lse).nan_to_num(posinf=0, neginf=0).abs().max().item()
        lse_inf_ok = torch.equal(torch.isinf(stats.lse), torch.isinf(ref_stats.lse))
        mass_err = 0.0
        if ref_stats.key_mass is not None:
            mass_err = ((stats.key_mass - ref_stats.key_mass).abs().max() / ref_stats.key_mass.abs().max()).item()
        passed = (not got.isnan().any().item()) and rel < tol[dtype] and lse_err < 1e-3 and lse_inf_ok \
            and mass_err < 1e-4
        ok &= passed
        print(f"{'PASS' if passed else 'FAIL'} {name}: out rel {rel:.2e}, lse max {lse_err:.1e}, "
              f"mass rel {mass_err:.1e}")
        del q, k, v, ref, got
        torch.cuda.empty_cache()
    return ok


def sweep() -> None:
    """Time candidate prefill block configs (bf16, causal, d=128) to choose PREFILL_CONFIGS."""
    module = sys.modules["vlmkit.kernels.attention"]
    default = module.PREFILL_CONFIGS[("cuda", 2)]
    candidates = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                  (128, 32, 4, 4), (64, 128, 4, 3)]
    for model, (q_heads, kv_heads) in MODELS.items():
        q, k, v = qkv(4, q_heads, kv_heads, 4096, 4096)
        for config in candidates:
            module.PREFILL_CONFIGS[("cuda", 2)] = module.KernelConfig(*config)
            try:
                ms = bench(lambda: attention(q, k, v))
                print(f"sweep {model} {config}: {tflops(4, q_heads, 4096, 4096, True, ms):.0f} TFLOP/s")
            except Exception as error:
                print(f"sweep {model} {config}: {type(error).__name__}: {str(error)[:100]}")
    module.PREFILL_CONFIGS[("cuda", 2)] = default


def markdown(report: dict) -> str:
    """Short tables: prefill TFLOP/s per method, decode µs per method (``[graph]``: CUDA-graph replay)."""
    def label(row):
        return row["method"] + (" [graph]" if row.get("launch") == "graph" else "")

    lines = []
    prefill = [r for r in report["rows"] if r["suite"] == "prefill"]
    methods = list(dict.fromkeys(label(r) for r in prefill))
    lines += ["| model | seq | batch | " + " | ".join(methods) + " |", "|---|---|---|" + "---|" * len(methods)]
    for key in dict.fromkeys((r["model"], r["q_len"], r["batch"]) for r in prefill):
        cells = {label(r): f"{r['tflops']:.0f}" for r in prefill if (r["model"], r["q_len"], r["batch"]) == key}
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells.get(m, "–") for m in methods) + " |")
    decode = [r for r in report["rows"] if r["suite"] == "decode"]
    methods = list(dict.fromkeys(label(r) for r in decode))
    lines += ["", "| model | cache | batch | " + " | ".join(f"{m} (µs)" for m in methods) + " |",
              "|---|---|---|" + "---|" * len(methods)]
    for key in dict.fromkeys((r["model"], r["k_len"], r["batch"]) for r in decode):
        cells = {label(r): f"{r['us']:.1f}" for r in decode if (r["model"], r["k_len"], r["batch"]) == key}
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells.get(m, "–") for m in methods) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check correctness against the reference")
    parser.add_argument("--sweep", action="store_true", help="only time candidate prefill configs")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (compiles one kernel per shape)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if args.check:
        sys.exit(0 if check() else 1)
    if args.sweep:
        sweep()
        return
    device = torch.cuda.get_device_name()
    rows: list[dict] = []
    try:
        run_prefill(rows, flex=not args.no_flex)
        run_decode(rows)
    finally:  # an interrupted run (Ctrl-C) still writes what it measured
        report = dict(device=device, torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                      python=platform.python_version(), command="python benchmarks/attention.py", rows=rows)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        name = device.lower().replace("nvidia ", "").replace(" ", "-")
        (args.out_dir / f"attention-{name}.json").write_text(json.dumps(report, indent=1))
        (args.out_dir / f"attention-{name}.md").write_text(markdown(report))
        print(markdown(report))


if __name__ == "__main__":
    main()
