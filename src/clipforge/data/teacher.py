"""Per-sample teacher embeddings stored beside shards: the one format ``prep score`` writes and training reads.

A directory of embeddings holds, for each shard ``NAME.tar`` it covers:

- ``NAME.image.npy``, ``NAME.text.npy``: float16 (N, D) L2-normalised image and caption embeddings,
- ``NAME.keys.json``: the N sample keys, row i of both arrays belongs to key i,

plus ``teacher.json``: the model that made them, its embedding width, ``logit_scale`` and ``temperature``
(= 1 / logit_scale) when the model has one. Arrays are written under a temporary name and renamed, the keys file
last: a shard counts as done when its keys file exists.

``TeacherEmbeddings.lookup(url, key)`` is how training (``data.teacher``) reads them: by (shard file name, sample
key), so shuffling, skipped samples and resume cannot misalign an embedding with its sample. A sample without a row
is counted as ``missing_teacher`` (a skip kind, ``clipforge.data.samples``) and skipped, or stops the run under
``data.strict``.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

SHARD_SUFFIXES = (".tar.gz", ".tgz", ".tar")
OPEN_SHARDS = 8  # shards whose embeddings a reader keeps memory-mapped at once


def shard_name(url: str) -> str:
    """``.../00012.tar`` → ``00012``: the name embeddings files take after their shard."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    for suffix in SHARD_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _save_npy(path: Path, array: np.ndarray) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as stream:
        np.save(stream, array)
    os.replace(temporary, path)


def write_shard_embeddings(directory: Path, name: str, keys: list[str], image: np.ndarray, text: np.ndarray) -> None:
    """One shard's rows: image and text (N, D) stored as float16, keys file last (the completion mark)."""
    assert image.shape == text.shape and image.shape[0] == len(keys), (image.shape, text.shape, len(keys))
    directory.mkdir(parents=True, exist_ok=True)
    width = image.shape[1] if image.ndim == 2 else 0
    _save_npy(directory / f"{name}.image.npy", image.astype(np.float16).reshape(len(keys), width))
    _save_npy(directory / f"{name}.text.npy", text.astype(np.float16).reshape(len(keys), width))
    temporary = directory / f"{name}.keys.json.tmp"
    temporary.write_text(json.dumps(keys))
    os.replace(temporary, directory / f"{name}.keys.json")


def shard_done(directory: Path, name: str) -> bool:
    return (directory / f"{name}.keys.json").is_file()


def read_shard_embeddings(directory: Path, name: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(keys, image (N, D) float16, text (N, D) float16), memory-mapped; a length mismatch is an error."""
    keys = json.loads((directory / f"{name}.keys.json").read_text())
    image = np.load(directory / f"{name}.image.npy", mmap_mode="r")
    text = np.load(directory / f"{name}.text.npy", mmap_mode="r")
    if image.shape[0] != len(keys) or text.shape != image.shape:
        raise ValueError(
            f"{directory}/{name}: {len(keys)} keys but image {image.shape} and text {text.shape} embeddings"
        )
    return keys, image, text


def read_teacher_info(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "teacher.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no teacher.json (is {directory} a `clipforge prep score` output?)")
    return json.loads(path.read_text())


class TeacherEmbeddings:
    """Rows of a directory of embeddings by (shard url, key); a few shards memory-mapped at a time."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        info = read_teacher_info(self.directory)
        self.dim = int(info["embed_dim"])
        self._open: OrderedDict[str, tuple[dict[str, int], np.ndarray, np.ndarray] | None] = OrderedDict()

    def _shard(self, name: str) -> tuple[dict[str, int], np.ndarray, np.ndarray] | None:
        if name in self._open:
            self._open.move_to_end(name)
            return self._open[name]
        found = None
        if shard_done(self.directory, name):
            keys, image, text = read_shard_embeddings(self.directory, name)
            if image.shape[1] != self.dim:
                raise ValueError(
                    f"{self.directory}/{name}.image.npy: width {image.shape[1]}, teacher.json says {self.dim}"
                )
            found = ({key: row for row, key in enumerate(keys)}, image, text)
        self._open[name] = found
        if len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)
        return found

    def lookup(self, url: str, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(image (D,), text (D,)) float32 for the sample, or None when the directory has no row for it."""
        shard = self._shard(shard_name(url))
        if shard is None or key not in shard[0]:
            return None
        row = shard[0][key]
        return np.asarray(shard[1][row], dtype=np.float32), np.asarray(shard[2][row], dtype=np.float32)
