"""Checking shards: ``inspect_shards`` reads shards (ours, img2dataset's, anyone's) exactly as training reads them
(``samples.read_tar`` and ``samples.SampleDecoder``: the same tar reader, caption rule, image decoder and pixel
limit), and reports counts, problems by kind under training's names (``samples.SKIP_KINDS``, each with its first
example), caption-length and image-size histograms, and whether ``sizes.json`` matches, into ``_stats.json`` beside
them (writing ``sizes.json`` when there is none). Entry point: ``clipforge prep inspect DIR`` (or
``data_prep/inspect_shards.py``).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import braceexpand
from tqdm import tqdm

from clipforge.data.images import DEFAULT_MAX_PIXELS, ImageTransform, open_image
from clipforge.data.prep import run_jobs
from clipforge.data.prep_output import write_json
from clipforge.data.samples import SampleDecoder, SkipCounter, read_tar
from clipforge.data.sources import open_shard

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # what tarfile's "r|*" (the training reader) opens
_SIDE_EDGES = (32, 64, 128, 256, 512, 1024, 2048)
_WORD_EDGES = (2, 4, 8, 16, 32, 64, 128)
_ASPECT_EDGES = (0.5, 0.75, 0.95, 1.05, 1.33, 2.0)


def histogram_labels(edges: tuple[float, ...]) -> list[str]:
    """Bin labels for edges (a, b, ...): ``<a``, ``a-b`` (integer edges: ``a-(b-1)``), …, ``>=last``."""

    def span(low: float, high: float) -> str:
        return (
            f"{low}-{high - 1}"
            if isinstance(high, int) and high - 1 > low
            else (f"{low}" if isinstance(high, int) else f"{low}-{high}")
        )

    return [f"<{edges[0]}"] + [span(a, b) for a, b in zip(edges, edges[1:], strict=False)] + [f">={edges[-1]}"]


def _bin(value: float, edges: tuple[float, ...]) -> int:
    return sum(value >= edge for edge in edges)


@dataclass
class ShardReport:
    """What one shard holds."""

    shard: str
    samples: int = 0
    valid: int = 0
    problems: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    extensions: Counter = field(default_factory=Counter)
    words: list[int] = field(default_factory=lambda: [0] * (len(_WORD_EDGES) + 1))
    sides: list[int] = field(default_factory=lambda: [0] * (len(_SIDE_EDGES) + 1))
    aspects: list[int] = field(default_factory=lambda: [0] * (len(_ASPECT_EDGES) + 1))
    chars_total: int = 0
    chars_max: int = 0
    width_range: list[int] = field(default_factory=list)
    height_range: list[int] = field(default_factory=list)

    def problem(self, kind: str, where: str) -> None:
        self.problems[kind] += 1
        self.examples.setdefault(kind, where)

    def add(self, caption: str, extension: str, width: int, height: int) -> None:
        self.valid += 1
        self.extensions[extension] += 1
        self.words[_bin(len(caption.split()), _WORD_EDGES)] += 1
        self.chars_total += len(caption)
        self.chars_max = max(self.chars_max, len(caption))
        self.sides[_bin(min(width, height), _SIDE_EDGES)] += 1
        self.aspects[_bin(width / height, _ASPECT_EDGES)] += 1
        for bounds, value in ((self.width_range, width), (self.height_range, height)):
            bounds[:] = [min(bounds[0], value), max(bounds[1], value)] if bounds else [value, value]


def inspect_shard(url: str, caption_key: str = "txt", max_pixels: int = DEFAULT_MAX_PIXELS) -> ShardReport:
    """Read one shard as training does and check every sample (its image decoded in full, its caption read)."""
    report = ShardReport(Path(url).name)
    counter = SkipCounter()
    # Decoded as training decodes it; the resize after it (torch) is left out: it takes any decoded crop.
    decode = SampleDecoder(ImageTransform(size=(64, 64), train=False, max_pixels=max_pixels).crop, caption_key)
    try:
        stream = open_shard(url)
    except Exception as exc:
        counter.skip("unreadable_shard", url, f"{type(exc).__name__}: {exc}")
    else:
        with stream:
            for sample in read_tar(url, stream, counter):
                report.samples += 1
                decoded = decode(sample, counter, random.Random(0))
                if decoded is not None:
                    width, height = open_image(sample[decoded[2]], max_pixels).size
                    report.add(decoded[1], decoded[2], width, height)
    for kind, count in counter.counts.items():
        report.problems[kind] += count
        report.examples[kind] = counter.first[kind]
    return report


def shard_paths(urls_or_dir: str | Path) -> list[Path]:
    """The ``*.tar`` files of a directory, or a brace-expanded list of local shard paths."""
    path = Path(urls_or_dir)
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.name.endswith(SHARD_SUFFIXES))
        if not shards:
            raise FileNotFoundError(f"{path}: no .tar shards in this directory ({', '.join(SHARD_SUFFIXES)})")
        return shards
    shards = [Path(url) for url in braceexpand.braceexpand(str(urls_or_dir))]
    if not any(shard.exists() for shard in shards):
        raise FileNotFoundError(f"{urls_or_dir}: no such shard or directory")
    return shards


def _histogram(values: list[int], edges: tuple[float, ...]) -> dict[str, int]:
    return dict(zip(histogram_labels(edges), values, strict=True))


def inspect_shards(
    urls_or_dir: str | Path,
    write_stats: bool = True,
    num_workers: int = 2,
    progress: bool = False,
    caption_key: str = "txt",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """Check every sample of some shards; returns the report and (``write_stats``) stores it as ``"inspect"`` in
    ``_stats.json`` beside the first shard, keeping what is there, and writes ``sizes.json`` if there is none.

    ``ok`` is true when there is no problem: the shards hold samples (shards that read well and hold none are the
    problem ``empty``), every shard reads to its end, and training would keep every sample (``caption_key`` and
    ``max_pixels`` as ``data.caption_key`` and ``data.max_image_pixels``); and ``sizes.json`` (if present) matches
    the shards.
    """
    shards = shard_paths(urls_or_dir)
    check = partial(inspect_shard, caption_key=caption_key, max_pixels=max_pixels)
    reports = list(
        tqdm(
            run_jobs((str(p) for p in shards), check, num_workers),
            total=len(shards),
            unit="shard",
            desc="inspecting",
            disable=not progress,
        )
    )
    reports.sort(key=lambda report: report.shard)
    total = ShardReport("")
    for report in reports:
        total.samples += report.samples
        total.valid += report.valid
        total.problems.update(report.problems)
        for kind, where in report.examples.items():
            total.examples.setdefault(kind, where)
        total.extensions.update(report.extensions)
        for mine, theirs in ((total.words, report.words), (total.sides, report.sides), (total.aspects, report.aspects)):
            mine[:] = [a + b for a, b in zip(mine, theirs, strict=True)]
        total.chars_total += report.chars_total
        total.chars_max = max(total.chars_max, report.chars_max)
        for mine, theirs in ((total.width_range, report.width_range), (total.height_range, report.height_range)):
            if theirs:
                mine[:] = [min(mine[0], theirs[0]), max(mine[1], theirs[1])] if mine else list(theirs)
    directory = shards[0].parent
    if not total.samples and not total.problems:  # shards that read well, holding nothing to train on
        total.problem("empty", f"{len(shards)} shard{'s' if len(shards) > 1 else ''} hold no samples")
    counts = {report.shard: report.samples for report in reports}
    sizes_json = _check_sizes(directory / "sizes.json", counts, total)
    result = {
        "shards": len(reports),
        "samples": total.samples,
        "valid": total.valid,
        "ok": not total.problems,
        "problems": dict(sorted(total.problems.items())),
        "examples": dict(sorted(total.examples.items())),
        "sizes_json": sizes_json,
        "extensions": dict(sorted(total.extensions.items())),
        "caption_words": _histogram(total.words, _WORD_EDGES),
        "caption_chars": {"mean": round(total.chars_total / max(total.valid, 1), 2), "max": total.chars_max},
        "image_shorter_side": _histogram(total.sides, _SIDE_EDGES),
        "image_aspect_ratio": _histogram(total.aspects, _ASPECT_EDGES),
        "image_width": dict(zip(("min", "max"), total.width_range, strict=False)),
        "image_height": dict(zip(("min", "max"), total.height_range, strict=False)),
        "per_shard": {
            r.shard: {"samples": r.samples, "valid": r.valid, **({"problems": dict(r.problems)} if r.problems else {})}
            for r in reports
        },
    }
    if write_stats:
        stats_path = directory / "_stats.json"
        try:
            stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
        except ValueError:
            stats = {}
        write_json(stats_path, {**(stats if isinstance(stats, dict) else {}), "inspect": result})
        if sizes_json == "absent" and not {"truncated_tar", "unreadable_shard"} & set(total.problems):
            write_json(directory / "sizes.json", counts)
            result["sizes_json"] = "written"
    return result


def _check_sizes(path: Path, counts: dict[str, int], total: ShardReport) -> str:
    if not path.is_file():
        return "absent"
    try:
        sizes = json.loads(path.read_text())
    except ValueError as exc:
        total.problem("sizes_json_mismatch", f"sizes.json does not parse: {exc}")
        return "mismatch"
    wrong = {name: (sizes.get(name), count) for name, count in counts.items() if sizes.get(name) != count}
    for name, (listed, found) in wrong.items():
        total.problem("sizes_json_mismatch", f"sizes.json says {listed} samples in {name}, it holds {found}")
    return "mismatch" if wrong else "matches"
