"""Reading a typed config: YAML over dataclass defaults, ``--set`` overrides, one-line errors, saved YAML, --help.

Defaults (the dataclasses) → a YAML file → ``--set a.b=value`` overrides, merged with OmegaConf structured configs.
An unknown key, a value of the wrong type, a missing required value or an invalid one stops before any work, with a
``ConfigError`` naming the source and the dotted key. ``to_yaml`` gives the resolved config that is saved;
``describe_fields`` turns each field's docstring into ``--help`` text.

This is the one config reader: the training run's tree (``clipforge.train.config.RunConfig``, assembled from the
sections beside their owners) and the evaluation suites (``clipforge.evaluation.config``) are read through it. It
knows no section, so every package may use it.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
from collections.abc import Callable
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the source, key and value."""


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    message = str(exc).splitlines()[0]
    return f"key {key!r}: {message}" if key else message


def _shape_mismatch(schema, given, prefix: str = "") -> str | None:
    """Where ``given`` (plain containers) puts a mapping where the schema has a list, or the reverse; OmegaConf's
    own error ("Cannot merge incompatible container types") names no key."""
    if not isinstance(given, dict) or not isinstance(schema, dict):
        return None
    for key, value in given.items():
        expected = schema.get(key)
        where = f"{prefix}{key}"
        if isinstance(expected, list) and isinstance(value, dict):
            return f"key {where!r}: expected a list, got a mapping (write each item as '- key: value')"
        if isinstance(expected, dict) and isinstance(value, list):
            return f"key {where!r}: expected a mapping of keys, got a list"
        found = _shape_mismatch(expected, value, f"{where}.")
        if found:
            return found
    return None


def _merge(merged, update, source: str):
    try:
        return OmegaConf.merge(merged, update)
    except (OmegaConfBaseException, TypeError) as exc:  # TypeError: a mapping where a list belongs
        found = _shape_mismatch(OmegaConf.to_container(merged), OmegaConf.to_container(update))
        detail = _describe(exc) if isinstance(exc, OmegaConfBaseException) else str(exc)
        raise ConfigError(f"{source}: {found or detail}") from exc


def read_config(
    schema: type,
    path: str | Path | None = None,
    overrides: tuple[str, ...] | list[str] = (),
    moved: dict[str, str] | None = None,
    check: Callable | None = None,
):
    """Defaults of the dataclass ``schema``, then the YAML at ``path``, then ``a.b=value`` overrides; validated
    completely. ``moved`` maps keys that are no longer read to where they went (each stops the read in one line);
    ``check(merged, source)`` runs on the merged tree before it becomes objects."""
    merged = OmegaConf.structured(schema)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            file_cfg = OmegaConf.load(path)
        except Exception as exc:  # YAML syntax errors come in several types
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
        if not OmegaConf.is_dict(file_cfg):
            raise ConfigError(
                f"{path}: the top level must be a mapping of sections (data:, model:, train:, ...), "
                f"got a {'list' if OmegaConf.is_list(file_cfg) else type(file_cfg).__name__}"
            )
        _refuse_moved(file_cfg, moved, str(path))
        merged = _merge(merged, file_cfg, str(path))
    for override in overrides:
        update = _parse_override(override)
        _refuse_moved(update, moved, f"--set {override!r}")
        merged = _merge(merged, update, f"--set {override!r}")
    source = f"{path}" if path is not None else "config"
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(
            f"{source}: required value missing for {', '.join(missing)} (set it in the YAML "
            f"or with --set {missing[0]}=...)"
        )
    if check is not None:
        check(merged, source)
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, ValueError) else None
        raise ConfigError(f"{source}: {cause if cause else _describe(exc)}") from exc
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    cfg._unresolved = _resolver_interpolations(OmegaConf.to_container(merged, resolve=False))
    return cfg


def _refuse_moved(given, moved: dict[str, str] | None, source: str) -> None:
    """A key of ``moved`` in ``given`` (a config fragment) stops in one line naming where it went."""
    for old, new in (moved or {}).items():
        section, _, key = old.rpartition(".")
        node = OmegaConf.select(given, section, default=None) if section else given
        if OmegaConf.is_dict(node) and key in node:
            raise ConfigError(f"{source}: key {old!r} is now {new!r}; write it there (--set {new}=...)")


def _parse_override(override: str):
    """One ``--set KEY=VALUE`` as a config fragment; the value is YAML, and a YAML mistake is one line naming the
    argument and the character where parsing stopped (the usual one: braces of a brace-expanded path inside a flow
    mapping, which YAML reads as a nested mapping)."""
    import yaml

    key, equals, value = override.partition("=")
    if not equals or not key.strip():
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. optim.lr=5e-4")
    try:
        return OmegaConf.from_dotlist([override])
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at character {mark.column + 1} of the value" if mark is not None and mark.line == 0 else ""
        shown = f" ({value[mark.column]!r})" if where and mark.column < len(value) else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(
            f"--set {override!r}: the value is not valid YAML{where}{shown}: {problem}; quote strings that hold "
            "braces, commas or colons inside the YAML, e.g. --set 'data.sources=[{urls: \"data/{00000..00063}.tar\"}]'"
        ) from None


_RESOLVER_CALL = re.compile(r"\$\{\s*[\w.-]+\s*:")  # ${oc.env:X}, ${oc.decode:...}: a resolver, not a node
_NODE_REFERENCE = re.compile(r"\$\{\s*([\w.\[\]]+)\s*\}")


def _resolver_interpolations(raw) -> dict[tuple, str]:
    """The values written as interpolations that call a resolver (``${oc.env:HF_TOKEN}``), directly or through node
    references, keyed by their path: the saved config keeps them as written, so no environment value (a token, a
    password in a ``pipe:`` URL) is ever written into a run directory, a checkpoint or a model card. Plain node
    references (``${train.output_dir}``) are saved resolved, since what they point to is in the file too."""
    leaves: dict[tuple, str] = {}

    def walk(node, path: tuple) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            if isinstance(value, dict | list):
                walk(value, (*path, key))
            elif isinstance(value, str) and "${" in value:
                leaves[(*path, key)] = value

    walk(raw, ())

    def calls_resolver(value: str, seen: frozenset) -> bool:
        if _RESOLVER_CALL.search(value):
            return True
        for reference in _NODE_REFERENCE.findall(value):
            target = tuple(int(part) if part.isdigit() else part for part in re.split(r"[.\[\]]+", reference) if part)
            if target in seen:
                continue
            if target in leaves and calls_resolver(leaves[target], seen | {target}):
                return True
            if target not in leaves and not _resolves_plainly(raw, target):
                return True  # a relative or unusual reference: keep it as written rather than guess
        return False

    return {path: value for path, value in leaves.items() if calls_resolver(value, frozenset({path}))}


def _resolves_plainly(raw, path: tuple) -> bool:
    """Whether ``path`` names a value in ``raw`` (a container, or a leaf without interpolation)."""
    node = raw
    for part in path:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return False
    return True


def to_yaml(cfg) -> str:
    """The config as YAML: every value resolved except those that call a resolver (``${oc.env:...}``), which stay
    as written; the run directory, each checkpoint and ``clipforge submit`` save this text."""
    conf = OmegaConf.structured(cfg)
    for path, value in getattr(cfg, "_unresolved", {}).items():
        node = conf
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
    return OmegaConf.to_yaml(conf)


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right after a field) of a dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def describe_fields(schema: type) -> str:
    """Every key of the dataclass ``schema`` (a tree of sections) with its default and docstring, for ``--help``."""
    lines = []
    defaults = schema()
    for section in dataclasses.fields(schema):
        sub = getattr(defaults, section.name)
        docs = _field_docs(type(sub))
        lines.append(f"{section.name}:  {(type(sub).__doc__ or '').strip()}")
        for item in dataclasses.fields(sub):
            default = getattr(sub, item.name)
            default = "(required)" if default == "???" else repr(default)
            lines.append(f"  {section.name}.{item.name} = {default}\n      {docs.get(item.name, '')}")
    return "\n".join(lines)
