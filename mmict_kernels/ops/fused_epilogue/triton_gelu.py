"""Triton bias + exact (erf) GELU, the BERT intermediate block after a bias-free matmul.

Forward: y = gelu(x + bias) = u * Phi(u), u = x + bias, in float32; one read, one write.
Backward: dx = dy * (Phi(u) + u * phi(u)) with u rebuilt from x and bias (u is never stored),
and dbias = column sums of dx: each program owns a column block and a chunk of rows, writes one
float32 partial row, and torch sums the partials (deterministic).
"""

import torch
import triton
import triton.language as tl

from ..triton_toolkit import INV_SQRT2, INV_SQRT_2PI
from .triton_common import num_partials


def _tile(n_cols: int) -> tuple[int, int]:
    """(rows, cols) of one tile: up to 256 columns wide, ~2048 elements."""
    block_n = min(triton.next_power_of_2(max(n_cols, 16)), 256)
    return max(2048 // block_n, 1), block_n


@triton.jit
def _bias_gelu_fwd_kernel(X, BIAS, Y, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    u = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    u += tl.load(BIAS + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
    y = 0.5 * u * (1.0 + tl.erf(u * INV_SQRT2))
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    DY, X, BIAS, DX, PARTIALS, n_rows, n_cols, rows_per_program, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    pid_rows = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    bias = tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)
    dbias = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid_rows * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for tile_start in range(row_start, row_end, BLOCK_M):
        rows = tile_start + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < row_end) & col_mask[None, :]
        offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        u = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) + bias[None, :]
        cdf = 0.5 * (1.0 + tl.erf(u * INV_SQRT2))
        pdf = tl.exp(-0.5 * u * u) * INV_SQRT_2PI
        dx = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32) * (cdf + u * pdf)
        dx = tl.where(mask, dx, 0.0)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        dbias += tl.sum(dx, axis=0)
    tl.store(PARTIALS + pid_rows * n_cols + cols, dbias, mask=col_mask)


@torch.library.custom_op("mmict::bias_gelu_triton_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x: contiguous (rows, hidden); bias: (hidden,). Returns gelu(x + bias), (rows, hidden)."""
    n_rows, n_cols = x.shape
    y = torch.empty_like(x)
    if x.numel() > 0:
        block_m, block_n = _tile(n_cols)
        grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
        _bias_gelu_fwd_kernel[grid](x, bias, y, n_rows, n_cols, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return y


@_fwd_op.register_fake
def _(x, bias):
    return torch.empty_like(x)


@torch.library.custom_op("mmict::bias_gelu_triton_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns dx (rows, hidden) and dbias (hidden,) float32."""
    n_rows, n_cols = x.shape
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return dx, torch.zeros(n_cols, dtype=torch.float32, device=x.device)
    block_m, block_n = _tile(n_cols)
    # Split the rows over about one program per SM in total (column blocks included).
    col_blocks = triton.cdiv(n_cols, block_n)
    programs = max(1, num_partials(n_rows, x.device) // col_blocks)
    rows_per_program = triton.cdiv(n_rows, programs)
    programs = triton.cdiv(n_rows, rows_per_program)
    partials = torch.empty(programs, n_cols, dtype=torch.float32, device=x.device)
    _bias_gelu_bwd_kernel[(programs, col_blocks)](
        dy, x, bias, dx, partials, n_rows, n_cols, rows_per_program, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4
    )
    return dx, partials.sum(dim=0)


@_bwd_op.register_fake
def _(dy, x, bias):
    return torch.empty_like(x), x.new_empty(x.shape[1], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, dbias = _bwd_op(dy.contiguous(), x, bias)
    return dx, dbias.to(bias.dtype)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def bias_gelu_triton(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Backend entry (inputs already validated): x (..., hidden), bias (hidden,)."""
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    return _fwd_op(x2d, bias.contiguous()).reshape(x.shape)
