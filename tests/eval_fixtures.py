"""Fixtures and helpers shared by the evaluation tests (conftest registers this module as a plugin).

A random-init CLIP predicts one class for every image (its image embeddings barely differ), which
would make agreement tests trivially true; ``trained_checkpoint`` trains the tiny CLIP-ResNet for
60 steps on the synthetic set so predictions spread over the classes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_CACHE: dict[str, Path] = {}  # fixtures imported into several modules still train once per session


@pytest.fixture(scope="session")
def trained_checkpoint(synth_data, tiny_resnet_json, tmp_path_factory) -> Path:
    if "checkpoint" not in _CACHE:
        from clipforge.train.config import load_config
        from clipforge.train.loop import train

        out = tmp_path_factory.mktemp("trained")
        cfg = load_config(
            None,
            [
                f"data.train_urls={synth_data}/train/{{00000..00005}}.tar",
                "data.batch_size=64",
                "data.num_workers=1",
                "data.shuffle_buffer=300",
                f"model.name={tiny_resnet_json}",
                "optim.lr=2e-3",
                "optim.warmup_steps=5",
                f"train.output_dir={out}",
                "train.steps=60",
                "checkpoint.every=1000",
                "logging.log_every=20",
                "logging.progress_bar=false",
                "logging.tensorboard=false",
                "logging.plot=false",
            ],
        )
        _CACHE["checkpoint"] = Path(train(cfg)["checkpoint"])
    return _CACHE["checkpoint"]


@pytest.fixture(scope="session")
def probe_suite(synth_data, tmp_path_factory) -> Path:
    """The synthetic sets with a linear probe on shapes (zero-shot and probe share the test split)."""
    path = tmp_path_factory.mktemp("probe_suite") / "suite.yaml"
    eval_dir = synth_data / "eval"
    path.write_text(
        "name: synthetic\ndatasets:\n"
        f"  - {{name: shapes, task: zeroshot_classification, path: {eval_dir / 'shapes'}}}\n"
        f"  - {{name: colors, task: zeroshot_classification, path: {eval_dir / 'colors'}}}\n"
        f"  - {{name: retrieval, task: zeroshot_retrieval, path: {eval_dir / 'retrieval'}}}\n"
        f"  - {{name: shapes-probe, task: linear_probe, path: {eval_dir / 'shapes'}}}\n"
    )
    return path


def write_imagefolder(wds_root, out):
    """The classification set at ``wds_root`` as an image folder OUT/test/CLASS/*.jpg, with its templates file."""
    from clipforge.evaluation import load_benchmark

    benchmark = load_benchmark(wds_root)
    for index in range(len(benchmark)):
        label = benchmark.source.target(index)
        folder = out / "test" / benchmark.classnames[label].replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index:05d}.jpg").write_bytes(benchmark.source._read(index, "jpg"))
    (out / "zeroshot_classification_templates.txt").write_text(
        (wds_root / "zeroshot_classification_templates.txt").read_text()
    )
    return out


def write_hf(wds_root, out, kind):
    """The set at ``wds_root`` as a saved HF DatasetDict (split test): image + ClassLabel, or image + captions."""
    import datasets

    from clipforge.evaluation import load_benchmark

    benchmark = load_benchmark(wds_root)
    images = [{"bytes": benchmark.source._read(i, "jpg"), "path": None} for i in range(len(benchmark))]
    targets = [benchmark.source.target(i) for i in range(len(benchmark))]
    if kind == "classification":
        features = datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=benchmark.classnames)}
        )
        table = {"image": images, "label": targets}
    else:
        features = datasets.Features({"image": datasets.Image(), "captions": datasets.List(datasets.Value("string"))})
        table = {"image": images, "captions": targets}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(table, features=features)}).save_to_disk(str(out))
    return out


def assert_valid_png(path: Path, min_bytes: int = 5_000, min_side: int = 300) -> None:
    """A real, decodable PNG of plausible size with more than one colour in it."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) >= min_bytes, (path, len(data))
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG" and min(image.size) >= min_side, (path, image.size)
    pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10, path
