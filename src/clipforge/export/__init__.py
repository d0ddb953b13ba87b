"""Export: open_clip ⇄ transformers conversion, the open_clip folder, model cards, Hub upload.

    clipforge export runs/demo/checkpoints/latest --format hf --out exported/demo [--push org/name]
    clipforge export runs/vit/checkpoints/latest --towers text --out exported/vit-text-encoder

``export_model(built, out, formats, card, towers)`` writes a folder that ``CLIPModel.from_pretrained`` /
``pipeline("zero-shot-image-classification")`` (format "hf") and
``open_clip.create_model_and_transforms("local-dir:...")`` (format "open_clip") load as it is, or
with ``towers`` the text and/or image encoder alone in diffusers' subfolders (``text_encoder/`` +
``tokenizer/``, ``image_encoder/`` + ``feature_extractor/``), with a README.md model card and
``clipforge_export.json`` (what was exported, from where, notes).
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
from clipforge.export.folders import TOWER_FOLDERS, write_open_clip, write_transformers
from clipforge.export.hub import MARKER, push_to_hub
from clipforge.export.towers import CannotConvert
from clipforge.models import BuiltModel

FORMATS = ("hf", "open_clip")

__all__ = [
    "FORMATS",
    "TOWER_FOLDERS",
    "CannotConvert",
    "CardInfo",
    "Converted",
    "check_request",
    "export_model",
    "find_eval_results",
    "load_transformers_folder",
    "push_to_hub",
    "to_transformers",
    "write_open_clip",
    "write_transformers",
]


def check_request(formats: tuple[str, ...] | list[str], towers: tuple[str, ...] = ()) -> None:
    """``ValueError`` naming the values unless ``formats`` and ``towers`` make an export (checked before any work)."""
    if set(formats) - set(FORMATS) or not formats:
        raise ValueError(f"export formats must be among {FORMATS}, got {list(formats)}")
    if set(towers) - set(TOWER_FOLDERS):
        raise ValueError(f"towers must be among {tuple(TOWER_FOLDERS)}, got {list(towers)}")
    if towers and "hf" not in formats:
        raise ValueError(
            f"towers {list(towers)}: the encoders alone are transformers models, so the formats must include 'hf', "
            f"got {list(formats)}"
        )


def export_model(
    built: BuiltModel,
    out: str | Path,
    formats: tuple[str, ...] | list[str] = ("hf",),
    card: CardInfo | None = None,
    towers: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Write ``built`` in ``formats`` into ``out``; returns the summary also saved as clipforge_export.json.

    ``towers`` ("text", "image") makes the "hf" format write those encoders alone, in their subfolders, in place
    of the combined model."""
    check_request(formats, towers)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise FileExistsError(f"{out} exists and is not a clipforge export folder; choose another output directory")
    staging = out.parent / f".{out.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        # write_transformers refuses an architecture transformers lacks before writing any file
        written = [write_transformers(built, staging, tuple(towers))] if "hf" in formats else []
        if "open_clip" in formats:
            written.append(write_open_clip(built, staging))
        hf = written[0] if "hf" in formats else {}
        notes = [note for item in written for note in item["notes"]]
        card = card or CardInfo(name=out.name)
        readme = model_card(built, card, list(formats), hf.get("family"), notes, hf.get("towers"))
        readme.save(staging / "README.md")
        summary = {
            "formats": list(formats),
            "towers": list(towers),
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
