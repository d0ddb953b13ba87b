"""Seeded generator of compositional scenes with natural captions: clipforge's default data.

Each sample is a small image of coloured shapes (one kind repeated, or two kinds in a spatial
relation) on a textured background, with a caption drawn from varied templates, e.g.
"two small red triangles", "a blue circle above a green square", "a large yellow star at the
top left on a striped background".

Generalisation is built in: ``HELDOUT_COMBOS`` pairs each shape with one colour, and no training
image ever contains such an object. The evaluation sets (``write_eval_sets`` in
``clipforge.data.shards``) draw half their objects from those combinations, so zero-shot accuracy
measures composition, not memorisation.

Every sample is a pure function of ``(seed, split, index)``, so the output does not depend on
how many processes write it.

``render_layers`` says which object each pixel of ``render``'s image shows: the ground truth of the grounded
scenes in ``clipforge.data.scenes`` (masks, boxes, region captions).

Entry point: ``clipforge prep synthetic --out data/synth`` (see ``clipforge.data.shards``).
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")
PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
    "heart": "hearts",
}
COLORS = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 225),
    "yellow": (240, 215, 30),
    "purple": (140, 50, 190),
    "orange": (245, 135, 20),
}
# Each shape appears in one colour only in evaluation sets, never in training.
HELDOUT_COMBOS = frozenset(
    {
        ("circle", "green"),
        ("square", "orange"),
        ("triangle", "blue"),
        ("star", "red"),
        ("cross", "purple"),
        ("heart", "yellow"),
    }
)
SIZES = ("small", "large")
BACKGROUNDS = ("plain", "noisy", "striped", "gradient")
# 3x3 grid cells (column, row) and the phrases that name them.
POSITIONS = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "center": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}
POSITION_PHRASES = {
    "top left": ["at the top left", "in the top left corner", "in the upper left"],
    "top": ["at the top", "near the top edge", "in the upper middle"],
    "top right": ["at the top right", "in the top right corner", "in the upper right"],
    "left": ["on the left", "at the left side", "on the left side"],
    "center": ["in the center", "in the middle", "at the centre"],
    "right": ["on the right", "at the right side", "on the right side"],
    "bottom left": ["at the bottom left", "in the bottom left corner", "in the lower left"],
    "bottom": ["at the bottom", "near the bottom edge", "in the lower middle"],
    "bottom right": ["at the bottom right", "in the bottom right corner", "in the lower right"],
}
RELATIONS = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}

# Captions that leave colour out: colour alone would let the contrastive task ignore shape.
COLORLESS_CAPTIONS = 0.5
_COLOR_WORDS = re.compile(r"\b(" + "|".join(COLORS) + r") ")

# Each split draws from its own stream; "scenes" is the training scenes' (``--scenes``), the dense sets have theirs.
SPLIT_IDS = {"train": 0, "shapes": 1, "colors": 2, "retrieval": 3, "segmentation": 4, "referring": 5, "scenes": 6}


@dataclass
class SceneObject:
    shape: str
    color: str
    size: str
    center: tuple[float, float]  # fractions of the image side, (x, y)
    radius: float  # fraction of the image side
    rotation: float  # radians


@dataclass
class Scene:
    kind: str  # "group" (one kind of object, 1-3 copies) or "pair" (two kinds in a relation)
    objects: list[SceneObject]
    background: str
    position: str | None = None  # grid cell of a single object, if any
    relation: str | None = None  # relation of objects[0] to objects[-1] for a pair
    extra: dict = field(default_factory=dict)


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator for one sample: independent of sharding and process count."""
    return np.random.default_rng([seed, SPLIT_IDS[split], index])


def _allowed(shape: str, color: str, heldout: str) -> bool:
    """heldout: 'exclude' (training), 'only' (unseen combinations) or 'any'."""
    is_heldout = (shape, color) in HELDOUT_COMBOS
    return {"exclude": not is_heldout, "only": is_heldout, "any": True}[heldout]


def _draw_combo(rng: np.random.Generator, heldout: str, avoid_shape: str | None = None) -> tuple[str, str]:
    while True:
        shape = SHAPES[rng.integers(len(SHAPES))]
        color = list(COLORS)[rng.integers(len(COLORS))]
        if shape != avoid_shape and _allowed(shape, color, heldout):
            return shape, color


def _radius(rng: np.random.Generator, size: str) -> float:
    return float(rng.uniform(0.11, 0.14) if size == "small" else rng.uniform(0.19, 0.24))


def _cell_center(rng: np.random.Generator, position: str, radius: float) -> tuple[float, float]:
    column, row = POSITIONS[position]
    jitter = 0.04
    x = (column * 2 + 1) / 6 + rng.uniform(-jitter, jitter)
    y = (row * 2 + 1) / 6 + rng.uniform(-jitter, jitter)
    return float(np.clip(x, radius, 1 - radius)), float(np.clip(y, radius, 1 - radius))


def _scatter(rng: np.random.Generator, count: int, radius: float) -> list[tuple[float, float]]:
    """count non-overlapping centres (rejection sampling, relaxed if the canvas is crowded)."""
    centers: list[tuple[float, float]] = []
    min_distance = 2.2 * radius
    for _ in range(count):
        for attempt in range(200):
            x, y = rng.uniform(radius, 1 - radius, size=2)
            if all(math.hypot(x - cx, y - cy) >= min_distance * (1 - attempt / 400) for cx, cy in centers):
                break
        centers.append((float(x), float(y)))
    return centers


def sample_scene(rng: np.random.Generator, heldout: str = "exclude", kind: str | None = None) -> Scene:
    """Draw a random scene. ``heldout`` restricts the (shape, colour) combinations used."""
    kind = kind or ("group" if rng.random() < 0.6 else "pair")
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    rotation = float(rng.uniform(-0.25, 0.25))
    if kind == "group":
        shape, color = _draw_combo(rng, heldout)
        count = int(rng.choice([1, 1, 2, 3]))
        size = SIZES[rng.integers(2)] if count == 1 else "small"
        radius = _radius(rng, size)
        if count == 1:
            position = list(POSITIONS)[rng.integers(len(POSITIONS))]
            centers = [_cell_center(rng, position, radius)]
        else:
            position, centers = None, _scatter(rng, count, radius)
        objects = [SceneObject(shape, color, size, c, radius, rotation) for c in centers]
        return Scene("group", objects, background, position=position)
    first = _draw_combo(rng, heldout)
    second = _draw_combo(rng, heldout, avoid_shape=first[0])
    relation = list(RELATIONS)[rng.integers(len(RELATIONS))]
    size = SIZES[rng.integers(2)]
    radius = _radius(rng, size)
    along = sorted(rng.uniform(radius, 1 - radius, size=2))
    if along[1] - along[0] < 2.3 * radius:  # keep the two objects apart along the relation axis
        along = [radius + rng.uniform(0, 0.1), 1 - radius - rng.uniform(0, 0.1)]
    across = rng.uniform(radius, 1 - radius, size=2)
    near, far = along
    if relation in ("above", "below"):
        a, b = ((across[0], near), (across[1], far))
    else:
        a, b = ((near, across[0]), (far, across[1]))
    if relation in ("below", "right of"):
        a, b = b, a
    objects = [
        SceneObject(first[0], first[1], size, (float(a[0]), float(a[1])), radius, rotation),
        SceneObject(second[0], second[1], size, (float(b[0]), float(b[1])), radius, rotation),
    ]
    return Scene("pair", objects, background, relation=relation)


# ---------------------------------------------------------------------------------------------
# Captions


def _noun(shape: str, count: int) -> str:
    return shape if count == 1 else PLURALS[shape]


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """One natural caption for the scene, from a template chosen by ``rng``."""
    if scene.kind == "pair":
        first, second = scene.objects
        relation = scene.relation
        if rng.random() < 0.5:
            first, second, relation = second, first, RELATIONS[relation]
        templates = [
            "a {c1} {s1} {rel} a {c2} {s2}",
            "a {c1} {s1} is {rel} a {c2} {s2}",
            "a picture of a {c1} {s1} {rel} a {c2} {s2}",
            "{c1} {s1} {rel} {c2} {s2}",
            "a {z} {c1} {s1} {rel} a {z} {c2} {s2}",
            "there is a {c1} {s1} {rel} a {c2} {s2}{bg}",
            "a {s1} {rel} a {s2}",
            "a {z} {s1} {rel} a {s2}{bg}",
        ]
        words = dict(c1=first.color, s1=first.shape, c2=second.color, s2=second.shape, rel=relation, z=first.size)
    else:
        obj = scene.objects[0]
        count = len(scene.objects)
        position = ""
        if scene.position is not None:
            phrases = POSITION_PHRASES[scene.position]
            position = " " + phrases[rng.integers(len(phrases))]
        templates = [
            "{n} {z} {c} {s}{pos}",
            "{n} {c} {s}{pos}",
            "a photo of {n} {z} {c} {s}{pos}",
            "{n} {c} {s}{pos}{bg}",
            "an image showing {n} {z} {c} {s}{pos}",
            "there {verb} {n} {c} {s}{pos}",
            "{z} {c} {s}{pos}",
            "{n} {s}{pos}",
            "a drawing of {n} {z} {s}{pos}{bg}",
        ]
        words = dict(
            n="a" if count == 1 else NUMBER_WORDS[count],
            z=obj.size,
            c=obj.color,
            s=_noun(obj.shape, count),
            pos=position,
            verb="is" if count == 1 else "are",
        )
    background = "" if scene.background == "plain" and rng.random() < 0.5 else f" on a {scene.background} background"
    words["bg"] = background if rng.random() < 0.5 else ""
    template = templates[rng.integers(len(templates))]
    text = template.format(**words)
    if rng.random() < COLORLESS_CAPTIONS:
        text = _COLOR_WORDS.sub("", text)
    text = re.sub(r"\ban ([^aeiou])", r"a \1", text)
    return re.sub(r"\ba ([aeiou])", r"an \1", text)


# ---------------------------------------------------------------------------------------------
# Rendering


def _shape_polygon(shape: str, cx: float, cy: float, r: float, rotation: float) -> list[tuple[float, float]]:
    if shape == "square":
        points = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif shape == "triangle":
        points = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        points = [(x, y + 0.15) for x, y in points]
    elif shape == "star":
        points = [
            (
                (1.0 if i % 2 == 0 else 0.42) * math.cos(-math.pi / 2 + i * math.pi / 5),
                (1.0 if i % 2 == 0 else 0.42) * math.sin(-math.pi / 2 + i * math.pi / 5),
            )
            for i in range(10)
        ]
    elif shape == "cross":
        w = 0.32
        points = [
            (-w, -1),
            (w, -1),
            (w, -w),
            (1, -w),
            (1, w),
            (w, w),
            (w, 1),
            (-w, 1),
            (-w, w),
            (-1, w),
            (-1, -w),
            (-w, -w),
        ]
    elif shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        xs = 16 * np.sin(ts) ** 3 / 17
        ys = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts)) / 17
        points = list(zip(xs.tolist(), (ys + 0.1).tolist()))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    cos, sin = math.cos(rotation), math.sin(rotation)
    return [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in points]


def _background(rng: np.random.Generator, kind: str, side: int) -> np.ndarray:
    base = rng.uniform(70, 170, size=3) * 0.5 + rng.uniform(70, 170) * 0.5  # muted, low saturation
    image = np.broadcast_to(base, (side, side, 3)).astype(np.float32).copy()
    if kind == "noisy":
        image += rng.normal(0, 22, size=(side, side, 3)).astype(np.float32)
    elif kind == "striped":
        period = rng.uniform(6, 16) * side / 128
        angle = rng.uniform(0, math.pi)
        yy, xx = np.mgrid[0:side, 0:side]
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) / period
        image += (25 * np.sign(np.sin(phase)))[..., None]
    elif kind == "gradient":
        other = rng.uniform(60, 180, size=3) * 0.5 + rng.uniform(60, 180) * 0.5
        ramp = np.linspace(0, 1, side, dtype=np.float32)
        ramp = ramp[:, None] if rng.random() < 0.5 else ramp[None, :]
        image = image * (1 - ramp[..., None]) + other * ramp[..., None]
    return np.clip(image, 0, 255).astype(np.uint8)


def render(scene: Scene, rng: np.random.Generator, side: int = 64, supersample: int = 2) -> Image.Image:
    """Render the scene at ``side`` pixels (drawn at ``supersample``× and downscaled for antialiasing)."""
    big = side * supersample
    image = Image.fromarray(_background(rng, scene.background, big))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        jitter = rng.integers(-12, 13, size=3)
        _draw_object(draw, obj, big, tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[obj.color], jitter)))
    return image.resize((side, side), Image.Resampling.BOX)


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, big: int, fill: tuple[int, ...] | int) -> None:
    """The one drawing of an object's outline, for the image and for its mask alike (``big``: the canvas side)."""
    cx, cy, r = obj.center[0] * big, obj.center[1] * big, obj.radius * big
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_shape_polygon(obj.shape, cx, cy, r, obj.rotation), fill=fill)


def render_layers(scene: Scene, side: int = 64, supersample: int = 2) -> np.ndarray:
    """Which object each pixel of ``render``'s image shows: (side, side) uint8, 0 = background, i + 1 =
    ``scene.objects[i]``. The objects are drawn as ``render`` draws them (same outlines, same supersampling, later
    ones over earlier ones), and each pixel takes the layer covering most of its ``supersample``² subpixels, a tie
    going to the one drawn later, so the mask follows the antialiased image's edges. Needs no generator: the
    geometry is all in ``scene``."""
    if len(scene.objects) > 255:
        raise ValueError(f"at most 255 objects in a uint8 mask, got {len(scene.objects)}")
    big = side * supersample
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    for layer, obj in enumerate(scene.objects, start=1):
        _draw_object(draw, obj, big, layer)
    blocks = np.asarray(canvas).reshape(side, supersample, side, supersample)
    best = np.zeros((side, side), dtype=np.uint8)
    best_count = (blocks == 0).sum(axis=(1, 3))
    for layer in range(1, len(scene.objects) + 1):
        count = (blocks == layer).sum(axis=(1, 3))
        wins = (count >= best_count) & (count > 0)  # ">=": a tie goes to the layer drawn later
        best[wins] = layer
        best_count = np.where(wins, count, best_count)
    return best


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def describe(scene: Scene) -> dict:
    """JSON-serialisable metadata for the scene (stored as KEY.json beside the caption)."""
    return {
        "kind": scene.kind,
        "background": scene.background,
        "position": scene.position,
        "relation": scene.relation,
        "objects": [
            {
                "shape": o.shape,
                "color": o.color,
                "size": o.size,
                "center": [round(o.center[0], 4), round(o.center[1], 4)],
            }
            for o in scene.objects
        ],
    }
