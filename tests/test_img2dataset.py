"""Real img2dataset output: images served over loopback HTTP, downloaded by img2dataset, read by us and OpenCLIP.

img2dataset 1.47 pins ``webdataset<0.3`` and ``pandas<3`` (installing it beside clipforge would downgrade our
webdataset 1.0.2), so it runs as a separate program from its own environment. It is found at, in order:
``$CLIPFORGE_IMG2DATASET_PYTHON`` (a Python that imports img2dataset), ``.venv-img2dataset/bin/python`` in the
repository, or this interpreter if it imports img2dataset. Set the environment up with

    python3 -m venv .venv-img2dataset && .venv-img2dataset/bin/pip install img2dataset==1.47.0

``run_img2dataset(tmp_path)`` is the reusable part: it returns the output directory of a real run.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from clipforge.data.inspection import inspect_shards

REPO = Path(__file__).resolve().parents[1]
NUM_GOOD = 12
IMAGE_SIZE = 64
SAMPLES_PER_SHARD = 5


def img2dataset_python() -> str | None:
    """A Python interpreter that can import img2dataset, or None."""
    candidates = [os.environ.get("CLIPFORGE_IMG2DATASET_PYTHON"), str(REPO / ".venv-img2dataset" / "bin" / "python")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    return sys.executable if importlib.util.find_spec("img2dataset") else None


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's signature
        pass


@contextmanager
def serve_directory(root: Path) -> Iterator[str]:
    """Serve ``root`` over HTTP on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@dataclass
class Img2DatasetRun:
    """What ``run_img2dataset`` asked for and where img2dataset wrote it."""

    out: Path
    captions: dict[str, str]
    """URL → caption for every image that should be downloaded."""
    bad_urls: list[str]
    """A 404 and a file that is not an image."""


def write_site(root: Path) -> list[tuple[str, str]]:
    """JPEG and PNG images of varied sizes, plus one file that is not an image; (path, caption) pairs."""
    root.mkdir(parents=True, exist_ok=True)
    pairs = []
    for index in range(NUM_GOOD):
        size = (80 + 7 * index, 72 + 11 * (index % 3))
        name = f"image_{index:02d}.{'png' if index % 4 == 3 else 'jpg'}"
        Image.new("RGB", size, (20 * index % 256, 90, 200 - 10 * index)).save(root / name)
        pairs.append((name, f"photo {index} of a {['red', 'green', 'blue'][index % 3]} square"))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not an image")
    return pairs


def run_img2dataset(tmp_path: Path, timeout: float = 180.0) -> Img2DatasetRun:
    """Serve generated images on loopback and run the real img2dataset on their URLs (webdataset output,
    shorter side resized to 64 px, 5 samples per shard); returns where it wrote and what it should hold."""
    python = img2dataset_python()
    if python is None:
        pytest.fail(
            "img2dataset is not installed: python3 -m venv .venv-img2dataset && "
            ".venv-img2dataset/bin/pip install img2dataset==1.47.0 (or set CLIPFORGE_IMG2DATASET_PYTHON)"
        )
    pairs = write_site(tmp_path / "site")
    out = tmp_path / "img2dataset"
    with serve_directory(tmp_path / "site") as base:
        captions = {f"{base}/{name}": caption for name, caption in pairs}
        bad_urls = [f"{base}/missing.jpg", f"{base}/broken.jpg"]
        rows = list(captions.items())
        rows[4:4] = [(bad_urls[0], "a 404")]
        rows[9:9] = [(bad_urls[1], "not an image")]
        import pandas as pd

        pd.DataFrame(rows, columns=["url", "caption"]).to_parquet(tmp_path / "urls.parquet")
        options = {
            "url_list": str(tmp_path / "urls.parquet"),
            "input_format": "parquet",
            "url_col": "url",
            "caption_col": "caption",
            "output_format": "webdataset",
            "output_folder": str(out),
            "processes_count": 1,
            "thread_count": 4,
            "image_size": IMAGE_SIZE,
            "resize_mode": "keep_ratio",
            "number_sample_per_shard": SAMPLES_PER_SHARD,
            "timeout": 5,
            "retries": 0,
            "enable_wandb": False,
            "distributor": "multiprocessing",
        }
        environment = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy")}
        environment.update(
            no_proxy="127.0.0.1,localhost", NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", PYTHONWARNINGS="ignore"
        )
        script = "import json, sys\nfrom img2dataset import download\ndownload(**json.loads(sys.argv[1]))"
        done = subprocess.run(
            [python, "-c", script, json.dumps(options)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=environment,
            cwd=tmp_path,
        )
    if done.returncode != 0:
        raise RuntimeError(f"img2dataset failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return Img2DatasetRun(out, captions, bad_urls)


@pytest.fixture(scope="module")
def img2dataset_run(tmp_path_factory) -> Img2DatasetRun:
    return run_img2dataset(tmp_path_factory.mktemp("img2dataset"))


def test_img2dataset_downloads_every_good_url_once_with_its_caption(img2dataset_run):
    out = img2dataset_run.out
    num_rows = NUM_GOOD + len(img2dataset_run.bad_urls)
    shards = sorted(out.glob("*.tar"))
    assert [s.name for s in shards] == [f"{i:05d}.tar" for i in range(-(-num_rows // SAMPLES_PER_SHARD))]
    stats = [json.loads(path.read_text()) for path in sorted(out.glob("[0-9]*_stats.json"))]
    assert sum(s["successes"] for s in stats) == NUM_GOOD and sum(s["count"] for s in stats) == num_rows
    assert sum(s["failed_to_download"] for s in stats) == 1 and sum(s["failed_to_resize"] for s in stats) == 1
    found: dict[str, str] = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for name in members:
            if name.endswith(".json"):
                key = name[:-5]
                meta = json.loads(members[name])
                assert meta["status"] == "success" and meta["key"] == key
                assert members[f"{key}.txt"].decode() == img2dataset_run.captions[meta["url"]] == meta["caption"]
                image = Image.open(io.BytesIO(members[f"{key}.jpg"]))
                assert min(image.size) == IMAGE_SIZE and image.size == (meta["width"], meta["height"])
                assert meta["url"] not in found
                found[meta["url"]] = meta["caption"]
    assert found == img2dataset_run.captions


def test_inspect_validates_img2dataset_output_and_writes_sizes_json(img2dataset_run):
    out = img2dataset_run.out
    assert not (out / "sizes.json").exists()  # img2dataset writes none; OpenCLIP needs it (or --train-num-samples)
    report = inspect_shards(out, num_workers=1)
    assert report["ok"], report["problems"]
    assert report["samples"] == report["valid"] == NUM_GOOD and report["extensions"] == {"jpg": NUM_GOOD}
    assert report["image_shorter_side"]["64-127"] == NUM_GOOD
    assert report["sizes_json"] == "written"
    sizes = json.loads((out / "sizes.json").read_text())
    stats = {f"{p.name[:5]}.tar": json.loads(p.read_text())["successes"] for p in out.glob("[0-9]*_stats.json")}
    assert sizes == stats
    assert json.loads((out / "_stats.json").read_text())["inspect"]["valid"] == NUM_GOOD


def test_open_clip_train_loader_reads_img2dataset_output(img2dataset_run, monkeypatch):
    import open_clip
    from test_prep import read_with_open_clip  # tests/ is on sys.path (pytest rootdir-relative imports)

    out = img2dataset_run.out
    if not (out / "sizes.json").exists():
        inspect_shards(out, num_workers=1)
    batches, loader = read_with_open_clip(str(out / "{00000..00002}.tar"), monkeypatch, batch_size=4, image_size=48)
    assert loader.num_samples == NUM_GOOD and len(batches) == NUM_GOOD // 4
    for images, texts in batches:
        assert images.shape == (4, 3, 48, 48) and texts.shape == (4, 77)
    tokenizer = open_clip.get_tokenizer("RN50")
    seen = sorted(tuple(row.tolist()) for _, texts in batches for row in texts)
    assert seen == sorted(tuple(tokenizer(c)[0].tolist()) for c in img2dataset_run.captions.values())


def test_training_runs_on_img2dataset_output(img2dataset_run, tiny_model_json, tmp_path):
    import json as json_module
    import math

    from clipforge.train.config import load_config
    from clipforge.train.loop import train

    shards = sorted(p.name for p in img2dataset_run.out.glob("*.tar"))
    urls = f"{img2dataset_run.out}/{{{shards[0][:-4]}..{shards[-1][:-4]}}}.tar"
    cfg = load_config(
        None,
        [
            f"data.train_urls={urls}",
            "data.batch_size=4",
            "data.num_workers=1",
            "data.shuffle_buffer=8",
            "data.shuffle_initial=2",
            f"model.name={tiny_model_json}",
            "train.steps=8",
            "checkpoint.every=4",
            f"train.output_dir={tmp_path / 'run'}",
            "logging.log_every=1",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
        ],
    )
    result = train(cfg)
    records = [json_module.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert result["step"] == 8 and len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert records[-1]["train/epoch"] >= 2  # 12 samples, 4 per step: several epochs went by
    assert not any(k.startswith("data/skipped") for r in records for k in r)  # img2dataset wrote only good ones
    assert (tmp_path / "run" / "checkpoints" / "step_00000008" / ".metadata").is_file()
