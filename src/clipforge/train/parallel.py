"""The one place that wraps the model for training: device placement and DistributedDataParallel."""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from clipforge.distributed import DistInfo


def parallelize(model: torch.nn.Module, dist_info: DistInfo) -> torch.nn.Module:
    model = model.to(dist_info.device)
    if not dist_info.is_distributed:
        return model
    device_ids = [dist_info.local_rank] if dist_info.device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)
