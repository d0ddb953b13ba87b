"""clipforge: train CLIP-style image–text dual encoders on WebDataset shards, evaluate them zero-shot."""

__version__ = "0.1.0"
