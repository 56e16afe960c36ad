"""Shared fixtures: tiny models (cached per session) and small test images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.testing import tiny_model


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
