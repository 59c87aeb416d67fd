"""Launch heuristics shared by the fused-epilogue Triton kernels."""

import torch
import triton

from .. import triton_toolkit as tk

# One program holds a whole row in registers; past this the row no longer fits (the Triton
# LayerNorm tutorial uses the same bound).
MAX_FUSED_HIDDEN = 65536


def row_block(hidden: int) -> int:
    """Power-of-two block that covers a whole row (masked past ``hidden``)."""
    if hidden > MAX_FUSED_HIDDEN:
        raise ValueError(f"x: the Triton epilogue keeps a row in registers, so hidden <= {MAX_FUSED_HIDDEN}, got {hidden}")
    return triton.next_power_of_2(max(hidden, 16))


def num_warps_for(block: int) -> int:
    """Enough warps that each thread holds a few elements of a row (1 warp for tiny rows, 16 at most)."""
    return min(max(block // 256, 1), 16)


def num_partials(n_rows: int, device: torch.device) -> int:
    """How many programs split the rows of a backward pass (each writes one partial sum of the
    parameter gradients, then torch sums the partials: a fixed order, so it is deterministic).

    One per SM on a GPU keeps the partial buffer small; on the CPU interpreter a few suffice.
    """
    return max(1, min(n_rows, tk.num_sms(device)))
