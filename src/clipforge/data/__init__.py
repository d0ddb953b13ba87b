"""Training data: sources and shard lists, fast image decoding, the webdataset stream and its loader, shard writers.

The names below are imported on first use (PEP 562), not with the package: ``clipforge.data.config`` (read by every
command) and the shard reader behind ``clipforge prep inspect`` need no torch, which the stream imports.
"""

import importlib

_EXPORTS = {
    "DataConfig": "clipforge.data.config",
    "ImageTransform": "clipforge.data.images",
    "ShardedImageText": "clipforge.data.pipeline",
    "SourceConfig": "clipforge.data.sources",
    "TrainLoader": "clipforge.data.loader",
    "build_train_loader": "clipforge.data.loader",
    "expand_urls": "clipforge.data.sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
