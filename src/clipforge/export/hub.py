"""Upload an export folder to the Hugging Face Hub with ``huggingface_hub``.

    clipforge export runs/demo/checkpoints/latest --format hf --out exported/demo --push org/name [--private]

The token is whatever ``HfApi`` finds: ``HF_TOKEN`` or the ``huggingface_hub`` login. The repo is
created if needed (``--private`` applies then; an existing repo keeps its visibility), a
``--revision`` branch is created from main if missing, and the folder is uploaded in one commit.
A repo that already holds files but no ``clipforge_export.json`` was not written by clipforge and
is refused unless ``force``; then the upload only adds and replaces files. A clipforge repo is made
to mirror the folder (files of an earlier export that this one lacks are deleted in the same
commit), so a stale ``open_clip_model.safetensors`` cannot outlive the weights it belonged to.
"""

from __future__ import annotations

import logging
from pathlib import Path

from huggingface_hub import HfApi

log = logging.getLogger(__name__)

MARKER = "clipforge_export.json"


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, force: bool = False, token: str | None = None,
                api: HfApi | None = None) -> str:
    """Upload ``folder`` (a clipforge export) to the model repo ``repo_id``; returns the commit URL."""
    folder = Path(folder)
    if not (folder / MARKER).is_file():
        raise FileNotFoundError(f"{folder} is not a clipforge export folder (no {MARKER})")
    api = api or HfApi(token=token)
    mirror = True
    if api.repo_exists(repo_id, repo_type="model"):
        files = api.list_repo_files(repo_id, repo_type="model")
        foreign = [name for name in files if name != ".gitattributes"]
        if foreign and MARKER not in files:
            if not force:
                raise ValueError(f"{repo_id} exists and was not written by clipforge (no {MARKER}; it holds "
                                 f"{', '.join(sorted(foreign)[:5])}{' ...' if len(foreign) > 5 else ''}); "
                                 "pass --force to upload over it")
            mirror = False
        if private:
            log.warning("%s already exists: its visibility is left as it is", repo_id)
    else:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
                               commit_message=commit_message or f"clipforge export ({folder.name})",
                               delete_patterns="*" if mirror else None)
    log.info("pushed %s to %s", folder, commit.commit_url)
    return commit.commit_url
