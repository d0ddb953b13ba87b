"""Checking shards: ``inspect_shards`` reads shards (ours, img2dataset's, anyone's) as a loader would, decodes every
image and caption, and reports counts, problems by kind (each with its first example), caption-length and image-size
histograms, and whether ``sizes.json`` matches, into ``_stats.json`` beside them (writing ``sizes.json`` when there is
none). Entry point: ``clipforge prep inspect DIR`` (or ``data_prep/inspect_shards.py``).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import braceexpand
from PIL import Image
from tqdm import tqdm

from clipforge.data.prep import IMAGE_EXTENSIONS, decode_error, run_jobs, write_json

_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # webdataset's base_plus_ext: key up to the first dot
_SIDE_EDGES = (32, 64, 128, 256, 512, 1024, 2048)
_WORD_EDGES = (2, 4, 8, 16, 32, 64, 128)
_ASPECT_EDGES = (0.5, 0.75, 0.95, 1.05, 1.33, 2.0)


def histogram_labels(edges: tuple[float, ...]) -> list[str]:
    """Bin labels for edges (a, b, ...): ``<a``, ``a-b`` (integer edges: ``a-(b-1)``), …, ``>=last``."""
    def span(low: float, high: float) -> str:
        return f"{low}-{high - 1}" if isinstance(high, int) and high - 1 > low else (
            f"{low}" if isinstance(high, int) else f"{low}-{high}")
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
        self.examples.setdefault(kind, f"{self.shard}: {where}" if self.shard else where)

    def add(self, key: str, files: dict[str, bytes]) -> None:
        self.samples += 1
        if "json" in files:
            try:
                json.loads(files["json"])
            except ValueError as exc:
                self.problem("invalid_json", f"{key}.json: {exc}")
        extension = next((e for e in IMAGE_EXTENSIONS if e in files), None)
        if extension is None:
            return self.problem("missing_image", f"{key}: no {'/'.join(IMAGE_EXTENSIONS)} member")
        try:
            with Image.open(io.BytesIO(files[extension])) as image:
                image.load()
                width, height = image.size
        except Exception as exc:  # PIL raises many types for bad data
            return self.problem("corrupt_image", f"{key}.{extension}: {decode_error(exc)}")
        if "txt" not in files:
            return self.problem("missing_caption", f"{key}: no .txt member")
        try:
            caption = files["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            return self.problem("bad_caption_encoding", f"{key}.txt: {exc}")
        if not caption:
            return self.problem("empty_caption", f"{key}.txt is empty")
        self.valid += 1
        self.extensions[extension] += 1
        self.words[_bin(len(caption.split()), _WORD_EDGES)] += 1
        self.chars_total += len(caption)
        self.chars_max = max(self.chars_max, len(caption))
        self.sides[_bin(min(width, height), _SIDE_EDGES)] += 1
        self.aspects[_bin(width / height, _ASPECT_EDGES)] += 1
        for bounds, value in ((self.width_range, width), (self.height_range, height)):
            bounds[:] = [min(bounds[0], value), max(bounds[1], value)] if bounds else [value, value]


def inspect_shard(path: str) -> ShardReport:
    """Read one tar as a loader would (members grouped by key, in order) and check every sample."""
    report = ShardReport(Path(path).name)
    seen: set[str] = set()
    key, files = None, {}
    try:
        tar = tarfile.open(path, mode="r|*")
    except (OSError, tarfile.TarError) as exc:
        report.problem("unreadable_shard", f"{type(exc).__name__}: {exc}")
        return report
    try:
        with tar:
            for member in tar:
                match = _KEY_RE.match(member.name) if member.isfile() else None
                if match is None:
                    continue
                name, extension = match.group(1), match.group(2).lower()
                if name != key:
                    if key is not None:
                        report.add(key, files)
                    if name in seen:
                        report.problem("duplicate_key", f"{name}: appears again after other keys")
                    key, files = name, {}
                    seen.add(name)
                files[extension] = tar.extractfile(member).read()
    except (OSError, EOFError, tarfile.TarError) as exc:  # the sample being read when the tar broke is dropped
        report.problem("truncated_shard", f"after {report.samples} samples: {type(exc).__name__}: {exc}")
        return report
    if key is not None:
        report.add(key, files)
    return report


def shard_paths(urls_or_dir: str | Path) -> list[Path]:
    """The ``*.tar`` files of a directory, or a brace-expanded list of local shard paths."""
    path = Path(urls_or_dir)
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if not shards:
            raise FileNotFoundError(f"{path}: no .tar shards in this directory")
        return shards
    shards = [Path(url) for url in braceexpand.braceexpand(str(urls_or_dir))]
    if not any(shard.exists() for shard in shards):
        raise FileNotFoundError(f"{urls_or_dir}: no such shard or directory")
    return shards


def _histogram(values: list[int], edges: tuple[float, ...]) -> dict[str, int]:
    return dict(zip(histogram_labels(edges), values, strict=True))


def inspect_shards(urls_or_dir: str | Path, write_stats: bool = True, num_workers: int = 2,
                   progress: bool = False) -> dict[str, Any]:
    """Check every sample of some shards; returns the report and (``write_stats``) stores it as ``"inspect"`` in
    ``_stats.json`` beside the first shard, keeping what is there, and writes ``sizes.json`` if there is none.

    ``ok`` is true when there is no problem: every shard reads to its end, every sample has a decodable image
    and a non-empty UTF-8 caption, and ``sizes.json`` (if present) matches the shards.
    """
    shards = shard_paths(urls_or_dir)
    reports = list(tqdm(run_jobs((str(p) for p in shards), inspect_shard, num_workers), total=len(shards),
                        unit="shard", desc="inspecting", disable=not progress))
    reports.sort(key=lambda report: report.shard)
    total = ShardReport("")
    for report in reports:
        total.samples += report.samples
        total.valid += report.valid
        total.problems.update(report.problems)
        for kind, where in report.examples.items():
            total.examples.setdefault(kind, where)
        total.extensions.update(report.extensions)
        for mine, theirs in ((total.words, report.words), (total.sides, report.sides),
                             (total.aspects, report.aspects)):
            mine[:] = [a + b for a, b in zip(mine, theirs, strict=True)]
        total.chars_total += report.chars_total
        total.chars_max = max(total.chars_max, report.chars_max)
        for mine, theirs in ((total.width_range, report.width_range), (total.height_range, report.height_range)):
            if theirs:
                mine[:] = [min(mine[0], theirs[0]), max(mine[1], theirs[1])] if mine else list(theirs)
    directory = shards[0].parent
    counts = {report.shard: report.samples for report in reports}
    sizes_json = _check_sizes(directory / "sizes.json", counts, total)
    result = {
        "shards": len(reports), "samples": total.samples, "valid": total.valid, "ok": not total.problems,
        "problems": dict(sorted(total.problems.items())), "examples": dict(sorted(total.examples.items())),
        "sizes_json": sizes_json, "extensions": dict(sorted(total.extensions.items())),
        "caption_words": _histogram(total.words, _WORD_EDGES),
        "caption_chars": {"mean": round(total.chars_total / max(total.valid, 1), 2), "max": total.chars_max},
        "image_shorter_side": _histogram(total.sides, _SIDE_EDGES),
        "image_aspect_ratio": _histogram(total.aspects, _ASPECT_EDGES),
        "image_width": dict(zip(("min", "max"), total.width_range, strict=False)),
        "image_height": dict(zip(("min", "max"), total.height_range, strict=False)),
        "per_shard": {r.shard: {"samples": r.samples, "valid": r.valid, **({"problems": dict(r.problems)}
                                                                           if r.problems else {})} for r in reports},
    }
    if write_stats:
        stats_path = directory / "_stats.json"
        try:
            stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
        except ValueError:
            stats = {}
        write_json(stats_path, {**(stats if isinstance(stats, dict) else {}), "inspect": result})
        if sizes_json == "absent" and not {"truncated_shard", "unreadable_shard"} & set(total.problems):
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


