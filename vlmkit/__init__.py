"""vlmkit: visual-token pruning and hallucination-correcting decoding for VLMs on stock HF transformers."""

from vlmkit import decoders, errors, pruners
from vlmkit.api import VLM, Generation, load, wrap

__version__ = "0.1.0"

__all__ = ["VLM", "Generation", "decoders", "errors", "load", "pruners", "wrap"]
