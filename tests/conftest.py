"""Shared fixtures: tiny models (cached per session) and small test images."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.decoders.base import Decoder
from vlmkit.models.base import unpack_features
from vlmkit.testing import tiny_model, tokens_of

# The tiny models' ops are far too small to gain from intra-op threads, and on a shared 2-core machine extra threads
# make them many times slower. Child processes (the interpreter run, torchrun) inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def run_in_interpreter():
    """``run_in_interpreter(test_file)``: run a kernel test module's cases in a fresh pytest with TRITON_INTERPRET=1
    (which must be set before ``triton.language`` is first imported, long before a test module runs), from a cwd
    outside the repository root, whose kernels/ folder would shadow the `kernels` package transformers probes."""

    def run(test_file: str) -> None:
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONUNBUFFERED": "1"}
        here = Path(test_file).resolve()
        child = subprocess.run(
            [sys.executable, "-c", "import sys, pytest; sys.exit(pytest.main(sys.argv[1:]))", str(here), "-q",
             "-p", "no:cacheprovider", f"--rootdir={here.parents[1]}"],
            cwd=here.parent, env=env, capture_output=True, text=True, timeout=600,
        )
        assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-3000:]
        print(child.stdout.strip().splitlines()[-1])

    return run


@pytest.fixture(scope="session")
def tiny():
    """``tiny(family)`` -> (model, processor), built once per session."""
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = tiny_model(family)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    """Three random RGB images of different sizes (so Qwen gets different visual-token counts)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in [(40, 52), (32, 32), (56, 40)]]


@pytest.fixture(scope="session")
def prompts() -> list[str]:
    """Three prompts of different lengths (a batch of them is left-padded)."""
    return ["Describe the image.", "What is on the table in this picture?", "How many dogs are there?"]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def decode():
    """``decode(model, processor, images, prompts, *decoders, max_new_tokens=6)`` -> the generated token ids."""
    import vlmkit

    def run(model, processor, images, prompts, *decoders: str, max_new_tokens: int = 6) -> list[list[int]]:
        outputs = vlmkit.wrap(model, processor, decoders=list(decoders)).generate(
            images, prompts, max_new_tokens=max_new_tokens)
        return tokens_of(outputs)

    return run


@pytest.fixture(scope="session")
def hf_refs():
    """For the contrastive-decoder tests: ``Spy`` (a decoder recording the logits that reach it), explicit HF
    forwards of one sample with its image (``image_logits``) and without it (``text_logits``), and
    ``batch_equals_single``."""
    return SimpleNamespace(Spy=Spy, image_logits=hf_logits, text_logits=hf_text_logits,
                           batch_equals_single=batch_equals_single)


class Spy(Decoder):
    """Records the logits that reach it at every step."""

    def __init__(self):
        self.seen = []

    def edit_logits(self, ctx, logits, hidden_by_layer):
        self.seen.append(logits.clone())


def batch_equals_single(model, processor, decoder: str, images, prompts) -> None:
    """A batch of two gives each row the tokens and the per-step logits it gets alone."""
    import vlmkit

    spy = Spy()
    vlm = vlmkit.wrap(model, processor, decoders=[decoder, spy])
    batched = vlm.generate(images[:2], prompts[:2], max_new_tokens=4)
    batched_logits, spy.seen = spy.seen, []
    for row in range(2):
        single = vlm.generate(images[row], prompts[row], max_new_tokens=4)[0]
        assert single.token_ids == batched[row].token_ids
        for step, logits in enumerate(spy.seen):
            torch.testing.assert_close(logits[0], batched_logits[step][row], atol=1e-4, rtol=1e-4)
        spy.seen = []


def hf_logits(model, batch, generated: list[int], pixel_values: torch.Tensor) -> torch.Tensor:
    """Last-position logits of one sample's prompt followed by ``generated``: one plain HF forward (no cache) with
    the image features placed by hand (the tiny Qwen generates ``<|image_pad|>``, which HF's own placement would
    count as an image token)."""
    new = torch.tensor([generated], dtype=torch.long)
    ids = torch.cat([batch.input_ids, new], dim=1)
    grid = {k: v for k, v in batch.vision_inputs.items() if k == "image_grid_thw"}
    with torch.no_grad():
        features = torch.cat(unpack_features(model.model.get_image_features(pixel_values=pixel_values, **grid)))
        embeds = model.get_input_embeddings()(ids)
        embeds[:, : batch.input_ids.shape[1]][batch.is_visual] = features.to(embeds.dtype)
        positions = None
        if grid:  # Qwen: M-RoPE ids from the model's own get_rope_index
            types = torch.cat([batch.extra["mm_token_type_ids"], torch.zeros_like(new)], dim=1)
            positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=types, **grid)
        out = model(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), position_ids=positions)
    return out.logits[0, -1].float()


def hf_text_logits(model, batch, generated: list[int]) -> torch.Tensor:
    """The same without the image: the prompt's image tokens (and Qwen's vision start/end) removed, 1-D positions."""
    config = model.config
    dropped = batch.is_visual[0].clone()
    for key in ("vision_start_token_id", "vision_end_token_id"):
        if (token := getattr(config, key, None)) is not None:
            dropped |= batch.input_ids[0] == token
    ids = torch.cat([batch.input_ids[0][~dropped], torch.tensor(generated, dtype=torch.long)])[None]
    with torch.no_grad():
        out = model(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=torch.ones_like(ids),
                    position_ids=torch.arange(ids.shape[1])[None])
    return out.logits[0, -1].float()
