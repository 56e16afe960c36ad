"""Objects a generated text mentions, and whether each is in the image (world ground truth or a CLIP check)."""

from __future__ import annotations

import html
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from vlmkit.errors import ConfigError
from vlmkit.world.catalog import CATEGORIES, COLORS


@dataclass(frozen=True)
class Mention:
    """An object word at ``text[start:end]`` naming ``category``; ``present`` is None when nothing was checked."""

    start: int
    end: int
    category: str
    present: bool | None = None


def _words() -> dict[str, str]:
    words = {}
    for name, category in CATEGORIES.items():
        for word in (*category.words, category.plural, name):
            words.setdefault(word.lower(), name)
    return words


WORDS = _words()
_PATTERN = re.compile(r"\b(" + "|".join(re.escape(w) for w in sorted(WORDS, key=len, reverse=True)) + r")\b", re.I)
#: after a word that is also a colour ("orange"), these make it the colour, not the object
_COLOR_USE = re.compile(r"\s+(?:and\s+\w+\s+|in\s+colou?r\b|(?:" + _PATTERN.pattern + "))", re.I)


def find_mentions(text: str) -> list[Mention]:
    """Every mention of one of the world's 50 COCO categories (synonyms and plurals included)."""
    mentions = []
    for match in _PATTERN.finditer(text):
        word = match.group(0).lower()
        if word in COLORS and _COLOR_USE.match(text, match.end()):
            continue
        mentions.append(Mention(match.start(), match.end(), WORDS[word]))
    return mentions


def judge(mentions: Iterable[Mention], present: set[str] | None) -> list[Mention]:
    """Mark each mention present or not against the set of categories in the image (None: unchecked)."""
    return [Mention(m.start, m.end, m.category, None if present is None else m.category in present) for m in mentions]


STYLES = {
    True: "background:#c8f0c8;border-radius:3px;padding:0 2px",
    False: "background:#ffb4b4;color:#8b0000;border-radius:3px;padding:0 2px;text-decoration:line-through",
    None: "border-bottom:2px dotted #888",
}
CLASSES = {True: "obj-present", False: "obj-hallucinated", None: "obj-unchecked"}


def highlight(text: str, mentions: list[Mention]) -> str:
    """``text`` as HTML with each mention wrapped in a span styled by its verdict."""
    parts, last = [], 0
    for m in mentions:
        title = f"{m.category}: " + {True: "in the image", False: "not in the image", None: "not checked"}[m.present]
        parts += [html.escape(text[last:m.start]),
                  f'<span class="{CLASSES[m.present]}" style="{STYLES[m.present]}" title="{html.escape(title)}">'
                  f"{html.escape(text[m.start:m.end])}</span>"]
        last = m.end
    parts.append(html.escape(text[last:]))
    return "".join(parts)


class ClipPresence:
    """Presence check of the objects a text mentions, with a CLIP model.

    ``spec`` ``builtin:world-clip`` or a folder written by ``vlmkit world train-clip`` is the world CLIP model
    (vlmkit.world.clip), trained for this check: a category counts as present when its probability exceeds 0.5.
    Any other ``spec`` is a zero-shot open_clip model: ``ARCH:PRETRAINED`` (e.g. ``ViT-B-32:laion2b_s34b_b79k``), a
    bare ``ARCH`` (random weights: tests only) or ``hf-hub:ORG/NAME``, loaded through open_clip's own download cache;
    a mentioned object counts as present when its prompt ("a photo of a {word}.") ranks among the ``top_k`` of the
    50 world categories for the image. Models load here, so a bad spec fails at start-up rather than in the UI.
    """

    def __init__(self, spec: str, top_k: int = 5, device: str = "cpu"):
        if spec.startswith("builtin:") or Path(spec).is_dir():
            from vlmkit.world.clip import load_world_clip

            self.world = load_world_clip(spec, device)
            return
        import open_clip

        self.world = None
        if spec.startswith("hf-hub:"):
            arch, pretrained = spec, ""
        else:
            arch, _, pretrained = spec.partition(":")
        try:
            model, _, self.preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None,
                                                                              device=device)
            tokenizer = open_clip.get_tokenizer(arch)
        except Exception as error:  # open_clip raises RuntimeError, OSError, ValueError and hub errors
            raise ConfigError(f"cannot load CLIP model {spec!r}: {error}") from None
        self.model, self.top_k, self.device = model.eval(), top_k, device
        prompts = [f"a photo of a {category.words[0]}." for category in CATEGORIES.values()]
        with torch.no_grad():
            text = model.encode_text(tokenizer(prompts).to(device)).float()
        self.text = torch.nn.functional.normalize(text, dim=-1)

    @torch.no_grad()
    def present(self, image: Image.Image) -> set[str]:
        """The categories in ``image``: the world CLIP's above-0.5 ones, or an open_clip model's top ``top_k``."""
        if self.world is not None:
            return self.world.present(image)
        features = self.model.encode_image(self.preprocess(image).unsqueeze(0).to(self.device)).float()
        scores = torch.nn.functional.normalize(features, dim=-1) @ self.text.T
        names = list(CATEGORIES)
        return {names[i] for i in scores[0].topk(min(self.top_k, len(names))).indices.tolist()}
