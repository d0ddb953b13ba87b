"""Per-image predictions of one evaluated dataset, written as CSV or JSON Lines (``clipforge eval --predictions``).

Classification (zero-shot or linear probe), one row per image, in the split's order::

    {"index": 0, "id": "s0_000", "label": 3, "label_name": "circle",
     "top_labels": [3, 1, ...], "top_names": ["circle", "square", ...], "top_scores": [0.31, 0.27, ...]}

``id`` is the sample's webdataset key, its path under the split folder (image folders) or its row number
(HF datasets); ``label`` is the true class index, ``top_labels`` the k best classes, best first. A score is the
cosine similarity of the image and the class text embedding (zero-shot) or the logistic regression's decision
value (linear probe; null for a class the probe never saw). Top-1 accuracy is the fraction of rows whose
``top_labels[0]`` is ``label``.

Retrieval, one row per caption (text→image) and then one per image (image→text)::

    {"direction": "text_to_image", "query": "s0_000#0", "text": "a red circle", "relevant": ["s0_000"],
     "top_ids": ["s0_000", "s0_042", ...], "top_scores": [0.41, 0.38, ...]}
    {"direction": "image_to_text", "query": "s0_000", "text": "", "relevant": ["s0_000#0", ...], ...}

A caption's id is its image's id, ``#`` and its number among that image's captions (from 0); ``relevant`` lists
the ids that count as a hit; scores are cosine similarities. Recall@1 in a direction is the fraction of its rows
whose ``top_ids[0]`` is in ``relevant``.

CSV holds the same fields, the lists spread over numbered columns (``top1_label, top1_name, top1_score,
top2_label, ...``; ``top1_id, top1_score, ...``) and ``relevant`` joined by spaces. A text cell that begins with
``=``, ``+``, ``-``, ``@``, a tab or a carriage return (a caption, a class name, an id) gets a leading ``'``, as
OWASP's CSV-injection guidance says, so that a spreadsheet shows it as text instead of running it as a formula;
JSON Lines keep every text as it is.

``check_destination`` refuses, before the evaluation runs, a file or folder that cannot be written (a folder
where the file goes, a file where a folder goes, no permission, a read-only filesystem), so that no result is
computed and then lost.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import torch

SUFFIXES = (".csv", ".jsonl")
# per kind of row: the list fields spread over numbered CSV columns, and their column names
RANKED_FIELDS = {
    "classification": {"top_labels": "label", "top_names": "name", "top_scores": "score"},
    "retrieval": {"top_ids": "id", "top_scores": "score"},
}


# OWASP, CSV injection: cells starting with these are formulas (or become one) in spreadsheet programs
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def check_path(path: str | Path) -> Path:
    """The predictions file, refused unless its extension says CSV or JSON Lines and it can be written
    (``check_destination``)."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"predictions file {path}: the extension must be .csv or .jsonl, got {path.suffix!r}")
    check_destination(path, "--predictions")
    return path


def check_destination(path: str | Path, what: str, folder: bool = False) -> None:
    """A ValueError naming ``what`` (the option) and the path unless ``path`` can be written: a file (or with
    ``folder``, a folder) that exists and is writable, or one that can be created, the folders above it included.
    Nothing is created."""
    path = Path(path)
    if path.exists():
        if folder and not path.is_dir():
            raise ValueError(f"{what} {path}: is a file, not a folder")
        if not folder and path.is_dir():
            raise ValueError(f"{what} {path}: is a folder; give a file name")
        if not os.access(path, os.W_OK | (os.X_OK if folder else 0)):
            raise ValueError(f"{what} {path}: cannot be written ({_why_not_writable(path)})")
        return
    above = path.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise ValueError(f"{what} {path}: {above} is a file, so no folder can be made under it")
    if not os.access(above, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: nothing can be created in {above} ({_why_not_writable(above)})")


def _why_not_writable(path: Path) -> str:
    try:
        return "read-only filesystem" if os.statvfs(path).f_flag & os.ST_RDONLY else "permission denied"
    except OSError as exc:
        return exc.strerror or "not accessible"


def csv_cell(value):
    """``value`` as a CSV cell: text that a spreadsheet would run as a formula gets a leading ``'``."""
    return f"'{value}" if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def _score(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None  # 6 decimals: the float32 cosines carry ~7 digits


@torch.no_grad()
def classification_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    classnames: list[str] | None,
    ids: list[str],
    k: int = 5,
    scale=1.0,
    positions: list[int] | None = None,
) -> list[dict]:
    """Rows from (N, C) logits (ranked as the metrics rank them) and (N,) labels; a score is ``logit / scale``;
    ``positions``: each row's position in the split (0 to N - 1 when left out; the scored images' own when some
    were skipped)."""
    values, indices = logits.topk(min(k, logits.shape[1]), dim=1)  # (N, k)
    names = classnames or [str(index) for index in range(logits.shape[1])]
    low, high = (int(labels.min()), int(labels.max())) if len(labels) else (0, 0)
    if len(names) != logits.shape[1] or low < 0 or high >= len(names):  # load_benchmark refuses these earlier
        raise ValueError(
            f"{len(names)} class names for {logits.shape[1]} classes (labels {low} to {high}): one name per class"
        )
    rows = []
    for index, (label, top, top_values) in enumerate(zip(labels.tolist(), indices.tolist(), values.tolist())):
        rows.append(
            {
                "index": index if positions is None else positions[index],
                "id": ids[index],
                "label": label,
                "label_name": names[label],
                "top_labels": top,
                "top_names": [names[c] for c in top],
                "top_scores": [_score(value / scale) for value in top_values],
            }
        )
    return rows


@torch.no_grad()
def retrieval_rows(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    caption_image: torch.Tensor,
    texts: list[str],
    image_ids: list[str],
    k: int = 5,
    chunk: int = 1024,
) -> list[dict]:
    """Rows from (N_images, D) and (N_texts, D) normalised embeddings; caption_image (N_texts,) is each caption's
    image. Both directions rank by the one ``text_features @ image_features.T`` matrix the metrics rank by."""
    caption_ids, captions_of = [], [[] for _ in image_ids]
    for image in caption_image.tolist():
        caption_ids.append(f"{image_ids[image]}#{len(captions_of[image])}")
        captions_of[image].append(caption_ids[-1])
    scores = text_features @ image_features.T  # (N_texts, N_images)
    rows = []
    for start in range(0, len(text_features), chunk):
        values, indices = scores[start : start + chunk].topk(min(k, scores.shape[1]), dim=1)
        for offset, (top, top_values) in enumerate(zip(indices.tolist(), values.tolist())):
            text = start + offset
            rows.append(
                {
                    "direction": "text_to_image",
                    "query": caption_ids[text],
                    "text": texts[text],
                    "relevant": [image_ids[caption_image[text]]],
                    "top_ids": [image_ids[image] for image in top],
                    "top_scores": [_score(value) for value in top_values],
                }
            )
    for start in range(0, len(image_features), chunk):
        values, indices = scores.T[start : start + chunk].topk(min(k, scores.shape[0]), dim=1)
        for offset, (top, top_values) in enumerate(zip(indices.tolist(), values.tolist())):
            image = start + offset
            rows.append(
                {
                    "direction": "image_to_text",
                    "query": image_ids[image],
                    "text": "",
                    "relevant": captions_of[image],
                    "top_ids": [caption_ids[text] for text in top],
                    "top_scores": [_score(value) for value in top_values],
                }
            )
    return rows


def _csv_row(row: dict, ranked: dict[str, str]) -> dict:
    flat = {key: value for key, value in row.items() if key not in ranked}
    if "relevant" in flat:
        flat["relevant"] = " ".join(flat["relevant"])
    for rank in range(len(row["top_scores"])):
        for key, column in ranked.items():
            value = row[key][rank]
            flat[f"top{rank + 1}_{column}"] = "" if value is None else value
    return {key: csv_cell(value) for key, value in flat.items()}


def write_predictions(rows: list[dict], path: str | Path) -> Path:
    """Write rows (all of one kind) as CSV or JSON Lines, as the extension says (see the module docstring)."""
    path = check_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".jsonl":
        with open(path, "w", encoding="utf-8") as stream:
            for row in rows:
                stream.write(json.dumps(row, ensure_ascii=False) + "\n")
        return path
    ranked = RANKED_FIELDS["retrieval" if rows and "direction" in rows[0] else "classification"]
    flat = [_csv_row(row, ranked) for row in rows]
    columns = list(dict.fromkeys(key for row in flat for key in row))  # every row's columns, in first-seen order
    with open(path, "w", encoding="utf-8", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(flat)
    return path
