"""Reading the image–caption tables of ``clipforge prep table``: CSV, TSV, parquet and JSON lines.

``read_table`` returns the image and caption columns; the errors name the file (an empty file, a missing column,
text in another encoding, JSON that does not parse). A column of http(s) URLs is refused (``refuse_urls``) with the
img2dataset command that downloads them into shards, which train as they are: prep reads local files only.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

_TABLE_KINDS = {".parquet": "parquet", ".pq": "parquet", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_URL = re.compile(r"^\s*https?://", re.IGNORECASE)


def table_kind(path: Path) -> str:
    """How a table is read, by its suffix (img2dataset's ``--input_format`` names): parquet, tsv, jsonl (JSON lines),
    json (``.json``: JSON lines, or one array of records if it starts with ``[``), else csv."""
    kind = _TABLE_KINDS.get(path.suffix.lower(), "csv")
    if path.suffix.lower() == ".json":
        with open(path, "rb") as stream:
            kind = "json" if stream.read(4096).lstrip().startswith(b"[") else "jsonl"
    return kind


def read_table(
    path: str | Path, image_column: str, caption_column: str, encoding: str = "utf-8"
) -> tuple[list[Any], list[Any]]:
    """The image and caption columns of a table (see ``table_kind``; text in ``encoding``). A column of http(s)
    URLs is refused with a pointer to img2dataset, which downloads them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such table file")
    kind = table_kind(path)
    try:
        images, captions = _read_columns(path, kind, image_column, caption_column, encoding)
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path}: not {encoding} text ({exc.reason}: byte 0x{exc.object[exc.start]:02x} at offset "
            f"{exc.start}); give the file's encoding with --encoding, e.g. --encoding latin-1 or "
            "--encoding cp1252"
        ) from None
    except LookupError as exc:  # an unknown codec name
        raise ValueError(f"{path}: --encoding {encoding!r}: {exc}") from None
    refuse_urls(
        images, str(path), image_column, caption_column, f"--url_list {shlex.quote(str(path))} --input_format {kind}"
    )
    return images, captions


def _read_columns(
    path: Path, kind: str, image_column: str, caption_column: str, encoding: str
) -> tuple[list[Any], list[Any]]:
    import pandas as pd
    import pyarrow
    import pyarrow.parquet

    frame = None
    try:
        if kind == "parquet":
            columns = list(pyarrow.parquet.read_schema(path).names)
        elif kind in ("json", "jsonl"):
            frame = pd.read_json(path, lines=kind == "jsonl", dtype=False, encoding=encoding)
            columns = list(frame.columns)
        else:
            csv_options = {"sep": "\t" if kind == "tsv" else ",", "encoding": encoding}
            columns = list(pd.read_csv(path, nrows=0, **csv_options).columns)
    except pd.errors.EmptyDataError:
        raise ValueError(
            f"{path}: empty, without the header row that names its columns (expected {image_column!r} and "
            f"{caption_column!r})"
        ) from None
    except pyarrow.ArrowException as exc:
        raise ValueError(f"{path}: not a parquet file ({exc})") from None
    except ValueError as exc:
        if isinstance(exc, UnicodeDecodeError):
            raise
        raise ValueError(
            f"{path}: not {'JSON lines' if kind == 'jsonl' else 'a JSON array of records'} ({exc})"
        ) from None
    for role, column in (("image", image_column), ("caption", caption_column)):
        if column not in columns:
            raise ValueError(f"{path}: no {role} column {column!r} (columns: {', '.join(map(str, columns))})")
    wanted = list(dict.fromkeys([image_column, caption_column]))
    if kind == "parquet":
        frame = pd.read_parquet(path, columns=wanted)
    elif frame is None:
        frame = pd.read_csv(path, usecols=wanted, dtype=str, keep_default_na=False, **csv_options)
    return frame[image_column].tolist(), frame[caption_column].tolist()


def refuse_urls(
    values: list[Any], where: str, image_column: str, caption_column: str, url_list: str, note: str = ""
) -> None:
    """One line pointing to img2dataset when image cells are http(s) URLs, which prep does not download.

    ``url_list``: img2dataset's options that name the input (``--url_list FILE --input_format KIND``); ``note``: how
    to make that input, if it is not there yet."""
    urls = [index for index, value in enumerate(values) if isinstance(value, str) and _URL.match(value)]
    if urls:
        command = (
            f"img2dataset {url_list} --url_col {shlex.quote(image_column)} --caption_col "
            f"{shlex.quote(caption_column)} --output_format webdataset --output_folder SHARDS"
        )
        raise ValueError(
            f"{where}: image column {image_column!r} holds URLs ({len(urls)} of {len(values)} rows, e.g. row "
            f"{urls[0]}: {values[urls[0]].strip()}), and prep reads local files only; download them with img2dataset "
            f"({note}{command}) and train on its shards directly (data.sources: SHARDS/{{00000..NNNNN}}.tar)"
        )
