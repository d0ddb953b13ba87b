"""Data cards: what each curation step read, kept and why, as ``NAME.json`` and ``NAME.md`` in its output folder.

A card holds ``step`` (score, filter, reshard), the command's inputs and parameters, ``rules`` (one entry per
rule, in the order applied: name, parameters, samples in, out, removed), score histograms and, after balancing,
the counts of the metadata entries before and after. ``write_card`` writes both forms; the markdown is the same
content for people.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipforge.data.prep_output import write_json

BAR_WIDTH = 40
SHOWN_ENTRIES = 30  # entries listed in the markdown (the JSON has all of them)


def _histogram_lines(histogram: dict[str, Any]) -> list[str]:
    counts, edges = histogram.get("counts") or [], histogram.get("edges") or []
    if not counts:
        return ["(no samples)"]
    peak = max(counts) or 1
    lines = ["```"]
    for count, low, high in zip(counts, edges, edges[1:]):
        lines.append(f"{low:7.3f} – {high:7.3f} | {'#' * round(BAR_WIDTH * count / peak):<{BAR_WIDTH}} {count}")
    return lines + ["```"]


def markdown(card: dict[str, Any]) -> str:
    lines = [f"# Data card: {card['step']}", ""]
    for key in ("input", "output", "machine", "date", "seconds"):
        if card.get(key) is not None:
            lines.append(f"- {key}: `{card[key]}`")
    lines += ["", f"Samples in: **{card['samples_in']}**, out: **{card['samples_out']}**", ""]
    if card.get("rules"):
        lines += ["| rule | parameters | in | out | removed |", "|---|---|---:|---:|---:|"]
        for rule in card["rules"]:
            parameters = ", ".join(f"{k}={v}" for k, v in rule["parameters"].items())
            lines.append(
                f"| {rule['name']} | {parameters} | {rule['in']} | {rule['out']} | {rule['in'] - rule['out']} |"
            )
        lines.append("")
    for name, histogram in (card.get("histograms") or {}).items():
        lines += [f"## {name}", ""] + _histogram_lines(histogram) + [""]
    balance = card.get("balance")
    if balance:
        lines += [
            f"## Balancing (t = {balance['t']}, seed {balance['seed']})",
            "",
            f"{balance['entries']} metadata entries, {balance['matched_entries']} matched; samples matching none: "
            f"{balance['unmatched_samples']} (dropped, as MetaCLIP does).",
            "",
            "| entry | before | after |",
            "|---|---:|---:|",
        ]
        shown = sorted(balance["before"], key=lambda entry: -balance["before"][entry])[:SHOWN_ENTRIES]
        lines += [f"| {entry} | {balance['before'][entry]} | {balance['after'].get(entry, 0)} |" for entry in shown]
        lines.append("")
    if card.get("extra"):
        lines += ["## Details", ""] + [f"- {key}: `{value}`" for key, value in card["extra"].items()] + [""]
    return "\n".join(lines)


def write_card(directory: str | Path, name: str, card: dict[str, Any]) -> None:
    """``directory/name.json`` and ``directory/name.md``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / f"{name}.json", card)
    (directory / f"{name}.md").write_text(markdown(card))


def rule_record(name: str, parameters: dict[str, Any], before: int, after: int) -> dict[str, Any]:
    return {"name": name, "parameters": parameters, "in": before, "out": after}
