"""Dense evaluation: the readers of both layouts, the resizing rule, segmentation (probe and zero-shot) and
referring expressions, each checked against a hand computation, oracle and random features, and the tiny ViT and
CLIP-ResNet end to end.

The fixtures are written here: 64-px PNG scenes of vertical or horizontal stripes, each stripe one class, on a
16-px grid, so after the 32-px crop every ViT patch (8 px) holds one class.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Resize, ToTensor

from clipforge.evaluation.dense import DenseFeatures, attention_pool_all, check_dense, encode_dense
from clipforge.evaluation.dense_datasets import (
    IGNORE,
    REFERRING,
    SEGMENTATION,
    CropGeometry,
    dense_kind,
    load_referring_set,
    load_segmentation_set,
    segmentation_batches,
)
from clipforge.evaluation.encoder import HFClipEncoder, OpenClipEncoder
from clipforge.evaluation.referring import box_features, box_iou, referring_expressions
from clipforge.evaluation.segmentation import (
    linear_probe_segmentation,
    patch_labels,
    score_patches,
    segmentation_metrics,
    upsample_scores,
    zero_shot_segmentation,
)

CLASSNAMES = ["background", "circle", "square"]
COLOURS = [(200, 200, 200), (220, 30, 30), (30, 30, 220)]
TEMPLATES = ["a photo of a {c}.", "a {c} shape."]
CROP = 32


def eval_transform(size: int = CROP, interpolation=InterpolationMode.BICUBIC) -> Compose:
    """open_clip's eval geometry without its normalisation, so a fake encoder can read the colours."""
    return Compose([Resize(size, interpolation=interpolation), CenterCrop(size), ToTensor()])


# --- fixtures written in the layouts ------------------------------------------------------------------------------


def stripe_mask(classes: np.ndarray, vertical: bool, size: int = 64) -> np.ndarray:
    """Stripes of a class each, one grid cell wide, all vertical or all horizontal: along one axis nothing changes,
    so bilinear upsampling of class-symmetric patch scores gives every pixel its own patch's class (its patch's
    weight is over 0.5)."""
    mask = np.repeat(classes, size // len(classes))[None, :].repeat(size, axis=0)  # a class per column band
    return mask if vertical else mask.T.copy()


def write_segmentation_set(
    root, sizes: dict[str, int], seed: int = 0, ignore_bands: bool = False, balanced: bool = False
):
    """64-px stripe scenes, 4 stripes each; ``balanced``: stripe s of image i is class (i + s) mod 3, so every 3
    images hold each class 4 times; ``ignore_bands``: every third image's first stripe is ignore (255)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    palette = np.array([*COLOURS, *[(0, 0, 0)] * (256 - len(COLOURS))], dtype=np.uint8)
    for split, count in sizes.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for index in range(count):
            if balanced:
                classes = (index + np.arange(4)) % len(CLASSNAMES)
            else:
                classes = rng.integers(0, len(CLASSNAMES), size=4)
            if ignore_bands and index % 3 == 0:
                classes[0] = 255
            mask = stripe_mask(classes, vertical=bool(rng.random() < 0.5))
            Image.fromarray(palette[mask]).save(root / "images" / split / f"{index:04d}.png")
            Image.fromarray(mask.astype(np.uint8), mode="L").save(root / "annotations" / split / f"{index:04d}.png")
    return root


OBJECT_COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 180, 30)}
BACKGROUND = (200, 200, 200)


def write_referring_set(root, num_images: int = 6, seed: int = 0, width: int = 80, height: int = 64):
    """Images with one rectangle per colour; one expression per object, its candidates every object's box plus
    a near-copy of the first box (so chance counts two candidates with IoU > 0.5 for that one)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    entries = []
    for index in range(num_images):
        pixels = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
        boxes = {}
        for column, (name, colour) in enumerate(OBJECT_COLOURS.items()):
            x0 = int(column * width / 3 + rng.integers(0, 6))
            y0 = int(rng.integers(0, height // 2))
            box = [x0, y0, x0 + int(rng.integers(12, 20)), y0 + int(rng.integers(14, height // 2))]
            pixels[box[1] : box[3], box[0] : box[2]] = colour
            boxes[name] = box
        Image.fromarray(pixels).save(root / "images" / f"{index:03d}.png")
        first = boxes["red"]
        near_copy = [first[0] + 1, first[1], first[2], first[3] - 1]
        candidates = [*boxes.values(), near_copy]
        for name, box in boxes.items():
            entries.append(
                {
                    "image": f"images/{index:03d}.png",
                    "expression": f"the {name} box",
                    "box": box,
                    "candidates": candidates,
                }
            )
    (root / "refs_test.json").write_text(json.dumps(entries))
    return root


# --- fake encoders whose right answer is known ------------------------------------------------------------------


class NameTokenizer:
    """A text's 'tokens' are the index of the name it mentions."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([next(i for i, name in enumerate(self.names) if name in text) for text in texts])


class ColourEncoder:
    """Oracle features: each patch is the one-hot of the colour nearest its mean colour; text is the one-hot of the
    name it mentions (the names in colour order)."""

    def __init__(self, colours, grid: int = 4, noise: float = 0.0) -> None:
        self.colours = torch.tensor(colours, dtype=torch.float32) / 255
        self.grid, self.noise = grid, noise
        self.generator = torch.Generator().manual_seed(0)

    def classes(self, images: torch.Tensor) -> torch.Tensor:
        means = F.adaptive_avg_pool2d(images, self.grid).permute(0, 2, 3, 1)  # (B, h, w, 3)
        return torch.cdist(means.reshape(-1, 3), self.colours).argmin(dim=1).view(means.shape[:3])

    def encode_image_dense(self, images, variant="maskclip", tokens=True, embeddings=True) -> DenseFeatures:
        onehot = F.one_hot(self.classes(images), len(self.colours)).float()
        noisy = onehot + self.noise * torch.randn(onehot.shape, generator=self.generator)
        return DenseFeatures(noisy if tokens else None, F.normalize(onehot, dim=-1) if embeddings else None)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.one_hot(tokens, len(self.colours)).float()

    def encode_image(self, images):  # the Encoder protocol; dense evaluation never calls it
        raise AssertionError


class RandomEncoder(ColourEncoder):
    """Patch features that know nothing of the image: isotropic, so the argmax over orthonormal class embeddings is
    uniform."""

    def encode_image_dense(self, images, variant="maskclip", tokens=True, embeddings=True) -> DenseFeatures:
        shape = (len(images), self.grid, self.grid, len(self.colours))
        features = torch.randn(shape, generator=self.generator)
        return DenseFeatures(features, F.normalize(features, dim=-1))


class ProjectionEncoder(ColourEncoder):
    """Patch embeddings that are a fixed random function of the patch's mean colour and position: the same for an
    image whatever batch it comes in."""

    def __init__(self, colours, grid: int = 4) -> None:
        super().__init__(colours, grid)
        generator = torch.Generator().manual_seed(7)
        self.projection = torch.randn(3, len(colours), generator=generator)
        self.positions = 0.3 * torch.randn(grid, grid, len(colours), generator=generator)

    def encode_image_dense(self, images, variant="maskclip", tokens=True, embeddings=True) -> DenseFeatures:
        means = F.adaptive_avg_pool2d(images, self.grid).permute(0, 2, 3, 1)
        features = means @ self.projection + self.positions
        return DenseFeatures(features, F.normalize(features, dim=-1))


# --- the readers --------------------------------------------------------------------------------------------------


def test_segmentation_reader(tmp_path):
    root = write_segmentation_set(tmp_path / "seg", {"train": 2, "test": 3}, ignore_bands=True)
    dataset = load_segmentation_set(root, "test")
    assert dense_kind(root) == SEGMENTATION and dense_kind(root, "val") is None
    assert dataset.classnames == CLASSNAMES and dataset.templates == TEMPLATES and len(dataset) == 3
    stored = np.asarray(Image.open(dataset.annotations[0]))
    mask = dataset.mask(0)
    assert (mask == IGNORE).sum() == (stored == 255).sum() > 0
    assert np.array_equal(mask[stored != 255], stored[stored != 255])
    # ADE20K's convention: 0 is ignore, v is class v - 1; 255 stays ignore
    reduced = load_segmentation_set(root, "test", classnames=["a", "b"], reduce_zero_label=True).mask(0)
    for value in range(256):
        expected = IGNORE if value in (0, 255) else value - 1
        assert (reduced[stored == value] == expected).all()
    # no templates file: OpenAI's ImageNet templates
    (root / "zeroshot_classification_templates.txt").unlink()
    assert len(load_segmentation_set(root, "test").templates) == 80


def test_segmentation_reader_errors_name_the_file(tmp_path):
    root = write_segmentation_set(tmp_path / "seg", {"test": 3})
    (root / "annotations" / "test" / "0001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"0001\.png: no annotation .*annotations/test/0001\.png"):
        load_segmentation_set(root)
    root = write_segmentation_set(tmp_path / "seg2", {"test": 3})
    Image.fromarray(np.full((64, 64), 7, dtype=np.uint8), mode="L").save(root / "annotations" / "test" / "0002.png")
    with pytest.raises(ValueError, match=r"0002\.png: pixel value 7 names no class: 3 class names") as error:
        list(segmentation_batches(load_segmentation_set(root), eval_transform(), batch_size=2))
    assert "\n" not in str(error.value)
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(root / "annotations" / "test" / "0002.png")
    with pytest.raises(ValueError, match=r"0002\.png: mask mode RGB"):
        list(segmentation_batches(load_segmentation_set(root), eval_transform(), num_workers=1))
    Image.fromarray(np.zeros((60, 64), dtype=np.uint8), mode="L").save(root / "annotations" / "test" / "0002.png")
    with pytest.raises(ValueError, match=r"0002\.png: mask is 64x60 but its image 0002\.png is 64x64"):
        list(segmentation_batches(load_segmentation_set(root), eval_transform()))
    (root / "images" / "test" / "0000.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"images/test/0000\.png"):
        list(segmentation_batches(load_segmentation_set(root), eval_transform()))
    with pytest.raises(FileNotFoundError, match=r"images/train does not exist"):
        load_segmentation_set(root, "train")


def test_referring_reader_and_errors(tmp_path):
    root = write_referring_set(tmp_path / "ref", num_images=2)
    dataset = load_referring_set(root)
    assert dense_kind(root) == REFERRING and len(dataset) == 6 and len(dataset.image_paths()) == 2
    assert dataset.samples[0].box in dataset.samples[0].candidates
    entries = json.loads((root / "refs_test.json").read_text())
    for change, message in (
        ({"box": [5, 5, 5, 9]}, r"entry 1: box: \[5, 5, 5, 9\] is empty"),
        ({"box": [0, 0, 1, 1]}, r"entry 1: box \[0, 0, 1, 1\] is not one of its candidates"),
        ({"image": "images/missing.png"}, r"entry 1: image 'images/missing.png' is not a file"),
        ({"expression": ""}, r"entry 1: expression '' is not a non-empty string"),
        ({"candidates": [[1, 2, 3]]}, r"entry 1: candidates\[0\]: expected \[x0, y0, x1, y1\]"),
    ):
        broken = [entries[0], {**entries[1], **change}]
        (root / "refs_test.json").write_text(json.dumps(broken))
        with pytest.raises((ValueError, FileNotFoundError), match=r"refs_test\.json: " + message):
            load_referring_set(root)


# --- the resizing rule --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(70, 50), (50, 70), (64, 64), (33, 91), (20, 24)])
def test_mask_through_resize_and_crop_aligns_with_the_image(size):
    """The image through a nearest-neighbour eval transform and its mask through ``CropGeometry`` agree at every
    pixel (a pixel's colour names its class); where the crop is larger than the image, torchvision pads with black
    and the mask with ignore. The boxes of coloured rectangles land within half a pixel of their crop pixels."""
    width, height = size
    rng = np.random.default_rng(width * height)
    mask = rng.integers(0, 3, size=(height, width))
    mask[height // 4 : height // 2, width // 3 : width // 2 + 1] = 3
    box = [width // 3, height // 4, width // 2 + 1, height // 2]
    palette = np.array([(10, 10, 10), (220, 30, 30), (30, 30, 220), (30, 200, 30)], dtype=np.uint8)
    image = Image.fromarray(palette[mask])
    padded = Compose([Resize(28, interpolation=InterpolationMode.NEAREST), CenterCrop(32), ToTensor()])
    for transform in (eval_transform(32, InterpolationMode.NEAREST), padded):
        pixels = (transform(image).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        geometry = CropGeometry(transform)
        cropped = geometry.mask(mask)
        assert cropped.shape == pixels.shape[:2] == (32, 32)
        colour_class = np.full(pixels.shape[:2], IGNORE)
        for value, colour in enumerate(palette):
            colour_class[(pixels == colour).all(axis=-1)] = value
        assert np.array_equal(colour_class, cropped), transform
        ys, xs = np.nonzero(cropped == 3)
        moved = geometry.boxes(np.array([box]), width, height)[0]
        assert np.allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], moved, atol=0.5 + 1e-9)


def test_open_clip_transform_geometry_is_followed(tiny_model_json):
    """The model's own eval transform (bicubic, normalised): CropGeometry reads its Resize and CenterCrop steps."""
    from clipforge.models.builder import build_model
    from clipforge.models.config import ModelConfig

    transform = build_model(ModelConfig(name=tiny_model_json)).eval_transform
    geometry = CropGeometry(transform)
    assert geometry.output_size(70, 50) == (32, 32)
    assert [(step.kind, step.width, step.height, step.left, step.top) for step in geometry.plan(70, 50)] == [
        ("resize", 44, 32, 0, 0),  # shorter side 32, longer int(32 * 70 / 50)
        ("crop", 32, 32, 6, 0),  # round((44 - 32) / 2)
    ]
    with pytest.raises(ValueError, match="RandomHorizontalFlip moves pixels"):
        from torchvision.transforms import RandomHorizontalFlip

        CropGeometry(Compose([Resize(32), RandomHorizontalFlip(), ToTensor()]))
    with pytest.raises(ValueError, match="cannot follow the geometry of a function"):
        CropGeometry(lambda image: image)


# --- metrics against hand computations ----------------------------------------------------------------------------


def hand_bilinear(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """(h, w) → (out_h, out_w), bilinear with half-pixel centres, edge values held, one pixel at a time."""
    in_h, in_w = grid.shape
    out = np.zeros((out_h, out_w))
    for y in range(out_h):
        for x in range(out_w):
            sy, sx = max((y + 0.5) * in_h / out_h - 0.5, 0.0), max((x + 0.5) * in_w / out_w - 0.5, 0.0)
            y0, x0 = int(math.floor(sy)), int(math.floor(sx))
            y1, x1 = min(y0 + 1, in_h - 1), min(x0 + 1, in_w - 1)
            ly, lx = sy - y0, sx - x0
            out[y, x] = (
                (1 - ly) * (1 - lx) * grid[y0, x0]
                + (1 - ly) * lx * grid[y0, x1]
                + ly * (1 - lx) * grid[y1, x0]
                + ly * lx * grid[y1, x1]
            )
    return out


def hand_metrics(predicted: np.ndarray, target: np.ndarray, num_classes: int) -> dict:
    """mIoU, per-class IoU, pixel accuracy and chance from pixel sets, one pixel at a time."""
    pixels = [(p, t) for p, t in zip(predicted.ravel().tolist(), target.ravel().tolist()) if t != IGNORE]
    ious = {}
    for c in range(num_classes):
        hit = sum(1 for p, t in pixels if p == c and t == c)
        either = sum(1 for p, t in pixels if p == c or t == c)
        if either:
            ious[c] = hit / either
    # chance: the expected confusion matrix of uniform guesses (each true pixel spread 1/K over the columns)
    counts = [sum(1 for _, t in pixels if t == c) for c in range(num_classes)]
    expected = [[counts[t] / num_classes for _ in range(num_classes)] for t in range(num_classes)]
    chance = []
    for c in range(num_classes):
        column = sum(expected[t][c] for t in range(num_classes))
        chance.append(expected[c][c] / (sum(expected[c]) + column - expected[c][c]))
    return {
        "miou": sum(ious.values()) / len(ious),
        "per_class_iou": ious,
        "pixel_accuracy": sum(1 for p, t in pixels if p == t) / len(pixels),
        "chance_miou": sum(chance) / num_classes,
    }


def test_segmentation_metrics_equal_a_hand_computation():
    generator = torch.Generator().manual_seed(3)
    num_classes, grid, size = 4, (2, 3), (10, 12)
    scores = torch.randn(2, *grid, num_classes, generator=generator)
    masks = torch.randint(0, 3, (2, *size), generator=generator)  # class 3 never true: counted where predicted
    masks[0, :3] = IGNORE
    upsampled = upsample_scores(scores, size)
    for b in range(2):
        for k in range(num_classes):
            expected = hand_bilinear(scores[b, :, :, k].numpy().astype(np.float64), *size)
            assert np.abs(upsampled[b, k].numpy() - expected).max() < 1e-6
    predicted = upsampled.argmax(dim=1).numpy()
    names = [f"class {c}" for c in range(num_classes)]
    metrics = segmentation_metrics(score_patches(scores, masks), names)
    hand = hand_metrics(predicted, masks.numpy(), num_classes)
    for key in ("miou", "pixel_accuracy", "chance_miou"):
        assert abs(metrics[key] - hand[key]) < 1e-6, key
    assert metrics["per_class_iou"].keys() == {names[c] for c in hand["per_class_iou"]}
    for c, iou in hand["per_class_iou"].items():
        assert abs(metrics["per_class_iou"][names[c]] - iou) < 1e-6
    assert metrics["num_pixels"] == int((masks != IGNORE).sum()) and metrics["chance_pixel_accuracy"] == 0.25


def test_patch_labels_are_the_mode_of_labelled_pixels():
    generator = torch.Generator().manual_seed(4)
    masks = torch.randint(-1, 3, (2, 12, 8), generator=generator)
    masks[1, :6, :4] = IGNORE  # a patch with no labelled pixel
    masks[0, :6, :4] = torch.tensor([0, 1] * 12).view(6, 4)  # a tie: the lower class
    labels = patch_labels(masks, (2, 2), 3)
    for b in range(2):
        for i in range(2):
            for j in range(2):
                values = [v for v in masks[b, i * 6 : i * 6 + 6, j * 4 : j * 4 + 4].flatten().tolist() if v != IGNORE]
                counts = [values.count(c) for c in range(3)]
                expected = IGNORE if not values else counts.index(max(counts))
                assert labels[b, i, j] == expected
    assert labels[1, 0, 0] == IGNORE and labels[0, 0, 0] == 0


def test_box_scores_and_iou_equal_a_hand_computation():
    generator = torch.Generator().manual_seed(5)
    embeddings = F.normalize(torch.randn(3, 4, 6, generator=generator), dim=-1)  # h=3, w=4 on a 32 x 24 crop
    boxes = torch.tensor([[0, 0, 32, 24], [9, 5, 23, 17], [1, 1, 3, 3], [30, 20, 32, 24], [7.5, 0, 8.5, 8]])
    features = box_features(embeddings, boxes, (32, 24))
    for m, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        inside = []
        for i in range(3):
            for j in range(4):
                cx, cy = (j + 0.5) * 8, (i + 0.5) * 8
                if x0 <= cx < x1 and y0 <= cy < y1:
                    inside.append(embeddings[i, j].double())
        if not inside:  # the patch holding the box's centre
            inside = [embeddings[min(int((y0 + y1) / 2 // 8), 2), min(int((x0 + x1) / 2 // 8), 3)].double()]
        mean = sum(inside) / len(inside)
        assert torch.allclose(features[m].double(), mean / mean.norm(), atol=1e-6), m
    integer_boxes = torch.tensor([[0, 0, 10, 10], [5, 5, 15, 12], [20, 20, 25, 30], [0, 0, 10, 10]])
    for a in integer_boxes.tolist():
        pixels_a = {(x, y) for x in range(a[0], a[2]) for y in range(a[1], a[3])}
        for b, iou in zip(integer_boxes.tolist(), box_iou(integer_boxes, torch.tensor(a)).tolist(), strict=True):
            pixels_b = {(x, y) for x in range(b[0], b[2]) for y in range(b[1], b[3])}
            assert abs(iou - len(pixels_a & pixels_b) / len(pixels_a | pixels_b)) < 1e-12


def hand_referring(dataset, encoder, tokenizer, transform) -> tuple[float, float]:
    """Accuracy and chance one expression at a time: boxes moved by the transform's scale and offset worked out
    here for a shorter-side resize to 32 and a 32 x 32 centre crop."""
    hits, chances = 0, []
    for sample in dataset.samples:
        image = Image.open(sample.image).convert("RGB")
        width, height = image.size
        resized_w, resized_h = (
            (CROP, int(CROP * height / width)) if width <= height else (int(CROP * width / height), CROP)
        )
        left, top = round((resized_w - CROP) / 2), round((resized_h - CROP) / 2)
        features = encoder.encode_image_dense(transform(image)[None]).embeddings[0]
        grid_h, grid_w = features.shape[:2]
        text = encoder.encode_text(tokenizer([sample.expression]))[0]
        scores = []
        for x0, y0, x1, y1 in sample.candidates:
            cx0, cx1 = [min(max(v * resized_w / width - left, 0), CROP) for v in (x0, x1)]
            cy0, cy1 = [min(max(v * resized_h / height - top, 0), CROP) for v in (y0, y1)]
            inside = [
                features[i, j]
                for i in range(grid_h)
                for j in range(grid_w)
                if cx0 <= (j + 0.5) * CROP / grid_w < cx1 and cy0 <= (i + 0.5) * CROP / grid_h < cy1
            ]
            if not inside:
                inside = [features[int((cy0 + cy1) / 2 * grid_h / CROP), int((cx0 + cx1) / 2 * grid_w / CROP)]]
            mean = sum(inside) / len(inside)
            scores.append(float(mean @ text / mean.norm() / text.norm()))

        def iou(a, b):
            inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
            return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

        picked = sample.candidates[scores.index(max(scores))]
        hits += iou(picked, sample.box) > 0.5
        chances.append(sum(iou(c, sample.box) > 0.5 for c in sample.candidates) / len(sample.candidates))
    return hits / len(dataset.samples), sum(chances) / len(chances)


@pytest.mark.parametrize("encoder_class", [ColourEncoder, ProjectionEncoder])
def test_referring_accuracy_and_chance_equal_a_hand_computation(tmp_path, encoder_class):
    dataset = load_referring_set(write_referring_set(tmp_path / "ref", num_images=5))
    tokenizer = NameTokenizer([*OBJECT_COLOURS, "grey"])
    transform = eval_transform()
    encoder = encoder_class([*OBJECT_COLOURS.values(), BACKGROUND])
    metrics = referring_expressions(encoder, tokenizer, dataset, transform, batch_size=2)
    accuracy, chance = hand_referring(dataset, encoder, tokenizer, transform)
    assert abs(metrics["accuracy"] - accuracy) < 1e-6 and abs(metrics["chance"] - chance) < 1e-6
    # a red expression has two candidates of four over IoU 0.5 (its box and the near-copy), the others one
    assert abs(metrics["chance"] - (2 / 4 + 1 / 4 + 1 / 4) / 3) < 1e-12
    assert metrics["num_samples"] == 15 and metrics["num_images"] == 5 and metrics["grid"] == [4, 4]
    assert 0 < metrics["accuracy"] < 1  # both outcomes occur, so agreeing with the hand computation means something
    if encoder_class is ColourEncoder:
        assert metrics["accuracy"] > 2 * metrics["chance"]  # colour features find the named colour's box mostly


# --- oracle and random features ------------------------------------------------------------------------------------


def test_oracle_features_give_miou_one(tmp_path):
    """Patch features that are the class (one-hot): zero-shot and the probe label every patch right, and, the scores
    being the same for every class up to relabelling (balanced classes, exact one-hots), bilinear upsampling
    keeps every pixel's own patch class. (Scores that favour one class everywhere move a boundary by up to half a
    patch: that is the upsampling rule, not a wrong patch.)"""
    train_root = write_segmentation_set(tmp_path / "train", {"train": 12}, balanced=True)
    test_root = write_segmentation_set(tmp_path / "test", {"test": 10}, seed=1, ignore_bands=True)
    train, test = load_segmentation_set(train_root, "train"), load_segmentation_set(test_root, "test")
    encoder, tokenizer = ColourEncoder(COLOURS), NameTokenizer(CLASSNAMES)
    zero_shot = zero_shot_segmentation(encoder, tokenizer, test, eval_transform(), batch_size=4)
    assert zero_shot["miou"] == 1.0 and zero_shot["pixel_accuracy"] == 1.0
    assert set(zero_shot["per_class_iou"].values()) == {1.0} and zero_shot["grid"] == [4, 4]
    assert zero_shot["num_pixels"] == 10 * CROP * CROP - 4 * 8 * CROP  # 4 images' ignore stripes are not counted
    probe = linear_probe_segmentation(encoder, train, test, eval_transform(), batch_size=4)
    assert probe["miou"] == 1.0 and probe["pixel_accuracy"] == 1.0 and probe["val_patch_accuracy"] == 1.0
    assert probe["num_train_patches"] + probe["num_val_patches"] == 12 * 16
    assert probe["num_val_patches"] == round(0.2 * 12) * 16  # the validation part is whole images


def test_random_features_give_chance(tmp_path):
    root = write_segmentation_set(tmp_path / "seg", {"train": 40, "test": 80}, seed=1)
    train, test = load_segmentation_set(root, "train"), load_segmentation_set(root, "test")
    encoder, tokenizer = RandomEncoder(COLOURS), NameTokenizer(CLASSNAMES)
    zero_shot = zero_shot_segmentation(encoder, tokenizer, test, eval_transform(), batch_size=16)
    # 80 images x 16 patches of independent uniform guesses: the standard error of the mIoU is about 0.01
    assert abs(zero_shot["miou"] - zero_shot["chance_miou"]) < 0.04, zero_shot
    assert abs(zero_shot["pixel_accuracy"] - 1 / 3) < 0.04
    assert 0.18 < zero_shot["chance_miou"] < 0.22  # 1 / (2K - 1) = 0.2 for balanced classes
    probe = linear_probe_segmentation(encoder, train, test, eval_transform(), batch_size=16)
    assert abs(probe["pixel_accuracy"] - 1 / 3) < 0.06 and probe["miou"] < probe["chance_miou"] + 0.04, probe


# --- real towers -------------------------------------------------------------------------------------------------


def _tiny(config_path, image_size=None, tmp_path=None):
    from clipforge.models.builder import build_model
    from clipforge.models.config import ModelConfig

    if image_size is not None:
        config = json.loads(open(config_path).read())
        config["vision_cfg"]["image_size"] = image_size
        config_path = tmp_path / f"tiny-{image_size}.json"
        config_path.write_text(json.dumps(config))
    torch.manual_seed(0)
    built = build_model(ModelConfig(name=str(config_path)))
    built.model.eval()
    return built


def test_vit_dense_features_match_the_tower(tiny_model_json):
    """Plain: open_clip's own patch tokens (output_tokens) through proj. MaskCLIP: the last block computed by hand
    with each token's value in place of attention (residual and MLP kept). The pooled-last-block shortcut changes
    nothing."""
    from clipforge.models.shortcuts import enable_pooled_last_block

    model = _tiny(tiny_model_json).model
    visual = model.visual
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plain, maskclip = encode_dense(model, images, "plain"), encode_dense(model, images, "maskclip")
    with torch.no_grad():
        visual.output_tokens = True
        _, tokens = visual(images)
        visual.output_tokens = False
        assert torch.allclose(plain.tokens.reshape(3, 16, -1), tokens, atol=1e-5)
        assert torch.allclose(plain.embeddings.reshape(3, 16, -1), F.normalize(tokens @ visual.proj, dim=-1), atol=1e-5)
        x = torch.cat([visual.class_embedding.expand(3, 1, -1), visual.conv1(images).flatten(2).transpose(1, 2)], 1)
        x = visual.ln_pre(x + visual.positional_embedding)
        for block in visual.transformer.resblocks[:-1]:
            x = block(x)
        last = visual.transformer.resblocks[-1]
        width = x.shape[-1]
        value = F.linear(last.ln_1(x), last.attn.in_proj_weight[2 * width :], last.attn.in_proj_bias[2 * width :])
        y = x + last.attn.out_proj(value)
        y = y + last.mlp(last.ln_2(y))
        expected = F.normalize(visual.ln_post(y[:, 1:]) @ visual.proj, dim=-1)
        assert torch.allclose(maskclip.embeddings.reshape(3, 16, -1), expected, atol=1e-5)
        assert torch.equal(maskclip.tokens, plain.tokens)
        assert enable_pooled_last_block(model) == ["image", "text"]
        shortcut = encode_dense(model, images, "maskclip")
        assert torch.allclose(shortcut.embeddings, maskclip.embeddings, atol=1e-6)
        assert torch.allclose(shortcut.tokens, maskclip.tokens, atol=1e-6)


def test_resnet_dense_features_match_the_tower(tiny_resnet_json, tmp_path):
    """A 64-px CLIP-ResNet (a 2 x 2 grid): the attention pool's first output is the tower's embedding; MaskCLIP is
    c_proj(v_proj(x)) at each location."""
    model = _tiny(tiny_resnet_json, 64, tmp_path).model
    visual = model.visual
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    plain, maskclip = encode_dense(model, images, "plain"), encode_dense(model, images, "maskclip")
    assert plain.tokens.shape == (2, 2, 2, 256) and plain.embeddings.shape == (2, 2, 2, 64)
    with torch.no_grad():
        feature_map = plain.tokens.permute(0, 3, 1, 2)
        assert torch.allclose(attention_pool_all(visual.attnpool, feature_map)[:, 0], visual(images), atol=1e-5)
        pool = visual.attnpool
        for i in range(2):
            for j in range(2):
                location = plain.tokens[:, i, j]
                expected = F.normalize(pool.c_proj(pool.v_proj(location)), dim=-1)
                assert torch.allclose(maskclip.embeddings[:, i, j], expected, atol=1e-5)


@pytest.mark.parametrize("tower", ["vit", "resnet"])
def test_tiny_towers_run_end_to_end(tower, tiny_model_json, tiny_resnet_json, tmp_path):
    built = _tiny(tiny_model_json) if tower == "vit" else _tiny(tiny_resnet_json, 64, tmp_path)
    encoder = OpenClipEncoder(built.model)
    seg = write_segmentation_set(tmp_path / "seg", {"train": 10, "test": 6})
    train, test = load_segmentation_set(seg, "train"), load_segmentation_set(seg, "test")
    referring = load_referring_set(write_referring_set(tmp_path / "ref", num_images=3))
    grid = [4, 4] if tower == "vit" else [2, 2]
    for variant in ("maskclip", "plain"):
        metrics = zero_shot_segmentation(encoder, built.tokenizer, test, built.eval_transform, variant, batch_size=4)
        assert metrics["grid"] == grid and metrics["variant"] == variant and 0 <= metrics["miou"] <= 1
        assert set(metrics["per_class_iou"]) <= set(CLASSNAMES) and metrics["num_images"] == 6
        result = referring_expressions(encoder, built.tokenizer, referring, built.eval_transform, variant)
        assert result["grid"] == grid and 0 <= result["accuracy"] <= 1 and abs(result["chance"] - 1 / 3) < 1e-12
    probe = linear_probe_segmentation(encoder, train, test, built.eval_transform, batch_size=4)
    assert probe["grid"] == grid and 0 <= probe["miou"] <= 1 and probe["num_fits"] >= 2
    assert math.isfinite(probe["chance_miou"]) and probe["num_train_images"] == 10


def test_towers_without_a_grid_are_refused_in_one_line(tiny_model_json):
    class TimmModel(torch.nn.Module):
        pass

    class Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = TimmModel()

    for encoder, named in (
        (OpenClipEncoder(Tower()), "the image tower is a TimmModel, which has no patch grid"),
        (HFClipEncoder(torch.nn.Linear(1, 1)), "HFClipEncoder gives no patch features"),
    ):
        with pytest.raises(ValueError, match=named) as error:
            check_dense(encoder)
        assert "\n" not in str(error.value)
    model = _tiny(tiny_model_json).model
    model.visual.attn_pool = torch.nn.Identity()
    with pytest.raises(ValueError, match="attentional pooler") as error:
        check_dense(OpenClipEncoder(model))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="variant 'clear' is not one of"):
        encode_dense(_tiny(tiny_model_json).model, torch.zeros(1, 3, 32, 32), "clear")
