"""Training data: sources and shard lists, fast image decoding, the webdataset stream, shard writers."""

from clipforge.data.images import ImageTransform
from clipforge.data.pipeline import DataConfig, ShardedImageText, TrainLoader, build_train_loader
from clipforge.data.sources import SourceConfig, expand_urls

__all__ = [
    "DataConfig",
    "ImageTransform",
    "ShardedImageText",
    "SourceConfig",
    "TrainLoader",
    "build_train_loader",
    "expand_urls",
]
