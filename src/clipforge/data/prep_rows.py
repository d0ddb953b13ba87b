"""One input row of ``clipforge prep`` → one webdataset sample (the shards it goes into: ``clipforge.data.prep``).

A row (``Row``) is its position in the input, an image (a file path or the encoded bytes) and a caption, as a
table (``clipforge.data.tables``) or a Hugging Face dataset gives them; ``RowList`` and ``DatasetRows`` are the
rows of one shard as they are shipped to a writer process. ``make_sample`` turns a row into the sample stored
(``KEY.jpg|png|webp``, ``KEY.txt``, ``KEY.json``, and ``KEY.cls`` for a row with a class label), or raises
``SkipRow`` naming the kind of problem (a missing image or file, an undecodable image, a decompression bomb, an empty
caption) for the writer to count. ``WriteOptions`` are a prep run's settings: the encoding here reads ``resize_to``
and ``jpeg_quality``, the shard writer the others.

Images are stored as their original bytes (extension from the decoded format; formats other than
JPEG, PNG and WebP are re-encoded as PNG). With ``resize_to=N`` they are resized so the shorter side
is N pixels, aspect ratio kept, up or down (img2dataset's ``keep_ratio``), and re-encoded as JPEG
(quality 95), after the training stream's rule (``clipforge.data.images.to_rgb``): EXIF orientation
applied, transparency over white, 16-bit greyscale scaled.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from clipforge.data.images import DecompressionBomb, decode_error, open_image, to_rgb

_STORED_AS_IS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass(frozen=True)
class WriteOptions:
    """How input rows become shards, whatever the source."""

    samples_per_shard: int | None = None
    """Input rows per shard (a shard holds fewer samples where rows are skipped); None = auto: enough shards for
    many readers (see ``auto_samples_per_shard``)."""
    resize_to: int | None = None
    """Shorter side in pixels (aspect ratio kept, re-encoded as JPEG); None stores the original bytes."""
    jpeg_quality: int = 95
    """JPEG quality when re-encoding resized images."""
    num_workers: int = 2
    """Writer processes; 0 or 1 writes in this process."""
    overwrite: bool = False
    """Replace the shards (and their stats, sizes.json, _stats.json) an earlier run wrote in the output directory."""

    def check(self) -> None:
        if self.samples_per_shard is not None and self.samples_per_shard <= 0:
            raise ValueError(f"samples_per_shard must be positive, got {self.samples_per_shard}")
        if self.resize_to is not None and self.resize_to <= 0:
            raise ValueError(f"resize_to must be positive, got {self.resize_to}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")


@dataclass(frozen=True)
class Row:
    """One input row as the shard writer sees it."""

    index: int
    """Position in the input (0-based)."""
    image: str | bytes | None
    """A file path or the encoded image."""
    caption: Any
    url: str
    """Where the image came from, as the input names it (kept as ``url`` in ``KEY.json``)."""
    label: int | None = None
    """The class index of a labelled set's sample (``prep labelled``), stored as ``KEY.cls``; None: no ``.cls``."""


@dataclass
class RowList:
    """Rows shipped to the worker as they are."""

    rows: list[Row]

    def __iter__(self) -> Iterator[Row]:
        return iter(self.rows)


@dataclass
class DatasetRows:
    """Rows ``start:stop`` of a Hugging Face dataset, read in the worker (memory-mapped datasets pickle by path)."""

    dataset: Any
    image_column: str
    caption_column: str
    start: int
    stop: int

    def __iter__(self) -> Iterator[Row]:
        for offset in range(self.start, self.stop, 256):
            batch = self.dataset[offset : min(offset + 256, self.stop)]
            cells = zip(batch[self.image_column], batch[self.caption_column], strict=True)
            for index, (value, caption) in enumerate(cells, start=offset):
                image, url = image_reference(value, None)
                yield Row(index, image, caption, url)


class SkipRow(Exception):
    """A row that cannot be used: ``kind`` is what the writer counts it as, ``detail`` what it logs."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind, self.detail = kind, detail


# ---------------------------------------------------------------------------------------------------- one sample


def caption_text(value: Any) -> str:
    """The caption of a cell: strings stripped, None/NaN empty, a list gives its first non-empty string."""
    if isinstance(value, (list, tuple)):
        value = next((v for v in value if isinstance(v, str) and v.strip()), "")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return str(value).strip()


def image_reference(value: Any, root: Path | None) -> tuple[str | bytes | None, str]:
    """(path or bytes, url) from a cell: a path string, raw bytes, or a ``{"bytes", "path"}`` dict."""
    if isinstance(value, dict):
        path = value.get("path") or ""
        if value.get("bytes"):
            return value["bytes"], path
        value = path
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), ""
    if value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip():
        return None, ""
    path = Path(str(value)).expanduser()
    if root is not None and not path.is_absolute():
        path = root / path
    return str(path), str(value)


def _read_image(row: Row) -> bytes:
    if row.image is None:
        raise SkipRow("missing_image", "no image in this row")
    if isinstance(row.image, bytes):
        return row.image
    try:
        return Path(row.image).read_bytes()
    except OSError as exc:
        raise SkipRow("missing_file", f"{row.image}: {exc.strerror or exc}") from None


def shorter_side_size(width: int, height: int, side: int) -> tuple[int, int]:
    """(width, height) scaled so the shorter side is ``side``, aspect ratio kept."""
    scale = side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def encode_image(data: bytes, options: WriteOptions) -> tuple[str, bytes, dict[str, int]]:
    """(extension, bytes to store, sizes) for an image file; raises ``SkipRow`` when it does not decode."""
    try:
        with open_image(data) as image:
            original = image.size
            if options.resize_to is not None and image.format == "JPEG":
                image.draft("RGB", shorter_side_size(*image.size, options.resize_to))  # DCT scaling: faster
            image.load()  # a full decode: truncated or corrupt files fail here, not in training
            if options.resize_to is None:
                sizes = {"width": image.width, "height": image.height}
                extension = _STORED_AS_IS.get(image.format or "")
                if extension:
                    return extension, data, {**sizes, "original_width": original[0], "original_height": original[1]}
                buffer = io.BytesIO()
                keep = image if image.mode in ("RGB", "RGBA", "L", "LA") else to_rgb(image)  # the stream's rule
                keep.save(buffer, format="PNG")
                return (
                    "png",
                    buffer.getvalue(),
                    {**sizes, "original_width": original[0], "original_height": original[1]},
                )
            upright = to_rgb(ImageOps.exif_transpose(image))  # the stream's rule: what a viewer shows
    except DecompressionBomb as exc:
        raise SkipRow("decompression_bomb", str(exc)) from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise SkipRow("corrupt_image", decode_error(exc)) from None
    size = shorter_side_size(*upright.size, options.resize_to)
    if size != upright.size:
        upright = upright.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    buffer = io.BytesIO()
    upright.save(buffer, format="JPEG", quality=options.jpeg_quality)
    return (
        "jpg",
        buffer.getvalue(),
        {
            "width": upright.width,
            "height": upright.height,
            "original_width": original[0],
            "original_height": original[1],
        },
    )


def make_sample(row: Row, key: str, options: WriteOptions) -> dict[str, Any]:
    """The webdataset sample for a row; raises ``SkipRow`` (with its kind) for a row that cannot be used."""
    data = _read_image(row)
    caption = caption_text(row.caption)
    if not caption:
        raise SkipRow("empty_caption", "the caption is empty")
    extension, stored, sizes = encode_image(data, options)
    meta = {"key": key, "caption": caption, "url": row.url, "row": row.index, **sizes, "status": "success"}
    sample = {"__key__": key, extension: stored, "txt": caption}
    if row.label is not None:  # CLIP_benchmark's member for a class index
        meta["label"] = row.label
        sample["cls"] = str(row.label)
    return {**sample, "json": json.dumps(meta, ensure_ascii=False)}
