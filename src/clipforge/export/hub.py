"""Upload an export folder to the Hugging Face Hub with ``huggingface_hub``.

    clipforge export runs/demo/checkpoints/latest --format hf --out exported/demo --push org/name [--private]

The token is whatever ``HfApi`` finds: ``HF_TOKEN`` or the ``huggingface_hub`` login. The repo is
created if needed (``--private`` applies then; an existing repo keeps its visibility), a
``--revision`` branch is created from main if missing, and the folder is uploaded in one commit.
A repo that already holds files but no ``clipforge_export.json`` was not written by clipforge and
is refused unless ``force``; then the upload only adds and replaces files. A clipforge repo is made
to mirror the folder (files of an earlier export that this one lacks are deleted in the same
commit), so a stale ``open_clip_model.safetensors`` cannot outlive the weights it belonged to.

``check_repo_id`` refuses a repo id the Hub would refuse, before any export work. Before anything is created or
uploaded, ``check_access`` asks the Hub who the token belongs to: offline mode, no token, a rejected token, no
network, or a namespace the token cannot write to each end in one ``HubUnavailable`` line saying what to do, with
the ``hf upload`` command (shell-quoted) that pushes the folder later (the local export is already written and stays).
"""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalTokenNotFoundError
from huggingface_hub.utils import validate_repo_id

log = logging.getLogger(__name__)

MARKER = "clipforge_export.json"


class HubUnavailable(ValueError):
    """The Hub cannot take this push (offline, no or a rejected token, no network, no write access)."""


def check_repo_id(repo_id: str) -> None:
    """``ValueError`` naming ``repo_id`` and the Hub's rule unless it is a model repo id the Hub accepts."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exn:
        raise ValueError(f"--push {repo_id!r} is not a Hub repo id (NAME or ORG/NAME): {exn}") from None


def upload_command(folder: str | Path, repo_id: str, revision: str | None = None, private: bool = False) -> str:
    """The ``hf upload`` command line that pushes ``folder`` to ``repo_id``, each value quoted for a POSIX shell."""
    words = ["hf", "upload", repo_id, str(Path(folder).resolve()), "."]  # absolute: never read as an option
    words += ["--revision", revision] if revision else []
    words += ["--private"] if private else []
    return shlex.join(words)


def _unavailable(problem: str, fix: str, later: str) -> HubUnavailable:
    return HubUnavailable(f"{problem}; the export is kept: {fix}, then push it with `{later}`")


def check_access(api: HfApi, repo_id: str, later: str = "hf upload") -> str:
    """The user the token belongs to, once token, network and write access to ``repo_id``'s namespace are known
    good; else ``HubUnavailable`` saying what is wrong, what to do, and ``later``, the command that pushes the
    folder once it can be (``upload_command``)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise _unavailable(f"HF_HUB_OFFLINE is set, so nothing was pushed to {repo_id}", "unset it", later)
    try:
        me = api.whoami()
    except LocalTokenNotFoundError:
        raise _unavailable("no Hugging Face token", "set HF_TOKEN or run `hf auth login`", later) from None
    except HfHubHTTPError as exn:
        status = getattr(getattr(exn, "response", None), "status_code", None)
        if status == 401:
            fix = "set a valid HF_TOKEN or run `hf auth login`"
            raise _unavailable("the Hub rejected the token (401)", fix, later) from None
        problem = f"the Hub answered {status or 'an error'} ({str(exn).splitlines()[0]})"
        raise _unavailable(problem, "wait until it answers", later) from None
    except Exception as exn:  # httpx's and the OS's connection errors: no network, DNS, proxy
        detail = " ".join(str(exn).split())[:200]
        problem = f"cannot reach the Hub ({type(exn).__name__}: {detail})"
        raise _unavailable(problem, "check the network or proxy", later) from None
    user = me.get("name", "?")
    namespaces = {user} | {org.get("name") for org in me.get("orgs", []) or []}
    namespace = repo_id.split("/")[0] if "/" in repo_id else user
    if namespace not in namespaces:
        organisations = ", ".join(sorted(namespaces - {user})) or "none"
        problem = f"the token belongs to {user} (organisations: {organisations}), who cannot write to {namespace}/"
        raise _unavailable(problem, f"use a token that can write to {namespace}/ (or push to {user}/...)", later)
    return user


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    force: bool = False,
    token: str | None = None,
    api: HfApi | None = None,
) -> str:
    """Upload ``folder`` (a clipforge export) to the model repo ``repo_id``; returns the commit URL."""
    folder = Path(folder)
    check_repo_id(repo_id)
    if not (folder / MARKER).is_file():
        raise FileNotFoundError(f"{folder} is not a clipforge export folder (no {MARKER})")
    api = api or HfApi(token=token)
    check_access(api, repo_id, upload_command(folder, repo_id, revision, private))
    mirror = True
    if api.repo_exists(repo_id, repo_type="model"):
        files = api.list_repo_files(repo_id, repo_type="model")
        foreign = [name for name in files if name != ".gitattributes"]
        if foreign and MARKER not in files:
            if not force:
                raise ValueError(
                    f"{repo_id} exists and was not written by clipforge (no {MARKER}; it holds "
                    f"{', '.join(sorted(foreign)[:5])}{' ...' if len(foreign) > 5 else ''}); "
                    "pass --force to upload over it"
                )
            mirror = False
        if private:
            log.warning("%s already exists: its visibility is left as it is", repo_id)
    else:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        repo_type="model",
        revision=revision,
        commit_message=commit_message or f"clipforge export ({folder.name})",
        delete_patterns="*" if mirror else None,
    )
    log.info("pushed %s to %s", folder, commit.commit_url)
    return commit.commit_url
