"""The one place that wraps the model for training: device placement and DistributedDataParallel."""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from clipforge.distributed import DistInfo


def parallelize(model: torch.nn.Module, dist_info: DistInfo) -> torch.nn.Module:
    model = model.to(dist_info.device)
    if not dist_info.is_distributed:
        return model
    device = torch.device(dist_info.device)
    device_ids = [device.index] if device.type == "cuda" else None  # from_env's choice: local rank % visible GPUs
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)
