"""CUDA-graph plumbing shared by the runtime's fixed-shape paths (static decode, static prefill, vision forward), and
the torch.compile wrapper of ``compile=True``, whose compiled code those graphs replay."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

import torch

POOL_SIZE = 2  # static decoders and graphed vision calls kept per engine, least recently used dropped first
SEEN_ONCE_KEPT = 64  # shapes remembered after one eager call, so that their second call captures a graph

T = TypeVar("T")


def round_up(count: int, multiple: int) -> int:
    """``count`` rounded up to a multiple of ``multiple``: the bucketed sizes that let shapes share one graph."""
    return -(-count // multiple) * multiple


def capture_graph(run: Callable[[], T], pool=None) -> tuple[torch.cuda.CUDAGraph, T]:
    """Capture ``run()`` as a CUDA graph after one warm-up call on a side stream (Triton compiles, cuBLAS picks its
    kernels); returns the graph and the output tensors it writes on each replay. ``run`` must give the same result
    when called twice."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = run()
    return graph, outputs


RECOMPILE_LIMIT = 32  # compiled variants per function (batch or length 1, cache types, model families)


def compile_dynamic(fn: Callable[..., T], *, allow_unspec_int_on_nn_module: bool = False,
                    **inductor_options) -> Callable[..., T]:
    """``fn`` through ``torch.compile`` with dynamic shapes, for ``compile=True``, whose compiled code the runtime
    replays inside its CUDA graphs where it can. Rounding follows eager's casts (``emulate_precision_casts``), though
    fused float32 reductions may still round a value differently. ``allow_unspec_int_on_nn_module``: int attributes
    of modules (a layer's index) are not specialised."""
    import torch._inductor.config as inductor

    if hasattr(inductor, "emulate_precision_casts"):
        inductor_options["emulate_precision_casts"] = True
    compiled = torch.compile(fn, dynamic=True, options=inductor_options)
    return torch._dynamo.config.patch(allow_unspec_int_on_nn_module=allow_unspec_int_on_nn_module,
                                      recompile_limit=RECOMPILE_LIMIT)(compiled)


class LRUPool(Generic[T]):
    """Objects by key, the least recently used dropped beyond ``size``; their buffers stay allocated for reuse
    until dropped or :meth:`clear`."""

    def __init__(self, size: int):
        self.size = size
        self.items: OrderedDict[tuple, T] = OrderedDict()

    def clear(self) -> None:
        self.items.clear()

    def get(self, key: tuple, make: Callable[[], T]) -> T:
        item = self.items.pop(key, None) or make()
        self.items[key] = item
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return item


class GraphedCall:
    """``fn(*inputs)`` for inputs of one shape, replayed as a CUDA graph: the inputs are copied into static buffers
    and the outputs (a tuple of tensors or None) are cloned out of the graph's."""

    def __init__(self, fn: Callable[..., tuple[torch.Tensor | None, ...]], inputs: tuple[torch.Tensor, ...]):
        self.inputs = tuple(x.clone() for x in inputs)
        self.graph, self.outputs = capture_graph(lambda: fn(*self.inputs))

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        for buffer, x in zip(self.inputs, inputs):
            buffer.copy_(x)
        self.graph.replay()
        return tuple(None if out is None else out.clone() for out in self.outputs)


class GraphedCalls:
    """Pure tensor functions, each replayed as a CUDA graph per (name, input shapes); for a fixed-shape forward such
    as a ViT on one image size. ``fn`` must have no host synchronisation and no output that depends on Python state
    other than ``name``. A shape's graph is captured on its second call (the first runs eagerly): a capture runs the
    function twice more (a warm-up, then under capture), so shapes seen once (a one-off call, an evaluation's images
    of varied sizes) never pay for one."""

    def __init__(self, size: int = POOL_SIZE):
        self.pool: LRUPool[GraphedCall] = LRUPool(size)
        self.seen_once: LRUPool[bool] = LRUPool(SEEN_ONCE_KEPT)  # keys called once

    def run(self, name: str, fn: Callable[..., tuple[torch.Tensor | None, ...]],
            *inputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        key = (name, *((tuple(x.shape), x.dtype, str(x.device)) for x in inputs))
        if key not in self.pool.items:
            if key not in self.seen_once.items:
                self.seen_once.get(key, lambda: True)
                return fn(*inputs)
            del self.seen_once.items[key]
        return self.pool.get(key, lambda: GraphedCall(fn, inputs))(*inputs)
