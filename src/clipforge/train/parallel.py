"""The one place that prepares the model for training: every option applied from outside the model code.

``prepare_model`` takes the model ``build_model`` made and, in this order: freezes the temperature (and bias)
unless ``loss.learn_temperature``, locks towers (LiT: ``model.lock_image`` / ``model.lock_text``), turns on
gradient checkpointing, lets the text tower take trimmed token batches (``train.trim_text_padding``), switches to
channels-last (``train.channels_last``), places it on the device and wraps it for data parallelism
(``parallelize``: DDP), then compiles it (``train.compile``; after wrapping, see ``TrainConfig.compile``).
Model code knows none of this.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel

from clipforge.distributed import DistInfo
from clipforge.models import ModelConfig, enable_text_trimming

log = logging.getLogger("clipforge.train")


@dataclass
class PreparedModel:
    model: torch.nn.Module  # what the step calls: wrapped and compiled as configured
    trim_text: bool  # the loader may cut token columns after each batch's last end-of-text token
    channels_last: bool  # batches' images go channels-last too


def prepare_model(model: torch.nn.Module, model_cfg: ModelConfig, train_cfg, learn_temperature: bool,
                  dist_info: DistInfo) -> PreparedModel:
    """``model`` (open_clip, as ``build_model`` made it) ready to train; ``train_cfg`` is the ``TrainConfig``."""
    apply_training_options(model, model_cfg, learn_temperature)
    trim_text = train_cfg.trim_text_padding and enable_text_trimming(model)
    channels_last = use_channels_last(train_cfg.channels_last, model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        log.info("channels-last memory format (train.channels_last: %s)", train_cfg.channels_last)
    wrapped = parallelize(model, dist_info)
    if train_cfg.compile:
        wrapped.compile()
    return PreparedModel(wrapped, trim_text, channels_last)


def apply_training_options(model: torch.nn.Module, cfg: ModelConfig, learn_temperature: bool = True) -> None:
    """Temperature freezing, gradient checkpointing and tower locking (open_clip's own implementations)."""
    if not learn_temperature:
        for name in ("logit_scale", "logit_bias"):
            if getattr(model, name, None) is not None:
                getattr(model, name).requires_grad_(False)
    if cfg.grad_checkpointing:
        try:
            model.set_grad_checkpointing(True)
        except AssertionError as exn:  # open_clip's ModifiedResNet: "not supported"
            raise ValueError(f"model.grad_checkpointing: not supported by {type(model.visual).__name__} "
                             "image towers") from exn
    if cfg.lock_image:
        model.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups,
                               freeze_bn_stats=cfg.lock_image_freeze_bn_stats)
    if cfg.lock_text:
        model.lock_text_tower(unlocked_layers=cfg.lock_text_unlocked_layers,
                              freeze_layer_norm=cfg.lock_text_freeze_layer_norm)


def use_channels_last(setting: bool | str, model: torch.nn.Module) -> bool:
    """train.channels_last resolved: 'auto' is on when the image tower is convolutional (more than one Conv2d)."""
    if setting != "auto":
        return bool(setting)
    visual = getattr(model, "visual", None)
    return visual is not None and sum(isinstance(m, torch.nn.Conv2d) for m in visual.modules()) > 1


def parallelize(model: torch.nn.Module, dist_info: DistInfo) -> torch.nn.Module:
    model = model.to(dist_info.device)
    if not dist_info.is_distributed:
        return model
    device = torch.device(dist_info.device)
    device_ids = [device.index] if device.type == "cuda" else None  # from_env's choice: local rank % visible GPUs
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP shards (DTensors) rather than whole replicas."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(parameter, DTensor) for parameter in unwrap(model).parameters())
