"""Training data: shard lists, the webdataset stream, synthetic shards and their writer."""

from clipforge.data.pipeline import DataConfig, ShardedImageText, TrainLoader, build_train_loader, expand_urls

__all__ = ["DataConfig", "ShardedImageText", "TrainLoader", "build_train_loader", "expand_urls"]
