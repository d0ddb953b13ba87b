"""Grounded scenes: 2–4 objects of known shape, colour, size and place, with where each one is in the image.

A grounded sample is the image and, for each object it shows, its box (the tight extent of its visible pixels,
xyxy, x1/y1 exclusive), its name ("red circle") and a region caption that picks it out among the others ("the red
circle at the top left", "the star left of the blue square"), plus a class mask (0 = background, 1 + the shape's
index in ``synthetic.SHAPES``). The mask is drawn from the same outlines as the image (``synthetic.render_layers``),
so its edges follow the antialiased image's.

A region caption is built from the words of the scene captions (colours, shapes, ``synthetic.POSITION_PHRASES``,
``synthetic.RELATIONS``) and is checked against the other objects: a place or relation counts as true of the object
meant only when it clearly holds (its centre well inside the grid cell, or clearly on that side of the other
object), and as true of any other object as soon as it roughly does, so a caption said to be unique cannot be read
as another object. An object that no such caption picks out gets "a red circle" and ``unique`` false; the referring
set keeps only unique ones.

``clipforge.data.shards`` writes them: training shards with ``--scenes`` (``KEY.regions.json``, ``KEY.mask.png``)
and the held-out dense sets (``OUT/eval/segmentation``, ``OUT/eval/referring``). Every sample is a pure function of
``(seed, split, index)``, as the other synthetic samples are.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from clipforge.data import synthetic
from clipforge.data.synthetic import COLORS, SHAPES, Scene, SceneObject

CLASSNAMES = ("background", *SHAPES)  # the class mask's values, in order
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
SECOND_OF_A_SHAPE = (
    0.3  # chance an object repeats an earlier one's shape: then colour, place or relation tell them apart
)
# A place or relation holds of the object meant when its centre is this far (a share of the image side) inside the
# grid cell, or this far on that side of the other object, and is taken to hold of any other object this far outside.
MARGIN = 0.04
RELATION_GAP = 0.1


@dataclass
class Region:
    """One object as the image shows it."""

    index: int  # in scene.objects (draw order)
    box: list[int]  # x0, y0, x1, y1 in pixels; x1, y1 exclusive
    name: str  # "red circle"
    caption: str  # "the red circle at the top left"; "a red circle" when nothing picks it out
    unique: bool  # whether the caption picks this object out among the image's others


def sample_grounded_scene(rng: np.random.Generator, heldout_share: float = 0.0) -> Scene:
    """2–4 objects apart from each other, at most one large; each object is a held-out (shape, colour) pair with
    probability ``heldout_share`` (training: 0, never one), otherwise one training shows."""
    count = int(rng.integers(2, 5))
    background = synthetic.BACKGROUNDS[rng.integers(len(synthetic.BACKGROUNDS))]
    large = int(rng.integers(count)) if rng.random() < 0.5 else -1
    objects: list[SceneObject] = []
    for i in range(count):
        heldout = "only" if rng.random() < heldout_share else "exclude"
        if objects and rng.random() < SECOND_OF_A_SHAPE:
            shape = objects[rng.integers(len(objects))].shape
        else:
            shape = SHAPES[rng.integers(len(SHAPES))]
        colors = [color for color in COLORS if synthetic._allowed(shape, color, heldout)]
        color = colors[rng.integers(len(colors))]
        size = "large" if i == large else "small"
        radius = synthetic._radius(rng, size)
        center = _place(rng, radius, objects)
        rotation = float(rng.uniform(-0.25, 0.25))
        if center is not None:
            objects.append(SceneObject(shape, color, size, center, radius, rotation))
    return Scene("scene", objects, background)


def _place(rng: np.random.Generator, radius: float, objects: list[SceneObject]) -> tuple[float, float] | None:
    """A centre clear of ``objects`` (outlines reach 1.1 radii at most), or None; the second object always gets one
    (the farthest tried, should none be clear), so a scene has at least two."""
    best, best_room = None, -math.inf
    for _ in range(200):
        x, y = (float(v) for v in rng.uniform(radius, 1 - radius, size=2))
        room = min(
            (math.hypot(x - o.center[0], y - o.center[1]) - 1.1 * (radius + o.radius) - 0.02 for o in objects),
            default=0.0,
        )
        if room >= 0:
            return x, y
        if room > best_room:
            best, best_room = (x, y), room
    return best if len(objects) < 2 else None


def scene_caption(scene: Scene, rng: np.random.Generator) -> str:
    """One caption naming every object of a grounded scene: "a red circle left of a blue square and two stars"."""
    order = [scene.objects[i] for i in rng.permutation(len(scene.objects))]
    sized = rng.random() < 0.3
    colorless = rng.random() < synthetic.COLORLESS_CAPTIONS  # as in the scene captions: shape must matter
    groups: dict[tuple[str, str], list[SceneObject]] = {}
    for obj in order:
        groups.setdefault(("" if colorless else obj.color + " ", obj.shape), []).append(obj)
    items = []
    for (color, shape), members in groups.items():
        if len(members) == 1:
            items.append(f"a {members[0].size + ' ' if sized else ''}{color}{shape}")
        else:
            items.append(f"{COUNT_WORDS.get(len(members), str(len(members)))} {color}{synthetic.PLURALS[shape]}")
    firsts = list(groups.values())[:2]
    if len(firsts) == 2 and len(firsts[0]) == len(firsts[1]) == 1 and rng.random() < 0.5:
        relation = next((r for r in synthetic.RELATIONS if _clearly(firsts[0][0], firsts[1][0], r)), None)
        if relation is not None:
            items[:2] = [f"{items[0]} {relation} {items[1]}"]
    body = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    templates = ["{b}", "a photo of {b}", "an image showing {b}", "{n} shapes: {b}", "a drawing of {b}{bg}", "{b}{bg}"]
    background = f" on a {scene.background} background" if rng.random() < 0.5 else ""
    number = COUNT_WORDS.get(len(scene.objects), str(len(scene.objects)))
    text = templates[rng.integers(len(templates))].format(b=body, n=number, bg=background)
    return re.sub(r"\ba ([aeiou])", r"an \1", text)


# ---------------------------------------------------------------------------------------------
# Where each object is, and what picks it out


def _clearly(obj: SceneObject, other: SceneObject, relation: str) -> bool:
    """``obj`` is clearly ``relation`` ``other``: that way by a gap, and more that way than across."""
    dx, dy = other.center[0] - obj.center[0], other.center[1] - obj.center[1]  # y grows downwards
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along > RELATION_GAP and along > 1.5 * abs(across)


def _roughly(obj: SceneObject, other: SceneObject, relation: str) -> bool:
    """``obj`` might be read as ``relation`` ``other``: its centre is on that side at all."""
    dx, dy = other.center[0] - obj.center[0], other.center[1] - obj.center[1]
    return {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[relation] > 0


def _cell(obj: SceneObject) -> str | None:
    """The grid cell (a ``synthetic.POSITIONS`` name) whose inside, ``MARGIN`` from its inner edges, holds the
    object's centre; None near a cell edge."""
    column, row = (_third(v) for v in obj.center)
    if column is None or row is None:
        return None
    return next(name for name, place in synthetic.POSITIONS.items() if place == (column, row))


def _third(value: float) -> int | None:
    for index, (low, high) in enumerate(((-1, 1 / 3 - MARGIN), (1 / 3 + MARGIN, 2 / 3 - MARGIN), (2 / 3 + MARGIN, 2))):
        if low <= value <= high:
            return index
    return None


def _maybe_at(obj: SceneObject, position: str) -> bool:
    """The object might be read as at ``position``: within ``MARGIN`` of the cell, where a side's middle cell ("top",
    "left") stands for that whole side and a corner or the centre for itself alone."""
    column, row = synthetic.POSITIONS[position]
    spans = [(column, obj.center[0]), (row, obj.center[1])]
    if (column == 1) != (row == 1):  # a side's middle: only the side's own axis counts
        spans = [span for span in spans if span[0] != 1]
    return all(index / 3 - MARGIN <= value <= (index + 1) / 3 + MARGIN for index, value in spans)


def _matches(obj: SceneObject, noun: tuple[str | None, str]) -> bool:
    color, shape = noun
    return obj.shape == shape and color in (None, obj.color)


def _phrase(noun: tuple[str | None, str]) -> str:
    return f"the {noun[1]}" if noun[0] is None else f"the {noun[0]} {noun[1]}"


def unique_captions(objects: list[SceneObject], target: int) -> dict[str, list[str]]:
    """Every caption that picks out ``objects[target]`` among ``objects``, by kind: "name" ("the star", "the red
    star"), "position" ("the red star at the top left") and "relation" ("the star left of the blue square")."""
    obj = objects[target]
    others = [o for i, o in enumerate(objects) if i != target]
    nouns: list[tuple[str | None, str]] = [(None, obj.shape), (obj.color, obj.shape)]
    found: dict[str, list[str]] = {"name": [], "position": [], "relation": []}
    cell = _cell(obj)
    for noun in nouns:
        alike = [o for o in others if _matches(o, noun)]
        if not alike:
            found["name"].append(_phrase(noun))
        if cell is not None and not any(_maybe_at(o, cell) for o in alike):
            found["position"] += [f"{_phrase(noun)} {phrase}" for phrase in synthetic.POSITION_PHRASES[cell]]
        for reference in others:
            anchors = [(None, reference.shape), (reference.color, reference.shape)]
            anchors = [n for n in anchors if sum(_matches(o, n) for o in objects) == 1]
            for relation in synthetic.RELATIONS if anchors else ():
                if not _clearly(obj, reference, relation):
                    continue
                if any(_roughly(o, reference, relation) for o in alike if o is not reference):
                    continue
                found["relation"] += [f"{_phrase(noun)} {relation} {_phrase(anchor)}" for anchor in anchors]
    return found


def regions(scene: Scene, layers: np.ndarray, rng: np.random.Generator) -> list[Region]:
    """The objects ``layers`` (``synthetic.render_layers``) shows, in draw order, with one caption each: a kind of
    caption that picks the object out, then one of that kind, both at random."""
    present = [i for i in range(len(scene.objects)) if (layers == i + 1).any()]
    visible = [scene.objects[i] for i in present]
    result = []
    for position, index in enumerate(present):
        obj = scene.objects[index]
        ys, xs = np.nonzero(layers == index + 1)
        box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        kinds = [options for options in unique_captions(visible, position).values() if options]
        if kinds:
            options = kinds[rng.integers(len(kinds))]
            text = options[rng.integers(len(options))]
        else:
            text = f"a {obj.color} {obj.shape}"
        text = re.sub(r"\ba ([aeiou])", r"an \1", text)
        result.append(Region(index, box, f"{obj.color} {obj.shape}", text, bool(kinds)))
    return result


def class_mask(scene: Scene, layers: np.ndarray) -> np.ndarray:
    """``layers`` as classes: 0 background, 1 + the shape's index in ``SHAPES`` (``CLASSNAMES``)."""
    lookup = np.zeros(256, dtype=np.uint8)
    for layer, obj in enumerate(scene.objects, start=1):
        lookup[layer] = CLASSNAMES.index(obj.shape)
    return lookup[layers]


def regions_json(found: list[Region]) -> dict:
    """The ``KEY.regions.json`` record of a training sample."""
    return {
        "boxes": [r.box for r in found],
        "names": [r.name for r in found],
        "captions": [r.caption for r in found],
    }


def encode_png(mask: np.ndarray) -> bytes:
    """An 8-bit single-channel PNG (mode L) of ``mask``."""
    buffer = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Grounded:
    scene: Scene
    image: Image.Image
    mask: np.ndarray  # classes, (side, side) uint8
    regions: list[Region]


def ground(scene: Scene, image: Image.Image, rng: np.random.Generator, supersample: int = 2) -> Grounded:
    """The mask and regions of a scene ``synthetic.render`` drew as ``image`` (the same ``supersample``)."""
    layers = synthetic.render_layers(scene, image.width, supersample)
    return Grounded(scene, image, class_mask(scene, layers), regions(scene, layers, rng))


def grounded_sample(seed: int, split: str, index: int, side: int, heldout_share: float) -> Grounded:
    """A held-out dense set's sample: a grounded scene drawn from ``(seed, split, index)``."""
    rng = synthetic.sample_rng(seed, split, index)
    scene = sample_grounded_scene(rng, heldout_share)
    return ground(scene, synthetic.render(scene, rng, side), rng)
