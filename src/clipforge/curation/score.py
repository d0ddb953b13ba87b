"""Scoring shards with a CLIP model: per-sample embeddings and the CLIP score, the input of every curation step.

``clipforge prep score SHARDS --model M --out DIR`` reads every sample of SHARDS with the training reader
(``samples.read_tar``, the caption rule of ``data.caption_key``), embeds its image and caption with M (anything
``clipforge eval`` loads: a checkpoint, an open_clip folder or ``--arch`` + ``--weights``, a transformers folder;
``evaluation.loading.load_eval_model``) and writes into DIR:

- per shard, the embeddings in ``clipforge.data.teacher``'s format (``NAME.image.npy``, ``NAME.text.npy``,
  ``NAME.keys.json``; float16, rows aligned with the keys) and ``parts/NAME.parquet``;
- ``scores.parquet``: one row per sample, in shard then tar order: key, shard, row (in the shard's arrays),
  score (the cosine of image and caption embeddings, DataComp's CLIP score), caption, caption_words,
  caption_chars, width, height (of the stored image);
- ``teacher.json``: the model, its embedding width and temperature, so the directory serves as ``data.teacher``.

Shards are scored in ``--workers`` processes, each loading the model once; progress shows images/s. A shard whose
outputs exist is not scored again, so an interrupted run is resumed by repeating the command. Samples that
training would skip (no image, no caption, an image that does not decode) get no row; they are counted by kind.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from clipforge.data.images import decode_error, decode_rgb
from clipforge.data.inspection import shard_paths
from clipforge.data.prep import run_jobs
from clipforge.data.prep_output import check_output_folder, write_json
from clipforge.data.samples import CaptionProblem, SkipCounter, image_member, read_caption, read_tar
from clipforge.data.sources import open_shard
from clipforge.data.teacher import shard_done, shard_name, write_shard_embeddings

COLUMNS = ("key", "shard", "row", "score", "caption", "caption_words", "caption_chars", "width", "height")


@dataclass(frozen=True)
class ModelSpec:
    """The model to score with, as ``clipforge eval`` names it."""

    source: str | None = None
    architecture: str | None = None
    weights: str | None = None
    device: str = "cpu"

    def describe(self) -> str:
        return self.source or f"{self.architecture} + {self.weights}"


@dataclass(frozen=True)
class ScoreJob:
    url: str
    out: str
    model: ModelSpec
    batch_size: int
    caption_key: str
    threads: int


_LOADED: dict[ModelSpec, Any] = {}  # one model per worker process


def _model(spec: ModelSpec):
    if spec not in _LOADED:
        from clipforge.evaluation.loading import load_eval_model

        _LOADED[spec] = load_eval_model(spec.source, spec.architecture, spec.weights, spec.device)
    return _LOADED[spec]


def teacher_info(spec: ModelSpec) -> dict[str, Any]:
    """What ``teacher.json`` records: the model, embedding width, logit scale and temperature (None if unknown)."""
    loaded = _model(spec)
    module = getattr(loaded.encoder, "model", None)
    log_scale = getattr(module, "logit_scale", None)
    scale = float(torch.as_tensor(log_scale).detach().exp()) if log_scale is not None else None
    with torch.no_grad():
        width = loaded.encoder.encode_text(loaded.tokenizer(["a"])).shape[1]
    return {
        "model": spec.describe(),
        "kind": loaded.kind,
        "embed_dim": int(width),
        "logit_scale": scale,
        "temperature": 1.0 / scale if scale else None,
    }


def _embed(loaded, images: list[torch.Tensor], captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        image = loaded.encoder.encode_image(torch.stack(images))
        text = loaded.encoder.encode_text(loaded.tokenizer(captions))
    return image.float().cpu().numpy(), text.float().cpu().numpy()


def score_shard(job: ScoreJob) -> dict[str, Any]:
    """Embed one shard's samples; write its embeddings and its part of the table. Returns counts and timing."""
    torch.set_num_threads(job.threads)
    started = time.monotonic()
    loaded = _model(job.model)
    counter = SkipCounter()
    name = shard_name(job.url)
    rows: list[dict[str, Any]] = []
    images: list[torch.Tensor] = []
    image_parts, text_parts = [], []
    with open_shard(job.url) as stream:
        for sample in read_tar(job.url, stream, counter):
            where = f"{job.url}:{sample['__key__']}"
            extension = image_member(sample, where, counter)
            if extension is None:
                continue
            try:
                caption = read_caption(sample, job.caption_key, random.Random(sample["__key__"]))
            except CaptionProblem as problem:
                counter.skip(problem.kind, where, problem.detail)
                continue
            if not caption:
                counter.skip("empty_caption", where)
                continue
            try:
                picture = decode_rgb(sample[extension])
            except Exception as exn:  # decoders raise many types for corrupt data
                counter.skip("corrupt_image", where, decode_error(exn))
                continue
            images.append(loaded.transform(picture))
            words = len(caption.split())
            rows.append(
                dict(key=sample["__key__"], shard=name, row=len(rows), caption=caption, caption_words=words)
                | dict(caption_chars=len(caption), width=picture.width, height=picture.height)
            )
            if len(images) == job.batch_size:
                image, text = _embed(loaded, images, [r["caption"] for r in rows[-len(images) :]])
                image_parts.append(image)
                text_parts.append(text)
                images = []
    if images:
        image, text = _embed(loaded, images, [r["caption"] for r in rows[-len(images) :]])
        image_parts.append(image)
        text_parts.append(text)
    image = np.concatenate(image_parts) if image_parts else np.zeros((0, 0), np.float32)
    text = np.concatenate(text_parts) if text_parts else np.zeros((0, 0), np.float32)
    table = pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "score"])
    table.insert(3, "score", (image * text).sum(axis=1).astype(np.float32) if len(rows) else np.float32())
    out = Path(job.out)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    temporary = out / "parts" / f"{name}.parquet.tmp"
    table.to_parquet(temporary, index=False)
    os.replace(temporary, out / "parts" / f"{name}.parquet")
    write_shard_embeddings(out, name, [r["key"] for r in rows], image, text)  # its keys file marks the shard done
    return {"shard": name, "samples": len(rows), "seconds": time.monotonic() - started, "skipped": dict(counter.counts)}


def _check_teacher(out: Path, info: dict[str, Any]) -> None:
    path = out / "teacher.json"
    if path.is_file():
        earlier = json.loads(path.read_text())
        if earlier.get("model") != info["model"] or earlier.get("embed_dim") != info["embed_dim"]:
            raise ValueError(
                f"{path}: {out} holds embeddings of {earlier.get('model')!r} (width {earlier.get('embed_dim')}), "
                f"not of {info['model']!r}; score into another --out"
            )
    write_json(path, info)


def score_shards(
    shards: str,
    out: str,
    model: ModelSpec,
    batch_size: int = 256,
    num_workers: int = 2,
    caption_key: str = "txt",
    progress: bool = True,
) -> dict[str, Any]:
    """Score every shard not scored yet; then write ``scores.parquet`` over all of them. Returns a summary."""
    if batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    directory = check_output_folder(out)  # before the model is loaded
    urls = [str(path) for path in shard_paths(shards)]
    names = [shard_name(url) for url in urls]
    repeated = [name for name, count in Counter(names).items() if count > 1]
    if repeated:
        raise ValueError(f"{shards}: two shards named {repeated[0]}: embeddings are stored by shard name")
    directory.mkdir(parents=True, exist_ok=True)
    _check_teacher(directory, teacher_info(model))
    todo = [url for url, name in zip(urls, names) if not _scored(directory, name)]
    threads = max(1, (os.cpu_count() or 1) // max(1, num_workers))
    jobs = (ScoreJob(url, out, model, batch_size, caption_key, threads) for url in todo)
    started, images, skipped = time.monotonic(), 0, Counter()
    bar = tqdm(total=len(todo), desc="score", unit="shard", disable=not progress)
    for result in run_jobs(jobs, score_shard, num_workers):
        images += result["samples"]
        skipped.update(result["skipped"])
        bar.update(1)
        bar.set_postfix(images_per_s=f"{images / max(time.monotonic() - started, 1e-9):.0f}")
    bar.close()
    elapsed = time.monotonic() - started
    table = pd.concat([pd.read_parquet(directory / "parts" / f"{name}.parquet") for name in names], ignore_index=True)
    temporary = directory / "scores.parquet.tmp"
    table.to_parquet(temporary, index=False)
    os.replace(temporary, directory / "scores.parquet")
    return {
        "shards": len(urls),
        "scored_now": len(todo),
        "samples": len(table),
        "images_per_s": round(images / elapsed, 1) if images and elapsed > 0 else None,
        "skipped": dict(skipped),
        "mean_score": None if table.empty else round(float(table["score"].mean()), 4),
        "out": str(directory),
    }


def _scored(directory: Path, name: str) -> bool:
    return shard_done(directory, name) and (directory / "parts" / f"{name}.parquet").is_file()


def score_histogram(scores: np.ndarray, bins: int = 20) -> dict[str, Any]:
    """Counts of CLIP scores in ``bins`` equal bins over [min, max] (for data cards)."""
    if len(scores) == 0:
        return {"edges": [], "counts": []}
    low, high = float(np.min(scores)), float(np.max(scores))
    if math.isclose(low, high):
        high = low + 1e-6
    counts, edges = np.histogram(scores, bins=bins, range=(low, high))
    return {"edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in counts]}
