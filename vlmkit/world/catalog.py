"""The world's vocabulary: COCO categories drawn as glyphs, and scene types with their co-occurrence priors.

Every object category is a real COCO category (name and id), so CHAIR's synonym tables and POPE's question
builders work on world data unchanged. A category's glyph is a distinct (shape, inner mark) pair; its colour varies
per instance within the category's palette, so colour is an attribute and shape is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 210), "yellow": (235, 205, 40),
    "white": (245, 245, 245), "black": (25, 25, 25), "brown": (130, 80, 40), "orange": (240, 140, 30),
    "pink": (240, 130, 180), "purple": (130, 50, 170), "gray": (128, 128, 128),
}

SHAPES = ("circle", "square", "triangle", "diamond", "pentagon", "hexagon", "star", "cross", "ring", "halfdisc",
          "trapezoid", "arrow")
MARKS = ("plain", "dot", "bar", "x", "column")


@dataclass(frozen=True)
class Category:
    id: int  # COCO category id
    name: str  # COCO category name
    supercategory: str
    words: tuple[str, ...]  # caption words, each a CHAIR synonym of ``name``; the first is the default
    plural: str
    palette: tuple[str, ...]
    shape: str = ""
    mark: str = ""


_CATEGORIES = [
    # id, name, supercategory, caption words, plural, palette
    (1, "person", "person", ("person", "man", "woman"), "people", ("red", "blue", "green", "orange")),
    (2, "bicycle", "vehicle", ("bicycle", "bike"), "bicycles", ("red", "blue", "black")),
    (3, "car", "vehicle", ("car",), "cars", ("red", "blue", "white", "black")),
    (4, "motorcycle", "vehicle", ("motorcycle",), "motorcycles", ("black", "red")),
    (6, "bus", "vehicle", ("bus",), "buses", ("yellow", "red", "blue")),
    (8, "truck", "vehicle", ("truck",), "trucks", ("white", "gray", "orange")),
    (9, "boat", "vehicle", ("boat",), "boats", ("white", "red", "brown")),
    (10, "traffic light", "outdoor", ("traffic light",), "traffic lights", ("black", "yellow")),
    (11, "fire hydrant", "outdoor", ("fire hydrant", "hydrant"), "fire hydrants", ("red", "yellow")),
    (13, "stop sign", "outdoor", ("stop sign",), "stop signs", ("red",)),
    (15, "bench", "outdoor", ("bench",), "benches", ("brown", "green", "gray")),
    (16, "bird", "animal", ("bird",), "birds", ("blue", "yellow", "black", "white")),
    (17, "cat", "animal", ("cat", "kitten"), "cats", ("orange", "black", "gray", "white")),
    (18, "dog", "animal", ("dog", "puppy"), "dogs", ("brown", "black", "white")),
    (19, "horse", "animal", ("horse",), "horses", ("brown", "black", "white")),
    (20, "sheep", "animal", ("sheep",), "sheep", ("white", "gray")),
    (21, "cow", "animal", ("cow",), "cows", ("black", "brown", "white")),
    (28, "umbrella", "accessory", ("umbrella",), "umbrellas", ("red", "blue", "yellow", "pink")),
    (34, "frisbee", "sports", ("frisbee",), "frisbees", ("red", "orange", "yellow")),
    (37, "sports ball", "sports", ("ball",), "balls", ("white", "orange", "red")),
    (38, "kite", "sports", ("kite",), "kites", ("red", "yellow", "purple", "green")),
    (42, "surfboard", "sports", ("surfboard",), "surfboards", ("white", "blue", "yellow")),
    (44, "bottle", "kitchen", ("bottle",), "bottles", ("green", "brown", "blue")),
    (46, "wine glass", "kitchen", ("wine glass",), "wine glasses", ("white", "purple")),
    (47, "cup", "kitchen", ("cup",), "cups", ("white", "red", "blue", "yellow")),
    (48, "fork", "kitchen", ("fork",), "forks", ("gray", "white", "black")),
    (49, "knife", "kitchen", ("knife",), "knives", ("gray", "black")),
    (50, "spoon", "kitchen", ("spoon",), "spoons", ("gray", "white")),
    (51, "bowl", "kitchen", ("bowl",), "bowls", ("white", "blue", "red")),
    (52, "banana", "food", ("banana",), "bananas", ("yellow",)),
    (53, "apple", "food", ("apple",), "apples", ("red", "green")),
    (55, "orange", "food", ("orange",), "oranges", ("orange",)),
    (59, "pizza", "food", ("pizza",), "pizzas", ("orange", "yellow")),
    (61, "cake", "food", ("cake",), "cakes", ("pink", "brown", "white")),
    (62, "chair", "furniture", ("chair",), "chairs", ("brown", "black", "white")),
    (63, "couch", "furniture", ("couch", "sofa"), "couches", ("blue", "gray", "brown", "green")),
    (64, "potted plant", "furniture", ("potted plant", "houseplant"), "potted plants", ("green",)),
    (65, "bed", "furniture", ("bed",), "beds", ("white", "blue", "pink")),
    (67, "dining table", "furniture", ("table",), "tables", ("brown", "white")),
    (72, "tv", "electronic", ("tv", "television"), "tvs", ("black", "gray")),
    (73, "laptop", "electronic", ("laptop",), "laptops", ("gray", "black", "white")),
    (74, "mouse", "electronic", ("mouse",), "mice", ("black", "white", "gray")),
    (76, "keyboard", "electronic", ("keyboard",), "keyboards", ("black", "white")),
    (77, "cell phone", "electronic", ("cell phone", "phone"), "phones", ("black", "white", "pink")),
    (78, "microwave", "appliance", ("microwave",), "microwaves", ("white", "black", "gray")),
    (82, "refrigerator", "appliance", ("refrigerator", "fridge"), "refrigerators", ("white", "gray")),
    (84, "book", "indoor", ("book",), "books", ("red", "blue", "green", "yellow")),
    (85, "clock", "indoor", ("clock",), "clocks", ("white", "black")),
    (86, "vase", "indoor", ("vase",), "vases", ("blue", "white", "purple")),
    (88, "teddy bear", "indoor", ("teddy bear",), "teddy bears", ("brown", "pink", "white")),
]

CATEGORIES: dict[str, Category] = {
    name: Category(cid, name, superc, words, plural, palette, SHAPES[i % len(SHAPES)], MARKS[i // len(SHAPES)])
    for i, (cid, name, superc, words, plural, palette) in enumerate(_CATEGORIES)
}


@dataclass(frozen=True)
class SceneType:
    name: str
    phrase: str  # "a kitchen", used in captions
    floor: str  # background colours (RGB hex)
    wall: str
    horizon: float  # fraction of the height where the floor starts
    objects: dict[str, float]  # category -> probability of appearing
    pairs: tuple[tuple[str, str, float], ...] = ()  # (a, b, p): if a is present, b is added with probability p


SCENES: dict[str, SceneType] = {
    s.name: s
    for s in [
        SceneType("kitchen", "a kitchen", "#d8c8a8", "#efe6d2", 0.45,
                  {"dining table": 0.7, "fork": 0.45, "knife": 0.35, "spoon": 0.3, "cup": 0.45, "bowl": 0.4,
                   "bottle": 0.35, "wine glass": 0.2, "microwave": 0.3, "refrigerator": 0.3, "banana": 0.25,
                   "apple": 0.25, "orange": 0.2, "pizza": 0.15, "cake": 0.15, "chair": 0.3},
                  (("fork", "knife", 0.85), ("knife", "fork", 0.8), ("pizza", "dining table", 0.9),
                   ("cake", "fork", 0.6), ("wine glass", "bottle", 0.7), ("bowl", "spoon", 0.6))),
        SceneType("street", "a street", "#8c8c8c", "#b4d2ec", 0.4,
                  {"car": 0.75, "bus": 0.3, "truck": 0.3, "traffic light": 0.45, "stop sign": 0.3,
                   "fire hydrant": 0.3, "bicycle": 0.25, "motorcycle": 0.2, "person": 0.55, "bench": 0.15},
                  (("traffic light", "car", 0.9), ("bicycle", "person", 0.7), ("motorcycle", "person", 0.7),
                   ("stop sign", "car", 0.8))),
        SceneType("living room", "a living room", "#a07850", "#e8dcc8", 0.5,
                  {"couch": 0.7, "tv": 0.55, "potted plant": 0.4, "book": 0.35, "clock": 0.3, "vase": 0.3,
                   "chair": 0.35, "cat": 0.25, "dog": 0.2, "laptop": 0.15, "cup": 0.2},
                  (("tv", "couch", 0.85), ("vase", "potted plant", 0.5), ("cat", "couch", 0.6))),
        SceneType("park", "a park", "#6cb45a", "#a8d4f0", 0.35,
                  {"bench": 0.55, "dog": 0.45, "person": 0.6, "frisbee": 0.3, "kite": 0.3, "bird": 0.4,
                   "bicycle": 0.2, "sports ball": 0.3, "umbrella": 0.15},
                  (("frisbee", "dog", 0.8), ("kite", "person", 0.8), ("sports ball", "person", 0.6))),
        SceneType("bedroom", "a bedroom", "#c8b4c8", "#f0e6f0", 0.5,
                  {"bed": 0.8, "teddy bear": 0.4, "book": 0.4, "clock": 0.35, "laptop": 0.25, "cell phone": 0.3,
                   "potted plant": 0.2, "cat": 0.2, "chair": 0.2},
                  (("teddy bear", "bed", 0.9), ("cell phone", "laptop", 0.4))),
        SceneType("beach", "a beach", "#e8d49c", "#78b8e8", 0.5,
                  {"surfboard": 0.5, "umbrella": 0.55, "boat": 0.45, "person": 0.6, "bird": 0.35, "kite": 0.25,
                   "sports ball": 0.2, "dog": 0.15},
                  (("surfboard", "person", 0.85), ("umbrella", "person", 0.5))),
        SceneType("study", "a study", "#9ca0a8", "#dce0e6", 0.5,
                  {"laptop": 0.65, "keyboard": 0.5, "mouse": 0.45, "cell phone": 0.35, "book": 0.5,
                   "chair": 0.45, "cup": 0.35, "clock": 0.25, "dining table": 0.4, "potted plant": 0.2},
                  (("keyboard", "mouse", 0.85), ("mouse", "laptop", 0.6), ("laptop", "dining table", 0.5))),
        SceneType("farm", "a farm", "#8cbc5c", "#b8dcf4", 0.4,
                  {"horse": 0.5, "cow": 0.55, "sheep": 0.5, "dog": 0.35, "bird": 0.35, "person": 0.35,
                   "truck": 0.2, "bicycle": 0.1},
                  (("sheep", "dog", 0.5), ("horse", "person", 0.4))),
    ]
}
