"""Drawing a scene: background, clutter, then each object's glyph (its category's shape and inner mark)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from vlmkit.world.catalog import CATEGORIES, COLORS, SCENES
from vlmkit.world.scene import IMAGE_SIZE, Scene


def render(scene: Scene) -> Image.Image:
    scene_type = SCENES[scene.scene_type]
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene_type.wall)
    draw = ImageDraw.Draw(image)
    horizon = int(scene_type.horizon * IMAGE_SIZE)
    draw.rectangle([0, horizon, IMAGE_SIZE, IMAGE_SIZE], fill=scene_type.floor)
    rng = np.random.default_rng(scene.clutter_seed)
    _clutter(draw, rng)
    for obj in scene.objects:
        category = CATEGORIES[obj.category]
        _glyph(draw, category.shape, category.mark, obj.bbox, COLORS[obj.color])
    pixels = np.asarray(image, dtype=np.float32) + 6 * rng.standard_normal((IMAGE_SIZE, IMAGE_SIZE, 1), np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255, out=pixels).astype(np.uint8))


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator) -> None:
    """Small neutral strokes and specks that belong to no category."""
    for _ in range(int(rng.integers(6, 16))):
        x, y = rng.integers(0, IMAGE_SIZE, 2)
        length, angle = rng.integers(6, 22), rng.random() * math.pi
        shade = int(rng.integers(90, 200))
        end = (x + length * math.cos(angle), y + length * math.sin(angle))
        draw.line([(int(x), int(y)), end], fill=(shade, shade, shade), width=int(rng.integers(1, 3)))


def _polygon(cx: float, cy: float, radius: float, sides: int, rotation: float = -math.pi / 2) -> list[tuple]:
    return [
        (cx + radius * math.cos(rotation + 2 * math.pi * i / sides), cy + radius * math.sin(rotation + 2 * math.pi * i / sides))
        for i in range(sides)
    ]


def _glyph(draw: ImageDraw.ImageDraw, shape: str, mark: str, bbox, color: tuple[int, int, int]) -> None:
    x, y, w, h = bbox
    cx, cy, r = x + w / 2, y + h / 2, w / 2
    outline = tuple(max(0, c - 90) for c in color) if sum(color) > 200 else (200, 200, 200)
    box = [x, y, x + w, y + h]
    stroke = max(2, int(w / 14))
    if shape == "circle":
        draw.ellipse(box, fill=color, outline=outline, width=stroke)
    elif shape == "square":
        draw.rectangle(box, fill=color, outline=outline, width=stroke)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.15, r, 3), fill=color, outline=outline, width=stroke)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, r, 4), fill=color, outline=outline, width=stroke)
    elif shape == "pentagon":
        draw.polygon(_polygon(cx, cy, r, 5), fill=color, outline=outline, width=stroke)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, 0.0), fill=color, outline=outline, width=stroke)
    elif shape == "star":
        points = [
            (cx + (r if i % 2 == 0 else r * 0.45) * math.cos(-math.pi / 2 + math.pi * i / 5),
             cy + (r if i % 2 == 0 else r * 0.45) * math.sin(-math.pi / 2 + math.pi * i / 5))
            for i in range(10)
        ]
        draw.polygon(points, fill=color, outline=outline, width=stroke)
    elif shape == "cross":
        third = w / 3
        draw.rectangle([x + third, y, x + 2 * third, y + h], fill=color, outline=outline, width=stroke)
        draw.rectangle([x, y + third, x + w, y + 2 * third], fill=color, outline=outline, width=stroke)
    elif shape == "ring":
        draw.ellipse(box, outline=color, width=max(4, int(w / 5)))
    elif shape == "halfdisc":
        draw.pieslice([x, y + h * 0.25, x + w, y + h * 1.25], 180, 360, fill=color, outline=outline, width=stroke)
    elif shape == "trapezoid":
        draw.polygon([(x + w * 0.25, y + h * 0.15), (x + w * 0.75, y + h * 0.15), (x + w, y + h * 0.85),
                      (x, y + h * 0.85)], fill=color, outline=outline, width=stroke)
    elif shape == "arrow":
        draw.polygon([(cx, y), (x + w, cy), (x + w * 0.68, cy), (x + w * 0.68, y + h), (x + w * 0.32, y + h),
                      (x + w * 0.32, cy), (x, cy)], fill=color, outline=outline, width=stroke)
    else:
        raise ValueError(f"unknown glyph shape {shape!r}")
    _mark(draw, mark, cx, cy, r, outline)


def _mark(draw: ImageDraw.ImageDraw, mark: str, cx: float, cy: float, r: float, color) -> None:
    """The inner mark that tells apart categories sharing a shape."""
    s = r * 0.35
    width = max(2, int(r / 6))
    if mark == "dot":
        draw.ellipse([cx - s * 0.7, cy - s * 0.7, cx + s * 0.7, cy + s * 0.7], fill=color)
    elif mark == "bar":
        draw.line([(cx - s * 1.3, cy), (cx + s * 1.3, cy)], fill=color, width=width)
    elif mark == "x":
        draw.line([(cx - s, cy - s), (cx + s, cy + s)], fill=color, width=width)
        draw.line([(cx - s, cy + s), (cx + s, cy - s)], fill=color, width=width)
    elif mark == "column":
        draw.line([(cx, cy - s * 1.3), (cx, cy + s * 1.3)], fill=color, width=width)
