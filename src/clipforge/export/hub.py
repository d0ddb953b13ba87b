"""Upload an export folder to the Hugging Face Hub with ``huggingface_hub``.

    clipforge export runs/demo/checkpoints/latest --format hf --out exported/demo --push org/name [--private]

The token is whatever ``HfApi`` finds: ``HF_TOKEN`` or the ``huggingface_hub`` login. The repo is
created if needed (``--private`` applies then; an existing repo keeps its visibility), a
``--revision`` branch is created from main if missing, and the folder is uploaded in one commit.
A repo that already holds files but no ``clipforge_export.json`` was not written by clipforge and
is refused unless ``force``; then the upload only adds and replaces files. A clipforge repo is made
to mirror the folder (files of an earlier export that this one lacks are deleted in the same
commit), so a stale ``open_clip_model.safetensors`` cannot outlive the weights it belonged to.

Before anything is created or uploaded, ``check_access`` asks the Hub who the token belongs to: offline mode, no
token, a rejected token, no network, or a namespace the token cannot write to each end in one ``HubUnavailable``
line saying what to do (the local export is already written and stays).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

log = logging.getLogger(__name__)

MARKER = "clipforge_export.json"


class HubUnavailable(ValueError):
    """The Hub cannot take this push (offline, no or a rejected token, no network, no write access)."""


def check_access(api: HfApi, repo_id: str) -> str:
    """The user the token belongs to, once token, network and write access to ``repo_id``'s namespace are known
    good; else ``HubUnavailable`` naming what to do."""
    later = f"the export is kept; push it later with `hf upload {repo_id} FOLDER`"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise HubUnavailable(f"HF_HUB_OFFLINE is set, so nothing can be pushed to {repo_id}; unset it, or {later}")
    try:
        me = api.whoami()
    except LocalTokenNotFoundError:
        raise HubUnavailable(f"no Hugging Face token: set HF_TOKEN or run `hf auth login` ({later})") from None
    except HfHubHTTPError as exn:
        status = getattr(getattr(exn, "response", None), "status_code", None)
        if status == 401:
            raise HubUnavailable(
                f"the Hub rejected the token (401): set a valid HF_TOKEN or run `hf auth login` ({later})"
            ) from None
        raise HubUnavailable(f"the Hub answered {status or 'an error'} ({str(exn).splitlines()[0]}); {later}") from None
    except Exception as exn:  # httpx's and the OS's connection errors: no network, DNS, proxy
        detail = " ".join(str(exn).split())[:200]
        raise HubUnavailable(
            f"cannot reach the Hub ({type(exn).__name__}: {detail}); check the network or proxy, or {later}"
        ) from None
    user = me.get("name", "?")
    namespaces = {user} | {org.get("name") for org in me.get("orgs", []) or []}
    namespace = repo_id.split("/")[0] if "/" in repo_id else user
    if namespace not in namespaces:
        organisations = ", ".join(sorted(namespaces - {user})) or "none"
        raise HubUnavailable(
            f"the token belongs to {user} (organisations: {organisations}), who cannot write to "
            f"{namespace}/; push to {user}/... or use a token of {namespace} ({later})"
        )
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
    if not (folder / MARKER).is_file():
        raise FileNotFoundError(f"{folder} is not a clipforge export folder (no {MARKER})")
    api = api or HfApi(token=token)
    check_access(api, repo_id)
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
