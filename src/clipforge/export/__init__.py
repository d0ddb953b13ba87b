"""Export: open_clip ⇄ transformers conversion, the open_clip folder, model cards, Hub upload.

    clipforge export runs/demo/checkpoints/latest --format hf --out exported/demo [--push org/name]

``export_model(built, out, formats, card)`` writes a folder that ``CLIPModel.from_pretrained`` /
``pipeline("zero-shot-image-classification")`` (format "hf") and
``open_clip.create_model_and_transforms("local-dir:...")`` (format "open_clip") load as it is,
with a README.md model card and ``clipforge_export.json`` (what was exported, from where, notes).
The folder is written beside ``out`` and renamed into place; an existing ``out`` is replaced
only if it is an earlier clipforge export. ``push_to_hub`` uploads it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from clipforge.checkpoints import with_process_umask
from clipforge.export.card import CardInfo, find_eval_results, model_card
from clipforge.export.convert import Converted, load_transformers_folder, to_transformers
from clipforge.export.folders import write_open_clip, write_transformers
from clipforge.export.hub import MARKER, push_to_hub
from clipforge.export.towers import CannotConvert
from clipforge.models import BuiltModel

FORMATS = ("hf", "open_clip")

__all__ = [
    "FORMATS",
    "CannotConvert",
    "CardInfo",
    "Converted",
    "export_model",
    "find_eval_results",
    "load_transformers_folder",
    "push_to_hub",
    "to_transformers",
    "write_open_clip",
    "write_transformers",
]


def export_model(
    built: BuiltModel, out: str | Path, formats: tuple[str, ...] | list[str] = ("hf",), card: CardInfo | None = None
) -> dict[str, Any]:
    """Write ``built`` in ``formats`` into ``out``; returns the summary also saved as clipforge_export.json."""
    unknown = set(formats) - set(FORMATS)
    if unknown or not formats:
        raise ValueError(f"export formats must be among {FORMATS}, got {list(formats)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise FileExistsError(f"{out} exists and is not a clipforge export folder; choose another output directory")
    staging = out.parent / f".{out.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        written = [write_transformers(built, staging)] if "hf" in formats else []  # may refuse: before any file
        if "open_clip" in formats:
            written.append(write_open_clip(built, staging))
        family = written[0].get("family") if "hf" in formats else None
        notes = [note for item in written for note in item["notes"]]
        card = card or CardInfo(name=out.name)
        model_card(built, card, list(formats), family, notes).save(staging / "README.md")
        summary = {
            "formats": list(formats),
            "architecture": built.architecture,
            "source": card.source,
            "eval_results": card.eval_source,
            "written": written,
            "notes": notes,
            "files": sorted(path.name for path in staging.iterdir()) + [MARKER],
        }
        (staging / MARKER).write_text(json.dumps(summary, indent=1) + "\n")
        with_process_umask(*(path for path in staging.rglob("*") if path.is_file()))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return summary
