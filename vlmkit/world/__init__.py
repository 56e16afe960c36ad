"""The built-in synthetic world: seeded scenes of COCO objects drawn as glyphs, with exact ground truth."""

from vlmkit.world.captions import describe
from vlmkit.world.catalog import CATEGORIES, SCENES
from vlmkit.world.dataset import build, scenes
from vlmkit.world.render import render
from vlmkit.world.scene import Scene, WorldObject, sample_scene

__all__ = ["CATEGORIES", "SCENES", "Scene", "WorldObject", "build", "describe", "render", "sample_scene", "scenes"]
