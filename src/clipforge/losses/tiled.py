"""Memory-flat kernels, in the manner of Inf-CL (Cheng et al., 2024): the (rows, columns) logits are never
materialised; forward keeps only a per-row log-sum-exp (or a running sum), backward recomputes each (tile × tile)
block. Peak memory is O(tile²) instead of O(B_local × B_global); results equal the untiled loss to float rounding.

InfoNCE keeps a per-row log-sum-exp (``tiled_logsumexp``; ``symmetric_tiled_logsumexp`` shares every tile's
product between the row and column directions when one process holds both); the sigmoid loss is a sum of
elementwise terms and is tiled the same way (``sigmoid_loss_sum``). Backward passes are written out by hand.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _tiles(size: int, tile: int):
    return [(start, min(start + tile, size)) for start in range(0, size, tile)]


class _TiledLogSumExp(torch.autograd.Function):
    """lse_i = log Σ_j exp(scale · q_i · k_j) for queries (R, D), keys (C, D) → (R,)."""

    @staticmethod
    def forward(ctx, queries, keys, scale, tile):
        lse = torch.empty(queries.shape[0], device=queries.device, dtype=torch.float32)
        for r0, r1 in _tiles(queries.shape[0], tile):
            scaled = queries[r0:r1] * scale
            parts = [
                torch.logsumexp(scaled @ keys[c0:c1].T, dim=1)  # (tile_r,)
                for c0, c1 in _tiles(keys.shape[0], tile)
            ]
            lse[r0:r1] = torch.logsumexp(torch.stack(parts), dim=0)
        ctx.save_for_backward(queries, keys, scale, lse)
        ctx.tile = tile
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        queries, keys, scale, lse = ctx.saved_tensors
        grad_queries, grad_keys = torch.zeros_like(queries), torch.zeros_like(keys)
        grad_scale = torch.zeros((), device=queries.device, dtype=torch.float32)
        for r0, r1 in _tiles(queries.shape[0], ctx.tile):
            q, g, row_lse = queries[r0:r1], grad_lse[r0:r1, None], lse[r0:r1, None]
            scaled = q * scale
            for c0, c1 in _tiles(keys.shape[0], ctx.tile):
                k = keys[c0:c1]
                weights = (scaled @ k.T).sub_(row_lse).exp_().mul_(g)  # softmax × upstream gradient, (tile_r, tile_c)
                weighted_keys = weights @ k
                grad_queries[r0:r1] += scale * weighted_keys
                grad_keys[c0:c1] += weights.T @ scaled
                grad_scale += (q * weighted_keys).sum()  # Σ weights ⊙ (q kᵀ), without a tile-sized product
        return grad_queries, grad_keys, grad_scale, None


def tiled_logsumexp(queries: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, tile: int) -> torch.Tensor:
    return _TiledLogSumExp.apply(queries, keys, scale, tile)


class _SymmetricTiledLogSumExp(torch.autograd.Function):
    """Row and column log-sum-exp of scale · A Bᵀ for square (N, D) inputs, sharing every tile's product.

    One process holding the whole batch needs both directions of the same matrix: each tile is
    multiplied once in forward and once in backward (four products in all, against six for
    materialised logits).
    """

    @staticmethod
    def forward(ctx, rows, cols, scale, tile):
        row_lse = torch.full((rows.shape[0],), -math.inf, device=rows.device)
        col_lse = torch.full((cols.shape[0],), -math.inf, device=rows.device)
        for r0, r1 in _tiles(rows.shape[0], tile):
            scaled = rows[r0:r1] * scale
            for c0, c1 in _tiles(cols.shape[0], tile):
                logits = scaled @ cols[c0:c1].T  # (tile_r, tile_c)
                row_lse[r0:r1] = torch.logaddexp(row_lse[r0:r1], torch.logsumexp(logits, dim=1))
                col_lse[c0:c1] = torch.logaddexp(col_lse[c0:c1], torch.logsumexp(logits, dim=0))
        ctx.save_for_backward(rows, cols, scale, row_lse, col_lse)
        ctx.tile = tile
        return row_lse, col_lse

    @staticmethod
    def backward(ctx, grad_row_lse, grad_col_lse):
        rows, cols, scale, row_lse, col_lse = ctx.saved_tensors
        grad_rows, grad_cols = torch.zeros_like(rows), torch.zeros_like(cols)
        grad_scale = torch.zeros((), device=rows.device, dtype=torch.float32)
        for r0, r1 in _tiles(rows.shape[0], ctx.tile):
            q = rows[r0:r1]
            scaled = q * scale
            for c0, c1 in _tiles(cols.shape[0], ctx.tile):
                k = cols[c0:c1]
                logits = scaled @ k.T
                weights = torch.exp(logits - row_lse[r0:r1, None]).mul_(grad_row_lse[r0:r1, None])
                weights += logits.sub_(col_lse[None, c0:c1]).exp_().mul_(grad_col_lse[None, c0:c1])
                weighted_cols = weights @ k
                grad_rows[r0:r1] += scale * weighted_cols
                grad_cols[c0:c1] += weights.T @ scaled
                grad_scale += (q * weighted_cols).sum()
        return grad_rows, grad_cols, grad_scale, None


class _TiledSoftplusSum(torch.autograd.Function):
    """Σ_ij softplus(scale · q_i · k_j + bias) for queries (R, D), keys (C, D), in (tile × tile) blocks.

    The sigmoid loss of a negative pair is -log σ(-logit) = softplus(logit); a positive pair's
    -log σ(logit) = softplus(logit) - logit, so the caller subtracts the positive logits.
    """

    @staticmethod
    def forward(ctx, queries, keys, scale, bias, tile):
        total = torch.zeros((), device=queries.device, dtype=torch.float32)
        for r0, r1 in _tiles(queries.shape[0], tile):
            scaled = queries[r0:r1] * scale
            for c0, c1 in _tiles(keys.shape[0], tile):
                total += F.softplus(torch.addmm(bias, scaled, keys[c0:c1].T)).sum()
        ctx.save_for_backward(queries, keys, scale, bias)
        ctx.tile = tile
        return total

    @staticmethod
    def backward(ctx, grad_total):
        queries, keys, scale, bias = ctx.saved_tensors
        grad_queries, grad_keys = torch.zeros_like(queries), torch.zeros_like(keys)
        grad_scale = torch.zeros((), device=queries.device, dtype=torch.float32)
        grad_bias = torch.zeros((), device=queries.device, dtype=torch.float32)
        for r0, r1 in _tiles(queries.shape[0], ctx.tile):
            q = queries[r0:r1]
            scaled = q * scale
            for c0, c1 in _tiles(keys.shape[0], ctx.tile):
                k = keys[c0:c1]
                grad_logits = torch.addmm(bias, scaled, k.T).sigmoid_().mul_(grad_total)  # softplus' = sigmoid
                weighted_keys = grad_logits @ k
                grad_queries[r0:r1] += scale * weighted_keys
                grad_keys[c0:c1] += grad_logits.T @ scaled
                grad_scale += (q * weighted_keys).sum()
                grad_bias += grad_logits.sum()
        return grad_queries, grad_keys, grad_scale, grad_bias, None


def sigmoid_loss_sum(queries, keys, scale, bias, positive_offset, tile_size: int) -> torch.Tensor:
    """Σ -log σ(z · logits) over all (query, key) pairs, z = +1 at (i, i + positive_offset), else -1;
    positive_offset None = negatives only."""
    if tile_size:
        total = _TiledSoftplusSum.apply(queries, keys, scale, bias, tile_size)
        if positive_offset is not None:
            partners = keys[positive_offset : positive_offset + queries.shape[0]]
            total = total - (scale * (queries * partners).sum(dim=1) + bias).sum()
        return total
    logits = scale * queries @ keys.T + bias  # (R, C)
    signs = -torch.ones_like(logits)
    if positive_offset is not None:
        rows = torch.arange(queries.shape[0], device=queries.device)
        signs[rows, rows + positive_offset] = 1.0
    return -F.logsigmoid(signs * logits).sum()


def symmetric_tiled_logsumexp(
    rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, tile: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column log-sum-exp of scale · rows colsᵀ for square (N, D) inputs: (N,), (N,)."""
    return _SymmetricTiledLogSumExp.apply(rows, cols, scale, tile)
