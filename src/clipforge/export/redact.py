"""Keep credentials out of what an export publishes: the run config that the model card shows.

A saved config keeps ``${oc.env:...}`` and other interpolations as written (``clipforge.config.to_yaml``), and the
export never resolves them: ``${oc.env:HF_TOKEN}`` is shown as that text, which names a variable and holds no
secret. What a config can hold literally is redacted before it is shown:

- the value of a key whose name says it is a credential (``*token*``, ``*secret*``, ``*password*``,
  ``*credential*``, ``api_key``, ``access_key``, ``private_key``, ``auth*``), unless the value is a whole
  interpolation;
- inside any string (a ``pipe:curl ...`` or fsspec URL, for instance): Hugging Face, GitHub, OpenAI-style and AWS
  access-key tokens, the password of ``scheme://user:password@host``, a ``Bearer`` token, the value of a query
  parameter or a command-line option named like a credential (``?X-Amz-Signature=...``, ``--token ...``).

Redacted text becomes ``<redacted>``; everything else is kept, so the card still says which data and recipe made
the model.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "<redacted>"
SECRET_WORD = r"token|secret|passw(?:or)?d|credential|signature|api[_-]?key|access[_-]?key|private[_-]?key|auth(?!or)"
SECRET_NAME = re.compile(SECRET_WORD, re.IGNORECASE)
INTERPOLATION = re.compile(r"\$\{[^{}]*\}")

SECRET_PATTERNS = (
    # Tokens whose shape says what they are (Hugging Face, GitHub, OpenAI-style, AWS access key ids).
    (re.compile(r"\b(hf|gh[pousr]|github_pat)_[A-Za-z0-9_]{16,}"), REDACTED),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"), REDACTED),
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), REDACTED),
    # scheme://user:password@host
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@]+:)[^/\s@]+@", re.IGNORECASE), rf"\g<1>{REDACTED}@"),
    # Authorization: Bearer xxx (or Basic, token)
    (re.compile(r"\b(Bearer|Basic|token)(\s+)(?!\$\{)[A-Za-z0-9._~+/=-]{8,}", re.IGNORECASE), rf"\1\2{REDACTED}"),
    # ?access_token=xxx, &X-Amz-Signature=xxx
    (
        re.compile(rf"([?&][^=&\s'\"]*(?:{SECRET_WORD}|sig)[^=&\s'\"]*=)(?!\$\{{)[^&\s'\"]+", re.IGNORECASE),
        rf"\g<1>{REDACTED}",
    ),
    # --token xxx, --api-key=xxx
    (
        re.compile(rf"(\s--?[\w-]*(?:{SECRET_WORD})[\w-]*(?:=|\s+))(?![$\-])[^\s'\"]+", re.IGNORECASE),
        rf"\g<1>{REDACTED}",
    ),
)


def redact_text(text: str) -> str:
    """``text`` with every credential the patterns above recognise replaced by ``<redacted>``."""
    for pattern, replacement in SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and INTERPOLATION.fullmatch(value.strip()) is not None


def redact(value: Any, key: str = "") -> Any:
    """A copy of ``value`` (a config as nested dicts and lists) with credentials redacted; ``key`` is the name
    ``value`` is stored under."""
    if isinstance(value, dict):
        return {name: redact(item, str(name)) for name, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(item, key) for item in value]
    if key and SECRET_NAME.search(key) and value not in (None, "", False) and not _is_interpolation(value):
        return REDACTED
    return redact_text(value) if isinstance(value, str) else value
