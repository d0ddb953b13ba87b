"""How a model FLOP is counted where torch's counter does not count it as clipforge does: fused attention as its
matmuls on every device (``ATTENTION_FLOPS``, a ``FlopCounterMode`` custom mapping). ``clipforge.train.flops``
counts the towers with it, an objective its own modules (``train_flops``), so both follow one rule."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import sdpa_flop_count


def _attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * sdpa_flop_count(query_shape, key_shape, value_shape)  # the gradients' four matmuls, no recomputation


_ATEN = torch.ops.aten
# Fused attention counted as its matmuls on every device: torch counts none for the CPU kernel, and five (the
# scores recomputed) for the GPU kernels' backward; the meta device's math path is two forward, four backward.
ATTENTION_FLOPS = {
    _ATEN._scaled_dot_product_flash_attention_for_cpu: _attention,
    _ATEN._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward,
    _ATEN._scaled_dot_product_flash_attention_backward: _attention_backward,
    _ATEN._scaled_dot_product_efficient_attention_backward: _attention_backward,
    _ATEN._scaled_dot_product_cudnn_attention_backward: _attention_backward,
}
