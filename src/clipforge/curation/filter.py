"""Selecting samples from a ``prep score`` table, after DataComp's baselines (Gadre et al. 2023) and MetaCLIP.

``clipforge prep filter SCORES_DIR --out DIR [rules]`` applies the rules that are given, in this order, each to
the samples the previous ones kept:

1. text, language-free (DataComp's "basic" rules without the language detector): at least ``min_words`` words and
   ``min_chars`` characters, at most ``max_nonalpha`` of the caption's characters neither letters nor spaces;
2. image: shorter side ≥ ``min_side`` pixels, aspect ratio (long / short side) ≤ ``max_aspect``;
3. CLIP score: cosine ≥ ``min_score``, or the ``top_fraction`` best-scored samples of the whole scored pool (as
   DataComp's "CLIP score top 30%" ranks the pool, not what earlier rules left);
4. near-duplicates by image embedding (``dedup_threshold``; ``curation.dedup``), best-scored first, so of each
   group of duplicates the best pair stays;
5. MetaCLIP balancing (Xu et al. 2024): ``metadata`` is a file of entries, one per line; an entry matches a
   caption that contains it (case-insensitive substring); an entry matched by more than ``balance_t`` samples
   keeps each of them with probability t / count, and a sample is kept when any of its entries keeps it. Samples
   matching no entry are dropped, as in MetaCLIP. Draws are seeded (``seed``).

Writes ``DIR/kept.tsv`` (``shard`` and ``key`` of each kept sample, in the table's order), ``DIR/card.json`` and
``DIR/card.md``: counts in and out per rule, the score histograms before and after, entry counts before and after
balancing. ``clipforge prep reshard`` turns the list into shards.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from clipforge.curation.card import rule_record, write_card
from clipforge.curation.dedup import near_duplicates
from clipforge.curation.score import score_histogram
from clipforge.data.prep_output import check_output_folder
from clipforge.data.teacher import read_shard_embeddings

_NOT_LETTER_OR_SPACE = re.compile(r"[^\w\s]|[\d_]")


@dataclass(frozen=True)
class FilterRules:
    """Which rules ``prep filter`` applies (None: that rule is off) and their parameters."""

    min_words: int | None = None
    min_chars: int | None = None
    max_nonalpha: float | None = None
    min_side: int | None = None
    max_aspect: float | None = None
    min_score: float | None = None
    top_fraction: float | None = None
    dedup_threshold: float | None = None
    dedup_backend: str = "auto"
    metadata: str | None = None
    balance_t: int = 20_000
    seed: int = 0

    def check(self) -> None:
        if self.min_score is not None and self.top_fraction is not None:
            raise ValueError("--min-score and --top-fraction are both given; choose one CLIP-score rule")
        if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
            raise ValueError(f"--top-fraction: must be in (0, 1], got {self.top_fraction}")
        if self.max_nonalpha is not None and not 0 <= self.max_nonalpha <= 1:
            raise ValueError(f"--max-nonalpha: a fraction in [0, 1], got {self.max_nonalpha}")
        if self.max_aspect is not None and self.max_aspect < 1:
            raise ValueError(f"--max-aspect: long side / short side, >= 1, got {self.max_aspect}")
        if self.balance_t <= 0:
            raise ValueError(f"--balance-t: must be positive, got {self.balance_t}")
        if self.metadata is not None and not Path(self.metadata).is_file():
            raise FileNotFoundError(f"--metadata {self.metadata}: no such file")


def nonalpha_fraction(caption: str) -> float:
    """Share of the caption's characters that are neither letters nor whitespace (digits, punctuation, symbols)."""
    return len(_NOT_LETTER_OR_SPACE.findall(caption)) / max(1, len(caption))


def read_entries(path: str) -> list[str]:
    """Metadata entries, one per line; blank lines dropped, case folded, duplicates removed (first kept)."""
    entries = [line.strip().lower() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    entries = list(dict.fromkeys(entry for entry in entries if entry))
    if not entries:
        raise ValueError(f"--metadata {path}: no entries (one per line)")
    return entries


def match_entries(captions: pd.Series, entries: list[str]) -> list[list[int]]:
    """For each caption, the indices of the entries it contains (case-insensitive substring, MetaCLIP's rule).

    One vectorised pass per entry: fine for thousands of entries; MetaCLIP's 500k would want Aho–Corasick."""
    lowered = captions.str.lower()
    matches: list[list[int]] = [[] for _ in range(len(captions))]
    for index, entry in enumerate(entries):
        for row in np.flatnonzero(lowered.str.contains(entry, regex=False).to_numpy()):
            matches[row].append(index)
    return matches


def balance(
    captions: pd.Series, entries: list[str], t: int, seed: int
) -> tuple[np.ndarray, dict[str, int], dict[str, int], int]:
    """MetaCLIP's balancing: (keep mask, entry counts before, after, samples matching no entry)."""
    matches = match_entries(captions, entries)
    counts = np.zeros(len(entries), dtype=np.int64)
    for found in matches:
        counts[found] += 1
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(captions), dtype=bool)
    for row, found in enumerate(matches):
        if found:  # one draw per (sample, entry): kept when any of its entries keeps it
            draws = rng.random(len(found))
            keep[row] = bool((draws < t / counts[found]).any())
    after = np.zeros(len(entries), dtype=np.int64)
    for row in np.flatnonzero(keep):
        after[matches[row]] += 1
    before_counts = {entries[i]: int(counts[i]) for i in np.flatnonzero(counts)}
    after_counts = {entries[i]: int(after[i]) for i in np.flatnonzero(after)}
    return keep, before_counts, after_counts, sum(not found for found in matches)


def image_embeddings(directory: Path, table: pd.DataFrame) -> np.ndarray:
    """The image embeddings (N, D) float32 of the table's rows, in its order."""
    rows = table["row"].to_numpy()
    result: np.ndarray | None = None
    for shard, positions in table.groupby("shard", sort=False).indices.items():
        _, image, _ = read_shard_embeddings(directory, str(shard))
        if result is None:
            result = np.empty((len(table), image.shape[1]), dtype=np.float32)
        result[positions] = image[rows[positions]]
    return result if result is not None else np.zeros((0, 1), dtype=np.float32)


def apply_rules(
    table: pd.DataFrame, rules: FilterRules, scores_dir: Path
) -> tuple[pd.DataFrame, list[dict[str, Any]], dict[str, Any] | None]:
    """The kept rows, one record per rule applied, and the balancing report (None without --metadata)."""
    rules.check()
    records: list[dict[str, Any]] = []
    kept = table

    def apply(name: str, parameters: dict[str, Any], mask) -> None:
        nonlocal kept
        before = len(kept)
        kept = kept[np.asarray(mask, dtype=bool)]
        records.append(rule_record(name, parameters, before, len(kept)))

    if rules.min_words is not None:
        apply("min_words", {"min_words": rules.min_words}, kept["caption_words"] >= rules.min_words)
    if rules.min_chars is not None:
        apply("min_chars", {"min_chars": rules.min_chars}, kept["caption_chars"] >= rules.min_chars)
    if rules.max_nonalpha is not None:
        fraction = kept["caption"].map(nonalpha_fraction)
        apply("max_nonalpha", {"max_nonalpha": rules.max_nonalpha}, fraction <= rules.max_nonalpha)
    if rules.min_side is not None:
        side = np.minimum(kept["width"], kept["height"])
        apply("min_side", {"min_side": rules.min_side}, side >= rules.min_side)
    if rules.max_aspect is not None:
        long_side = np.maximum(kept["width"], kept["height"])
        short_side = np.maximum(np.minimum(kept["width"], kept["height"]), 1)
        apply("max_aspect", {"max_aspect": rules.max_aspect}, long_side / short_side <= rules.max_aspect)
    if rules.min_score is not None:
        apply("min_score", {"min_score": rules.min_score}, kept["score"] >= rules.min_score)
    if rules.top_fraction is not None:
        number = max(1, round(rules.top_fraction * len(table)))
        threshold = float(np.sort(table["score"].to_numpy())[::-1][number - 1]) if len(table) else 0.0
        parameters = {"top_fraction": rules.top_fraction, "pool": len(table), "threshold": round(threshold, 4)}
        apply("top_fraction", parameters, kept["score"] >= threshold)
    if rules.dedup_threshold is not None:
        best_first = kept.sort_values("score", ascending=False, kind="stable")
        keep = near_duplicates(image_embeddings(scores_dir, best_first), rules.dedup_threshold, rules.dedup_backend)
        survivors = best_first.index[keep]
        parameters = {"dedup_threshold": rules.dedup_threshold, "backend": rules.dedup_backend}
        apply("dedup", parameters, kept.index.isin(survivors))
    report = None
    if rules.metadata is not None:
        entries = read_entries(rules.metadata)
        keep, before, after, unmatched = balance(kept["caption"], entries, rules.balance_t, rules.seed)
        report = {
            "t": rules.balance_t,
            "seed": rules.seed,
            "entries": len(entries),
            "matched_entries": len(before),
            "unmatched_samples": unmatched,
            "before": before,
            "after": after,
        }
        apply("balance", {"metadata": rules.metadata, "t": rules.balance_t, "seed": rules.seed}, keep)
    return kept, records, report


def filter_scores(scores_dir: str, out: str, rules: FilterRules) -> dict[str, Any]:
    """Apply ``rules`` to ``scores_dir/scores.parquet``; write ``kept.tsv`` and the data card. Returns the card."""
    started = time.monotonic()
    check_output_folder(out)
    directory = Path(scores_dir)
    path = directory / "scores.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no scores table (run `clipforge prep score` first)")
    table = pd.read_parquet(path)
    kept, records, report = apply_rules(table, rules, directory)
    destination = Path(out)
    destination.mkdir(parents=True, exist_ok=True)
    kept[["shard", "key"]].to_csv(destination / "kept.tsv", sep="\t", index=False)
    card = {
        "step": "filter",
        "input": str(path),
        "output": str(destination / "kept.tsv"),
        "parameters": {key: value for key, value in asdict(rules).items() if value is not None},
        "samples_in": len(table),
        "samples_out": len(kept),
        "rules": records,
        "histograms": {
            "CLIP score, in": score_histogram(table["score"].to_numpy()),
            "CLIP score, kept": score_histogram(kept["score"].to_numpy()),
        },
        "balance": report,
        "seconds": round(time.monotonic() - started, 2),
    }
    write_card(destination, "card", card)
    return card


def read_kept(path: str | Path) -> pd.DataFrame:
    """A ``kept.tsv`` list: columns shard, key (as strings)."""
    path = Path(path)
    if path.is_dir():
        path = path / "kept.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no kept list (run `clipforge prep filter` first)")
    kept = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    if list(kept.columns) != ["shard", "key"]:
        raise ValueError(f"{path}: expected the columns shard, key; got {', '.join(kept.columns)}")
    return kept
