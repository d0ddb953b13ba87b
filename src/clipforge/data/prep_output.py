"""What a prep writer's output folder may hold: its own earlier output, nothing else.

The shard writers (``clipforge prep table``, ``prep hf``, ``prep synthetic``, ``prep reshard``) mark every shard with
img2dataset's per-shard stats file, ``NNNNN_stats.json``, written *before* the tar with the run's settings and
``"status": "writing"`` (``announce_shard``), and again with the counts and ``"status": "success"`` once the tar is in
place (``finish_shard``). So a ``NNNNN.tar`` prep wrote always has a stats file carrying ``settings`` beside it, even
after a kill between the two, and one without (someone else's shards, img2dataset's stats) was not written by prep.
``sizes.json``, ``_stats.json`` and what a writer keeps beside its shards (``OWN_FILES``, ``OWN_SHARD_FILES``) are
prep's only next to such marked shards; ``*.tmp`` files of those names are what a killed write left.

``claim_output`` applies the one rule before a writer writes anything:

- the folder must be one the writer can create and write into (a file, a read-only filesystem or a folder without
  write permission is named in one line, before any work);
- it may hold nothing prep did not write (hidden files aside), with or without ``--overwrite``: replacing such files
  would lose someone's data, and keeping them would mix them into the output; the refusal lists a few;
- shards an earlier run wrote with other settings are refused, naming each differing setting, unless
  ``overwrite``, which removes what prep wrote there (and only that) first;
- otherwise the writer gets the stats of the earlier run's complete shards, to keep them (resume).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

SHARD = re.compile(r"^(\d+)\.tar$")
SHARD_STATS = re.compile(r"^(\d+)_stats\.json$")
TOTALS = ("sizes.json", "_stats.json")
OWN_FILES = ("teacher.json", "reshard_card.json", "reshard_card.md", "noisy_keys.tsv")
"""Files a writer keeps beside its shards: a reshard's card and teacher description, the synthetic noise list."""
OWN_SHARD_FILES = re.compile(r"^(\d+)\.(image\.npy|text\.npy|keys\.json)$")
"""Files kept per shard: the embeddings ``prep reshard --embeddings`` carries along (``clipforge.data.teacher``)."""
NAMES_SHOWN = 3


def write_json(path: Path, value: Any) -> None:
    """Write JSON under a temporary name, then rename."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    os.replace(temporary, path)


def check_output_folder(path: str | Path, option: str = "--out") -> Path:
    """``path``, checked without creating anything: it is a folder or can be made one, and can be written into.

    Raises ``ValueError`` in one line naming the path and what is wrong: a file where the folder (or a folder above
    it) belongs, a read-only filesystem, no write permission.
    """
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "it is a file" if existing == path else f"{existing} is a file"
        raise ValueError(f"{option} {path}: {where}, not a folder; give a folder (it is created if missing)")
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise ValueError(f"{option} {path}: {existing} is on a read-only filesystem; give a folder on a writable one")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: no permission to write in {existing}; give a folder you can write to")
    return path


def _read_stats(path: Path) -> dict[str, Any] | None:
    try:
        stats = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return stats if isinstance(stats, dict) and isinstance(stats.get("settings"), dict) else None


def survey(folder: Path) -> tuple[dict[str, dict[str, Any]], list[Path], list[Path]]:
    """(stats of the marked shards by stem, the paths prep wrote, the paths it did not) in ``folder``.

    Hidden names (``.DS_Store``, NFS's ``.nfs…``) belong to the system and count as neither.
    """
    if not folder.is_dir():
        return {}, [], []
    entries = sorted(path for path in folder.iterdir() if not path.name.startswith("."))
    stats = {}
    for path in entries:
        match = SHARD_STATS.match(path.name)
        if match and path.is_file() and (found := _read_stats(path)) is not None:
            stats[match.group(1)] = found
    own, foreign = [], []
    for path in entries:
        (own if path.is_file() and _is_own(path.name, set(stats)) else foreign).append(path)
    return stats, own, foreign


def _is_own(name: str, stems: set[str] | None) -> bool:
    """Whether prep wrote a file of this name, beside the marked shards ``stems`` (None: whatever is marked)."""
    if name.endswith(".tmp"):  # what a killed write left, under any of prep's names
        return _is_own(name[: -len(".tmp")], None)
    for pattern in (SHARD, SHARD_STATS, OWN_SHARD_FILES):
        if match := pattern.match(name):
            return stems is None or match.group(1) in stems
    return (name in TOTALS or name in OWN_FILES) and (stems is None or bool(stems))


def _stem(name: str) -> str | None:
    """The shard a per-shard file of prep's belongs to (``00003`` for ``00003.tar.tmp``), None for the others."""
    match = re.match(r"^(\d+)[._]", name)
    return match.group(1) if match else None


def listing(paths: list[Path]) -> str:
    """A few names (``a, b, c and 4 more``), folders with a slash."""
    names = [path.name + ("/" if path.is_dir() else "") for path in paths]
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown + (f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else "")


def refuse_foreign(folder: Path, foreign: list[Path]) -> None:
    """One line listing a few of the files in ``folder`` that prep did not write, if any."""
    if foreign:
        raise ValueError(
            f"{folder} holds {len(foreign)} {'entry' if len(foreign) == 1 else 'entries'} prep did not write "
            f"({listing(foreign)}): write to a new or empty --out, or move them away (--overwrite replaces only what "
            "prep wrote, and never deletes other files)"
        )


def _refuse_other_settings(folder: Path, stats: dict[str, dict[str, Any]], settings: dict[str, Any]) -> None:
    differing: dict[str, Any] = {}
    for earlier in stats.values():
        differing.update(
            {key: earlier["settings"].get(key) for key in settings if earlier["settings"].get(key) != settings[key]}
        )
    if differing:
        named = ", ".join(f"{key} {differing[key]!r} (this run: {settings[key]!r})" for key in sorted(differing))
        raise ValueError(
            f"{folder} holds shards written with other settings: {named}; write to another --out, repeat "
            "the earlier settings to resume it, or pass --overwrite to replace it"
        )


def claim_output(
    folder: str | Path, settings: dict[str, Any], overwrite: bool, names: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Make ``folder`` this run's output (see the module docstring), creating it; returns the stats of the earlier
    run's complete shards by stem (none after ``overwrite``). Marked shards not among ``names`` (this run's shard
    stems; None: keep all) are an equivalent earlier run's extra ones and are removed, as are the temporary files
    of writes a kill cut short. Refuses, having changed nothing, what the rule does not allow."""
    folder = check_output_folder(folder)
    stats, own, foreign = survey(folder)
    refuse_foreign(folder, foreign)
    if not overwrite:
        _refuse_other_settings(folder, stats, settings)
    keep = set() if overwrite else set(stats if names is None else names)
    for path in own:
        if path.name.endswith(".tmp") or _stem(path.name) not in keep:
            path.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    return {
        stem: found
        for stem, found in stats.items()
        if stem in keep and found.get("status") == "success" and (folder / f"{stem}.tar").is_file()
    }


def remove_output(folder: Path, remove_folder: bool) -> None:
    """Remove what prep wrote in ``folder`` (nothing else), and (``remove_folder``) the folder if that empties it."""
    for path in survey(folder)[1]:
        path.unlink(missing_ok=True)
    if remove_folder and not any(folder.iterdir()):
        folder.rmdir()


def announce_shard(folder: Path, name: str, settings: dict[str, Any]) -> None:
    """Mark ``NAME.tar`` as this run's before it is written (see the module docstring)."""
    write_json(folder / f"{name}_stats.json", {"shard": f"{name}.tar", "settings": settings, "status": "writing"})


def finish_shard(folder: Path, name: str, settings: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
    """Record ``NAME.tar`` as complete, with its counts (``count``, ``successes``, ...); returns the stats written."""
    stats = {"shard": f"{name}.tar", **stats, "settings": settings, "status": "success"}
    write_json(folder / f"{name}_stats.json", stats)
    return stats
