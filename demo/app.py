"""The side-by-side Gradio demo: one image and prompt, two or three pruner/decoder columns, streamed answers.

Each column shows its answer as it streams, then the kept visual tokens as an overlay on the image, latency and
token counts, and the objects it names marked present or hallucinated (world examples: the scene's ground truth;
uploads: a CLIP check, by default the built-in world CLIP model once it is shipped). Images reach the page only as
inline data URIs, never as server paths.
"""

from __future__ import annotations

import base64
import html
import inspect
import io
import logging
import math
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image, ImageOps

import vlmkit
from vlmkit import decoders, pruners
from vlmkit.api import VLM, Generation
from vlmkit.demo.objects import ClipPresence, find_mentions, highlight, judge
from vlmkit.errors import ConfigError, InputError, VlmkitError
from vlmkit.images import load_image
from vlmkit.world.dataset import scenes
from vlmkit.world.render import render
from vlmkit.world.scene import Scene
from vlmkit.world.tasks import CAPTION_PROMPT

log = logging.getLogger(__name__)

DEFAULT_MODEL = "builtin:world-tiny"
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_PIXELS = 25_000_000
MAX_NEW_TOKENS = 256  # also the cap for API callers, who are not bound by the slider
NONE = "none"
#: (pruner, decoder) of each column: a baseline, a pruner, a decoder
DEFAULT_COLUMNS = ((NONE, NONE), ("fastv:keep=64", NONE), (NONE, "vista"))
SUMMARY_HEADERS = ["column", "pruner", "decoder", "visual tokens kept", "prefill s", "decode s", "new tokens",
                   "objects named", "hallucinated"]
#: ``build_app``'s default ``clip_model``: ``builtin:world-clip`` when that checkpoint is shipped, else no check
AUTO = "auto"
CLIP_NOTE = ("Objects named for uploaded images are not checked: start the app with `--clip-model builtin:world-clip` "
             "(the world CLIP model) or an open_clip `ARCH:PRETRAINED` (e.g. `ViT-B-32:laion2b_s34b_b79k`).")


@dataclass(frozen=True)
class Example:
    """A built-in world image with its ground-truth scene."""

    label: str
    scene: Scene
    image: Image.Image


def world_examples(n: int = 8, seed: int = 0) -> list[Example]:
    """The first ``n`` scenes of the world's val split, rendered."""
    return [Example(f"{s.scene_type} #{i + 1}", s, render(s)) for i, s in enumerate(scenes("val", n, seed))]


def method_choices() -> tuple[list[str], list[str]]:
    """Dropdown presets: every registered pruner (with ``keep=64`` where it takes a budget) and decoder."""
    pruner_specs = [f"{name}:keep=64" if "keep" in inspect.signature(pruners.REGISTRY.get(name).__init__).parameters
                    else name for name in pruners.available()]
    return [NONE, *pruner_specs], [NONE, *decoders.available()]


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def model_view(image: Image.Image, processor) -> Image.Image:
    """The part of ``image`` the visual tokens cover: the centre crop for processors that crop (LLaVA / CLIP)."""
    image_processor = getattr(processor, "image_processor", None)
    crop = getattr(image_processor, "crop_size", None) if getattr(image_processor, "do_center_crop", False) else None
    if crop:
        return ImageOps.fit(image, (crop["width"], crop["height"]), Image.Resampling.BICUBIC)
    image = image.copy()
    image.thumbnail((448, 448))
    return image


def grid_shape(tokens: int, width: int, height: int) -> tuple[int, int]:
    """(rows, cols) with rows * cols == tokens whose aspect ratio is closest to the image's."""
    pairs = [(r, tokens // r) for r in range(1, tokens + 1) if tokens % r == 0]
    return min(pairs, key=lambda rc: abs(math.log(rc[0] / rc[1]) - math.log(height / width)))


def kept_overlay(image: Image.Image, kept: Sequence[int], tokens: int) -> Image.Image:
    """``image`` with the kept tokens' cells tinted and the dropped ones darkened."""
    rows, cols = grid_shape(tokens, *image.size)
    mask = np.zeros(tokens, dtype=np.uint8)
    mask[list(kept)] = 255
    cells = Image.fromarray(mask.reshape(rows, cols)).resize(image.size, Image.Resampling.NEAREST)
    kept_look = Image.blend(image, Image.new("RGB", image.size, (255, 150, 0)), 0.3)
    dropped_look = Image.blend(image, Image.new("RGB", image.size, (0, 0, 0)), 0.7)
    return Image.composite(kept_look, dropped_look, cells)


def read_upload(data: bytes) -> Image.Image:
    """An uploaded file as an RGB image; too large or undecodable files raise :class:`InputError`."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise InputError(f"the image is {len(data) / 2**20:.1f} MiB; the limit is {MAX_UPLOAD_BYTES // 2**20} MiB")
    return load_image(data, max_pixels=MAX_PIXELS)


def _stream(vlm: VLM, image: Image.Image, prompt: str, max_new_tokens: int) -> Iterator[tuple[str, Generation | None]]:
    """Yield ``(text so far, None)`` while generating on a worker thread, then ``(text, generation)``."""
    events: queue.Queue = queue.Queue()

    def work() -> None:
        try:
            stream = lambda row, delta: events.put(("text", delta))  # noqa: E731
            events.put(("done", vlm.generate(image, prompt, max_new_tokens=max_new_tokens, stream=stream)[0]))
        except BaseException as error:  # handed to the caller's thread
            events.put(("error", error))

    threading.Thread(target=work, daemon=True).start()
    text = ""
    while True:
        kind, value = events.get()
        if kind == "error":
            raise value
        if kind == "done":
            yield value.text, value
            return
        text += value
        yield text, None


def _stats_html(generation: Generation) -> str:
    stats = generation.stats
    kept, total = stats["visual_tokens_kept"], stats["visual_tokens_in"]
    last = len(stats["kept_visual_indices"])
    layers = f" ({kept} entered the LLM)" if last != kept else ""
    return (f"<b>{last} / {total}</b> visual tokens kept ({100 * last / max(total, 1):.0f}%){layers}<br>"
            f"prefill {stats['prefill_s']:.2f} s · decode {stats['decode_s']:.2f} s · {stats['new_tokens']} tokens")


def _column_html(view: Image.Image, generation: Generation) -> str:
    overlay = kept_overlay(view, generation.stats["kept_visual_indices"], generation.stats["visual_tokens_in"])
    return (f'<div class="vk-heat"><img src="{data_uri(overlay)}" alt="kept visual tokens" '
            f'style="width:100%;max-width:336px;image-rendering:pixelated"><div class="vk-stats">'
            f"{_stats_html(generation)}</div></div>")


def _model_label(model: str | VLM) -> str:
    """How the page names the model: never a local folder's path, only its name."""
    if isinstance(model, VLM):
        return type(model.model).__name__
    return Path(model).name if Path(model).exists() else model


def _message(text: str) -> str:
    return f'<div class="vk-error" style="color:#a00">{html.escape(text)}</div>'


def build_app(
    model: str | VLM = DEFAULT_MODEL,
    *,
    columns: int = 3,
    clip_model: str | None = AUTO,
    max_new_tokens: int = 96,
    concurrency_limit: int = 1,
    examples: int = 8,
    device: str | None = None,
) -> gr.Blocks:
    """The demo as a queued ``gr.Blocks`` (launch it with :func:`launch`). ``model`` is anything ``vlmkit.load``
    takes, or a loaded :class:`VLM`; ``clip_model`` checks the objects named for uploads (:class:`ClipPresence`:
    ``builtin:world-clip``, a world CLIP folder or open_clip ``ARCH:PRETRAINED``; ``"auto"``: ``builtin:world-clip``
    when shipped; None: no check)."""
    if columns not in (2, 3):
        raise ConfigError(f"columns must be 2 or 3, got {columns}")
    base = vlmkit.load(model, device=device) if isinstance(model, str) else model
    if clip_model == AUTO:
        from vlmkit.world.clip import BUILTIN, builtin_available

        clip_model = BUILTIN if builtin_available() else None
    clip = ClipPresence(clip_model, device=str(base.model.device)) if clip_model else None
    world = {e.label: e for e in world_examples(examples)}
    pruner_choices, decoder_choices = method_choices()

    def choose_input(upload: bytes | None, example: str | None) -> tuple[Image.Image, Scene | None]:
        if upload:
            return read_upload(upload), None
        if example in world:
            return world[example].image, world[example].scene
        raise InputError("upload an image or pick a world example")

    def preview(upload: bytes | None, example: str | None) -> str:
        try:
            image, _ = choose_input(upload, example)
        except VlmkitError as error:
            return _message(str(error)) if upload else ""
        return f'<img src="{data_uri(model_view(image, base.processor))}" alt="input" style="max-width:100%">'

    with gr.Blocks(title="vlmkit demo", analytics_enabled=False) as app:
        gr.Markdown(
            "# vlmkit: pruners and decoders side by side\n"
            f"Model `{_model_label(model)}`. Pick a world example or upload "
            "an image, choose a pruner and a decoder per column, and press **Run** (columns run one after another, "
            "so their timings do not compete). Overlay: orange cells are the visual tokens that reached the last "
            "layer. Objects: <span style='background:#c8f0c8'>in the image</span>, "
            "<span style='background:#ffb4b4'>not in the image (hallucinated)</span>, dotted: not checked. "
            + ("" if clip else CLIP_NOTE)
        )
        with gr.Row():
            with gr.Column(scale=2):
                gallery = gr.Dataset(
                    label="World examples", components=["html"], type="index", samples_per_page=len(world),
                    samples=[[f'<img src="{data_uri(e.image.resize((96, 96)))}" alt="{e.label}" title="{e.label}">']
                             for e in world.values()],
                    elem_id="examples",
                )
                example = gr.Dropdown(list(world), value=None, label="World example", elem_id="example")
                upload = gr.File(label=f"or upload an image (at most {MAX_UPLOAD_BYTES // 2**20} MiB)",
                                 file_types=["image"], type="binary", height=130, elem_id="upload")
            with gr.Column(scale=1):
                shown = gr.HTML(elem_id="preview")
        with gr.Row():
            prompt = gr.Textbox(CAPTION_PROMPT, label="Prompt", scale=4, elem_id="prompt")
            tokens = gr.Slider(8, MAX_NEW_TOKENS, value=max_new_tokens, step=8, label="Max new tokens", scale=1)
            run = gr.Button("Run", variant="primary", scale=1, elem_id="run")
        status = gr.Markdown(elem_id="status")
        specs, heats, texts = [], [], []
        with gr.Row():
            for index, (pruner, decoder) in enumerate(DEFAULT_COLUMNS[:columns]):
                with gr.Column(elem_classes="vk-column"):
                    gr.Markdown(f"### Column {'ABC'[index]}")
                    specs += [gr.Dropdown(pruner_choices, value=pruner, label="Pruner", allow_custom_value=True),
                              gr.Dropdown(decoder_choices, value=decoder, label="Decoder", allow_custom_value=True)]
                    heats.append(gr.HTML(elem_id=f"heat-{index}"))
                    texts.append(gr.HTML(elem_id=f"text-{index}", elem_classes="vk-answer"))
        summary = gr.Dataframe(headers=SUMMARY_HEADERS, label="Summary", interactive=False, elem_id="summary")

        def run_all(upload_data: bytes | None, example_label: str | None, prompt_text: str, limit: float,
                    *column_specs: str) -> Iterator[dict]:
            try:
                image, scene = choose_input(upload_data, example_label)
                if not (prompt_text or "").strip():
                    raise InputError("write a prompt")
            except VlmkitError as error:
                yield {status: f"**Error:** {error}", summary: [], **{c: "" for c in heats + texts}}
                return
            view = model_view(image, base.processor)
            shown_now = {status: "Running…", summary: [], **{c: "" for c in heats + texts}}  # every output, always
            yield shown_now
            truth = set(scene.categories) if scene is not None else None
            clip_verdicts: set[str] | None = None
            rows = []
            for index in range(columns):
                pruner, decoder = column_specs[2 * index: 2 * index + 2]
                name = "ABC"[index]
                try:
                    vlm = VLM(base.model, base.processor, pruner=None if pruner in (NONE, "", None) else pruner,
                              decoders=[] if decoder in (NONE, "", None) else [decoder])
                    for text, generation in _stream(vlm, image, prompt_text, int(min(max(limit, 1), MAX_NEW_TOKENS))):
                        if generation is None:
                            yield shown_now | {texts[index]: html.escape(text)}
                    mentions = find_mentions(generation.text)
                    if truth is None and clip is not None and mentions and clip_verdicts is None:
                        clip_verdicts = clip.present(image)
                    mentions = judge(mentions, truth if truth is not None else clip_verdicts)
                    hallucinated = sorted({m.category for m in mentions if m.present is False})
                    shown_now |= {heats[index]: _column_html(view, generation),
                                  texts[index]: f'<div class="vk-text">{highlight(generation.text, mentions)}</div>'}
                    yield shown_now
                    stats = generation.stats
                    rows.append([name, pruner, decoder,
                                 f"{len(stats['kept_visual_indices'])} / {stats['visual_tokens_in']}",
                                 round(stats["prefill_s"], 3), round(stats["decode_s"], 3), stats["new_tokens"],
                                 len({m.category for m in mentions}),
                                 ", ".join(hallucinated) if truth is not None or clip_verdicts is not None else "n/a"])
                except VlmkitError as error:
                    shown_now[texts[index]] = _message(str(error))
                    yield shown_now
                    rows.append([name, pruner, decoder, "error", None, None, None, None, None])
                except Exception:  # a bug must not take the server down; details go to the server log only
                    log.exception("column %s failed", name)
                    shown_now[texts[index]] = _message("internal error; see the server log")
                    yield shown_now
                    rows.append([name, pruner, decoder, "error", None, None, None, None, None])
            yield shown_now | {status: "Done.", summary: rows}

        gallery.click(lambda i: (list(world)[i], None), inputs=gallery, outputs=[example, upload], api_name=False)
        upload.upload(lambda: None, outputs=example, api_name=False)
        for source in (example, upload):
            source.change(preview, inputs=[upload, example], outputs=shown, api_name=False)
        run.click(run_all, inputs=[upload, example, prompt, tokens, *specs], outputs=[status, summary, *heats, *texts],
                  api_name="run", concurrency_limit=concurrency_limit)
    return app.queue(default_concurrency_limit=concurrency_limit, max_size=32)


def launch(app: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = 7860, block: bool = True) -> str:
    """Serve ``app`` (upload limit, no error details, no extra file paths); returns the local URL."""
    try:
        _, url, _ = app.launch(server_name=host, server_port=port, max_file_size=MAX_UPLOAD_BYTES, show_error=False,
                               prevent_thread_lock=not block, quiet=not block)
    except OSError as error:
        raise ConfigError(f"cannot serve the demo on {host}:{port}: {error}") from None
    return url
