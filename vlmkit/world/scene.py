"""Scenes: which objects an image holds, where, how large and in what colour. Seeded and deterministic."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from vlmkit.world.catalog import CATEGORIES, SCENES

IMAGE_SIZE = 336
SIZES = {"small": (26, 44), "medium": (48, 80), "large": (84, 128)}  # glyph side in pixels
#: probability that a scene also holds one object from outside its scene type
STRAY_PROBABILITY = 0.25
MAX_OVERLAP = 0.35  # a new object may cover at most this fraction of an earlier one (occlusion)
REGIONS = tuple(
    f"at the {row} {col}" if row and col else f"{'on' if col else 'at'} the {row or col}" if row or col else "in the center"
    for row in ("top", "", "bottom") for col in ("left", "", "right")
)


@dataclass
class WorldObject:
    category: str
    color: str
    size: str
    bbox: tuple[int, int, int, int]  # x, y, w, h in pixels

    @property
    def center(self) -> tuple[float, float]:
        x, y, w, h = self.bbox
        return x + w / 2, y + h / 2

    @property
    def region(self) -> str:
        """Where the object sits, as caption words: "on the left", "at the top right", "in the center"."""
        cx, cy = self.center
        return REGIONS[3 * min(2, int(3 * cy / IMAGE_SIZE)) + min(2, int(3 * cx / IMAGE_SIZE))]


@dataclass
class Scene:
    image_id: int
    scene_type: str
    objects: list[WorldObject] = field(default_factory=list)
    clutter_seed: int = 0

    @property
    def categories(self) -> list[str]:
        """Distinct categories present, in order of first appearance."""
        return list(dict.fromkeys(o.category for o in self.objects))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        objects = [WorldObject(**{**o, "bbox": tuple(o["bbox"])}) for o in data["objects"]]
        return cls(data["image_id"], data["scene_type"], objects, data.get("clutter_seed", 0))


def sample_scene(image_id: int, seed: int) -> Scene:
    """The scene of ``image_id`` in the world of ``seed`` (independent of every other image)."""
    rng = np.random.default_rng([seed, image_id])
    scene_type = SCENES[list(SCENES)[rng.integers(len(SCENES))]]
    present = [name for name, p in scene_type.objects.items() if rng.random() < p]
    for first, second, p in scene_type.pairs:
        if first in present and second not in present and rng.random() < p:
            present.append(second)
    if rng.random() < STRAY_PROBABILITY:
        strays = [name for name in CATEGORIES if name not in scene_type.objects]
        present.append(strays[rng.integers(len(strays))])
    if not present:
        names = list(scene_type.objects)
        present.append(names[rng.integers(len(names))])
    rng.shuffle(present)
    present = present[:7]
    scene = Scene(image_id, scene_type.name, clutter_seed=int(rng.integers(2**31)))
    taken: list[tuple[int, int, int, int]] = []
    for name in present:
        count = 1 + (rng.random() < 0.25) + (rng.random() < 0.1) if name in _COUNTABLE else 1
        for _ in range(count):
            placed = _place(rng, taken)
            if placed is None:
                continue
            bbox, size = placed
            category = CATEGORIES[name]
            color = category.palette[rng.integers(len(category.palette))]
            scene.objects.append(WorldObject(name, color, size, bbox))
            taken.append(bbox)
    return scene


_COUNTABLE = {"person", "bird", "apple", "orange", "banana", "car", "book", "cup", "sheep", "cow", "dog", "chair"}


def _place(rng: np.random.Generator, taken: list[tuple[int, int, int, int]]):
    for _ in range(30):
        size = ("small", "medium", "large")[rng.choice(3, p=[0.35, 0.45, 0.2])]
        low, high = SIZES[size]
        side = int(rng.integers(low, high + 1))
        x = int(rng.integers(4, IMAGE_SIZE - side - 4))
        y = int(rng.integers(4, IMAGE_SIZE - side - 4))
        bbox = (x, y, side, side)
        if all(_overlap(bbox, other) <= MAX_OVERLAP for other in taken):
            return bbox, size
    return None


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection area as a fraction of the smaller box."""
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    return width * height / min(a[2] * a[3], b[2] * b[3])
