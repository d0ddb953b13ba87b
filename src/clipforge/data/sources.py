"""Where shards live and how many samples they hold.

A source is ``{urls, weight, num_samples}``. ``urls`` are brace-expanded (``::`` separates several
patterns) and each shard is one of:

* a local path: ``/data/laion/{00000..41407}.tar``;
* a ``pipe:`` command whose stdout is the tar: ``pipe:aws s3 cp s3://bucket/00001.tar -``
  (opened by webdataset, which also checks the command's exit status);
* an fsspec URL: ``s3://bucket/{00000..00099}.tar``, ``hf://datasets/org/name/{0000..0009}.tar``,
  ``gs://``, ``https://``, ``file://`` … (the filesystem's package, e.g. ``s3fs``, must be installed).

Sample counts come from ``num_samples`` in the config when given, else from the files img2dataset and
``clipforge prep`` write next to the shards: ``sizes.json`` ({shard name: count}, the file OpenCLIP
reads), or per-shard ``NNNNN_stats.json`` (img2dataset's, ``successes``). Unknown counts are allowed
in epoch mode (the epoch simply ends when the data does); resampled mode needs a total.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import braceexpand

log = logging.getLogger(__name__)


@dataclass
class SourceConfig:
    """One set of shards."""

    urls: str = "???"
    """Shards, brace-expanded; '::' joins several patterns. Local paths, pipe:COMMAND, or fsspec URLs (s3://, hf://)."""
    weight: float = 1.0
    """Relative sampling weight in resampled mode (per sample drawn, not per shard)."""
    num_samples: int | None = None
    """Samples in this source; None = read sizes.json / *_stats.json beside the shards."""


def expand_urls(urls: str, where: str = "data.sources") -> list[str]:
    """Brace-expand ``urls`` (``::`` separates several patterns)."""
    shards = [url for pattern in urls.split("::") if pattern for url in braceexpand.braceexpand(pattern)]
    if not shards:
        raise ValueError(f"{where}.urls: {urls!r} expands to no shards")
    return shards


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def missing_local(shards: list[str]) -> list[str]:
    """The local shards that do not exist, in order. Each directory is listed once rather than each shard stat'ed:
    at 200,000 shards and 1,024 ranks a stat per shard is 200 million metadata calls on a shared filesystem, a
    listing per directory a few thousand. A name the listing lacks is still checked with one stat (a case-folding
    filesystem); a listed name that cannot be opened (a dangling link) is skipped and counted when it is read."""
    by_dir: dict[str, set[str] | None] = {}
    missing = []
    for shard in shards:
        if not is_local(shard):
            continue
        directory, name = os.path.split(shard)
        if directory not in by_dir:
            try:
                by_dir[directory] = set(os.listdir(directory or "."))
            except OSError:  # no such directory, or not listable: each shard is stat'ed
                by_dir[directory] = None
        listing = by_dir[directory]
        if (listing is None or name not in listing) and not Path(shard).exists():
            missing.append(shard)
    return missing


def open_shard(url: str) -> IO[bytes]:
    """A readable binary stream for one shard: a local file, a ``pipe:`` command's output or an fsspec URL."""
    if is_local(url):
        return open(url, "rb")  # not through webdataset, whose import alone costs torch's (prep inspect needs none)
    if url.startswith("pipe:"):
        import webdataset as wds

        return wds.gopen(url, "rb")
    if url.startswith("file://"):
        return open(url[len("file://") :], "rb")
    import fsspec

    try:
        return fsspec.open(url, "rb").open()
    except ImportError as exn:  # e.g. s3:// without s3fs
        raise ImportError(f"{url}: {exn}") from exn


def _read_json(url: str) -> dict | None:
    try:
        if is_local(url) or url.startswith("file://"):
            with open(url.removeprefix("file://"), encoding="utf-8") as handle:
                return json.load(handle)
        import fsspec

        with fsspec.open(url, "r", encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, ImportError) as exn:
        log.warning("could not read sample counts from %s: %s", url, exn)
        return None


def shard_sizes(shards: list[str]) -> dict[str, int | None]:
    """Sample count of each shard from sizes.json or NNNNN_stats.json next to it; None where unknown."""
    sizes: dict[str, int | None] = dict.fromkeys(shards)
    by_dir: dict[str, list[str]] = {}
    for shard in shards:
        if not shard.startswith("pipe:"):
            by_dir.setdefault(posixpath.dirname(shard), []).append(shard)
    for directory, members in by_dir.items():
        listing = _read_json(posixpath.join(directory, "sizes.json")) or {}
        for shard in members:
            name = posixpath.basename(shard)
            if name in listing:
                sizes[shard] = int(listing[name])
        for shard in members:
            if sizes[shard] is None and shard.endswith(".tar"):
                stats = _read_json(shard[: -len(".tar")] + "_stats.json")
                if stats is not None and "successes" in stats:
                    sizes[shard] = int(stats["successes"])
    return sizes


@dataclass
class Source:
    """A source resolved: its shards, their counts, its weight."""

    shards: list[str]
    sizes: dict[str, int | None]
    weight: float
    num_samples: int | None

    @classmethod
    def resolve(cls, cfg: SourceConfig, index: int) -> Source:
        where = f"data.sources[{index}]"
        shards = expand_urls(cfg.urls, where)
        missing = missing_local(shards)
        if missing and len(missing) == len(shards):
            raise FileNotFoundError(f"{where}.urls: none of the {len(shards)} shards exist (first: {missing[0]})")
        if missing:
            log.warning(
                "%s: %d of %d shards do not exist (first: %s); they will be skipped and counted",
                where,
                len(missing),
                len(shards),
                missing[0],
            )
        sizes = shard_sizes(shards)
        num_samples = cfg.num_samples
        if num_samples is None and all(v is not None for v in sizes.values()):
            num_samples = sum(v for v in sizes.values() if v is not None)
        if cfg.weight <= 0:
            raise ValueError(f"{where}.weight: must be positive, got {cfg.weight}")
        return cls(shards, sizes, cfg.weight, num_samples)

    def mean_shard_size(self) -> float:
        """Samples per shard: from the shards' counts, else the source's num_samples spread over its shards. A
        source is drawn with probability weight / mean_shard_size per shard, so that weights are sample shares."""
        known = [v for v in self.sizes.values() if v]
        if known:
            return sum(known) / len(known)
        if self.num_samples:
            return self.num_samples / len(self.shards)
        return 1.0  # no count at all: a lone source (mixing several without counts is refused)
