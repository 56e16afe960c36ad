"""The Python API: ``load``, ``wrap``, ``VLM.generate`` and ``VLM.generate_batches``."""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin

from vlmkit import decoders as decoder_registry
from vlmkit import pruners as pruner_registry
from vlmkit.errors import ConfigError, InputError, ModelNotSupported
from vlmkit.images import ImageLike, load_image
from vlmkit.kernels import interface as attention_interface
from vlmkit.models import ADAPTERS, Adapter, adapter_for
from vlmkit.models.base import ProcessedBatch
from vlmkit.runtime.engine import Engine, StreamCallback
from vlmkit.runtime.hooks import GenerationContext, Intervention
from vlmkit.runtime.sampling import SamplingConfig

ATTENTION_BACKENDS = ("auto", "reference")


@dataclass
class Generation:
    """One generated answer. ``stats`` holds at least visual_tokens_in, visual_tokens_kept, visual_tokens_by_layer,
    visual_tokens_mean_over_layers, prefill_tflops (estimated LLM prefill FLOPs), prefill_s, decode_s and new_tokens
    (prefill_s and decode_s are for the whole batch the sample was generated in)."""

    text: str
    token_ids: list[int]
    stats: dict = field(default_factory=dict)


class VLM:
    """A stock HF vision-language model with one pruner and any number of decoders attached."""

    def __init__(
        self,
        model: PreTrainedModel,
        processor: ProcessorMixin,
        *,
        pruner: pruner_registry.Pruner | str | None = None,
        decoders: Sequence[decoder_registry.Decoder | str] = (),
        attn: str = "auto",
        decode: str = "auto",
        prefill: str = "auto",
        compile: bool = False,
    ):
        if attn not in ATTENTION_BACKENDS:
            raise ConfigError(f"unknown attention backend {attn!r}; choose one of {ATTENTION_BACKENDS}")
        self.adapter: Adapter = adapter_for(model, processor)
        self.model, self.processor = model, processor
        attention_interface.register()
        model.set_attn_implementation({"text_config": attention_interface.IMPLEMENTATION})
        if self.adapter.vision_attention is not None:
            _set_vision_attention(model, self.adapter.vision_attention)
        self.pruner = pruner_registry.create_from_spec(pruner) if isinstance(pruner, str) else pruner
        self.decoders = [decoder_registry.create_from_spec(d) if isinstance(d, str) else d for d in decoders]
        self.engine = Engine(self.adapter, self.interventions, attention_backend=attn, decode=decode,
                             prefill=prefill, compile=compile)

    @property
    def interventions(self) -> list[Intervention]:
        return ([self.pruner] if self.pruner is not None else []) + list(self.decoders)

    def generate(
        self,
        images: ImageLike | Sequence[ImageLike],
        prompts: str | Sequence[str],
        *,
        max_new_tokens: int = 128,
        do_sample: bool = False,
        num_beams: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        stream: StreamCallback | None = None,
    ) -> list[Generation]:
        """Answer each prompt about its image. ``stream(row, text_delta)`` is called as text is produced
        (greedy and sampling only); generation of a row ends at EOS, at a ``stop`` string or after
        ``max_new_tokens``."""
        options = _Options.checked(max_new_tokens, do_sample, num_beams, temperature, top_p, top_k, seed, stop,
                                   stream)
        return self._generate(self._request(self.adapter, images, prompts), options)

    def generate_batches(
        self, batches: Iterable[tuple[ImageLike | Sequence[ImageLike], str | Sequence[str]]], **options
    ) -> Iterator[list[Generation]]:
        """:meth:`generate` (``options``: its keywords) for each ``(images, prompts)`` batch, yielded in order. The
        next batch is taken from ``batches`` and prepared (images loaded and checked, the processor, tokenization)
        on a worker thread while this one runs on the model, so that an evaluation's host work hides behind its
        GPU work. A batch whose input is bad raises when its turn comes, after the batches before it."""
        checked = _Options.checked(**options)
        worker = self._worker_adapter  # its own processor: fast tokenizers refuse use from two threads at once
        batches = iter(batches)

        def next_request() -> _Request | None:
            batch = next(batches, None)
            return None if batch is None else self._request(worker, *batch)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmkit-prepare") as pool:
            pending = pool.submit(next_request)
            while (request := pending.result()) is not None:
                pending = pool.submit(next_request)
                yield self._generate(request, checked)

    @functools.cached_property
    def _worker_adapter(self) -> Adapter:
        return self.adapter.with_processor(copy.deepcopy(self.processor))

    def _request(self, adapter: Adapter, images: ImageLike | Sequence[ImageLike],
                 prompts: str | Sequence[str]) -> _Request:
        """Checked, loaded and processed inputs on the host (no CUDA call)."""
        images, prompts = _as_list(images), _as_list(prompts)
        if len(images) != len(prompts):
            raise InputError(f"got {len(images)} images but {len(prompts)} prompts; pass one image per prompt")
        if not prompts:
            raise InputError("no prompts given")
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise InputError(f"prompt {index} is empty; write a question or instruction about the image")
        if len(prompts) > 1:
            for method in self.interventions:
                if not method.supports_batch:
                    raise ConfigError(f"{method.name!r} runs one sample at a time; pass a single prompt")
        pil_images = [load_image(image) for image in images]
        return _Request(pil_images, list(prompts), adapter.process(pil_images, list(prompts)))

    def _generate(self, request: _Request, options: _Options) -> list[Generation]:
        ctx = GenerationContext(adapter=self.adapter, prompts=request.prompts, images=request.images)
        rows = self.engine.generate(
            ctx, self.adapter.to_device(request.processed), max_new_tokens=options.max_new_tokens,
            sampling=options.sampling, seed=options.seed, stop=options.stop, stream=options.stream,
        )
        return [Generation(text=row.text, token_ids=row.token_ids, stats=row.stats) for row in rows]


@dataclass(frozen=True)
class _Request:
    images: list[Image.Image]
    prompts: list[str]
    processed: ProcessedBatch


@dataclass(frozen=True)
class _Options:
    max_new_tokens: int
    sampling: SamplingConfig
    seed: int | None
    stop: Sequence[str]
    stream: StreamCallback | None

    @classmethod
    def checked(cls, max_new_tokens: int = 128, do_sample: bool = False, num_beams: int = 1,
                temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                stop: Sequence[str] = (), stream: StreamCallback | None = None) -> _Options:
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if num_beams < 1:
            raise ConfigError(f"num_beams must be at least 1, got {num_beams}")
        if do_sample and temperature <= 0:
            raise ConfigError(f"temperature must be positive when sampling, got {temperature}")
        if not 0 < top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
        return cls(max_new_tokens, SamplingConfig(do_sample, temperature, top_p, top_k, num_beams), seed, stop, stream)


def wrap(
    hf_model: PreTrainedModel,
    processor: ProcessorMixin,
    *,
    pruner: pruner_registry.Pruner | str | None = None,
    decoders: Sequence[decoder_registry.Decoder | str] = (),
    attn: str = "auto",
    decode: str = "auto",
    prefill: str = "auto",
    compile: bool = False,
) -> VLM:
    """Attach vlmkit to an already loaded model. Its language model's attention is set to ``"vlmkit"`` (which
    behaves like sdpa in the model's own ``forward`` and ``generate``); a Qwen vision tower's to
    ``"vlmkit_flash_packed"`` (sdpa's results, one packed call per layer on CUDA). ``decode``: ``"auto"`` replays
    decode steps as a CUDA graph over a static KV cache on CUDA when no decoder edits them and the answer may run to
    8 tokens or more, or the previous call had the same batch and cache layout (an evaluation's one-word answers);
    ``"static"`` uses the static cache on any device and for any length; ``"dynamic"`` never
    (``vlmkit.runtime.static_decode``). ``prefill``: ``"auto"`` replays the language-model prefill as CUDA graphs
    of bucketed length on CUDA, except the layers where a method acts (methods say which; decoders keep the eager
    walk), for batches of up to 2048 bucketed tokens; ``"static"`` runs the bucketed segments on any device and size;
    ``"dynamic"`` never (``vlmkit.runtime.static_prefill``). ``compile=True`` runs the decoder layers through
    ``torch.compile``, which fuses their element-wise work, where their host work does not show: in the CUDA graphs
    (prefill segments, the decode step) and in eager prefills too large for graphs (more than 2048 bucketed tokens per
    batch, as an evaluation batch's shared prefill); and Qwen's ViT, its unaligned MLP products padded. The first
    calls wait for the compilations, and fused kernels round some values differently, so greedy answers may part
    from the uncompiled ones at near-ties (docs/performance.md)."""
    return VLM(hf_model, processor, pruner=pruner, decoders=decoders, attn=attn, decode=decode, prefill=prefill,
               compile=compile)


def load(
    model: str | Path,
    *,
    pruner: pruner_registry.Pruner | str | None = None,
    decoders: Sequence[decoder_registry.Decoder | str] = (),
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    attn: str = "auto",
    decode: str = "auto",
    prefill: str = "auto",
    compile: bool = False,
    device_map: str | dict | None = None,
) -> VLM:
    """Load a hub id, a local folder or ``"builtin:NAME"`` and wrap it.

    ``device`` defaults to CUDA when available; ``dtype`` to bfloat16 on CUDA and float32 on CPU.
    ``device_map="auto"`` spreads a model too large for one GPU over the visible GPUs (accelerate).
    """
    source = resolve_model(str(model))
    pruner = pruner_registry.create_from_spec(pruner) if isinstance(pruner, str) else pruner  # fail before loading
    decoders = [decoder_registry.create_from_spec(d) if isinstance(d, str) else d for d in decoders]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = _dtype(dtype, device)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot load model {model!r}: {error}") from None
    architectures = config.architectures or [type(config).__name__]
    supported = {name for adapter in ADAPTERS for name in adapter.model_classes}
    if not supported.intersection(architectures):
        raise ModelNotSupported(
            f"model {model!r} is a {', '.join(architectures)}; vlmkit supports {', '.join(sorted(supported))}"
        )
    try:
        processor = AutoProcessor.from_pretrained(source)
        hf_model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch_dtype, device_map=device_map)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot load model {model!r}: {error}") from None
    if device_map is None:
        hf_model = hf_model.to(device)
    return wrap(hf_model.eval(), processor, pruner=pruner, decoders=decoders, attn=attn, decode=decode,
                prefill=prefill, compile=compile)


BUILTIN_DIR = Path(__file__).parent / "world" / "checkpoints"


def resolve_model(model: str) -> str:
    """``builtin:NAME`` -> the folder of a checkpoint shipped with vlmkit; anything else is returned unchanged."""
    if not model.startswith("builtin:"):
        return model
    name = model.removeprefix("builtin:")
    folder = BUILTIN_DIR / name
    if not (folder / "config.json").is_file():
        shipped = sorted(p.name for p in BUILTIN_DIR.glob("*") if (p / "config.json").is_file())
        raise ConfigError(f"no built-in model {name!r}; built-in models: {', '.join(shipped) or 'none yet'}")
    return str(folder)


def _dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ConfigError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return resolved


def _set_vision_attention(model: PreTrainedModel, implementation: str) -> None:
    """Set the adapter's attention implementation on the vision tower; a transformers version that refuses or renames
    it keeps the tower's own, with a warning."""
    vision = model.config.vision_config
    previous = vision._attn_implementation
    try:
        model.set_attn_implementation({"vision_config": implementation})
    except (ValueError, ImportError) as error:
        warnings.warn(f"vision attention {implementation!r} not set ({error}); the vision tower keeps {previous!r}")
        return
    if vision._attn_implementation != implementation:
        warnings.warn(f"transformers set the vision attention to {vision._attn_implementation!r} instead of "
                      f"{implementation!r}; the vision tower keeps {previous!r}")
        model.set_attn_implementation({"vision_config": previous})


def _as_list(value) -> list:
    if isinstance(value, (str, bytes, Path)) or not isinstance(value, Sequence):
        return [value]
    return list(value)
