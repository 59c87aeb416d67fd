"""Padded text positions: the per-token work of a layer runs on the text tokens alone.

InstructBLIP's instruction text reaches the Q-Former right-padded to the longest text of the batch
(LAVIS pads to the longest; the ragged benchmarks leave about half the text slots empty).
transformers runs every position-wise part of a layer (the Q/K/V projection, the attention output
block and the text FFN: all of a text token's matmul work) over the padded slots too,
yet nothing reads them: padded keys are masked out of every attention, and no objective reads a
padded position. So FusedMHub:

- on the CPU path (CPU tensors, not the GPU kernels' backend), gathers the rows to compute (all query rows, then the valid text rows) once per layer
  (:meth:`TextRows.gather`) and runs every position-wise matmul on them: the Q/K/V projection (q, k
  and v scattered back to the padded layout for the attention, :meth:`TextRows.scatter`), the
  output block and the text FFN; the text comes back in the padded layout with zeros in the padded
  slots (:meth:`TextRows.scatter_text`). The gather index comes from the text lengths, a host read
  that costs nothing on a CPU;
- elsewhere (on a GPU the packed row count would be a host sync; under ``torch.compile`` a
  data-dependent shape) computes the padded slots as transformers does and zeroes them
  (:meth:`TextRows.zero_padding`).

Either way each layer's output is zero at padded text positions and carries no gradient from
there, on every device; the valid positions are transformers' own (the padded ones never reach
them).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# Gather the rows to compute on a CPU (False: compute the padded slots and zero them, as on a GPU;
# the tests compare the two paths).
PACK_ON_CPU = True


class _ScatterRows(torch.autograd.Function):
    """(n, W) rows into a (num_rows, W) zero tensor at ``index``; backward gathers them back.

    Keeps only the index: ``Tensor.index_copy``'s autograd would keep the source rows too."""

    @staticmethod
    def forward(ctx, rows, index, num_rows: int):
        ctx.save_for_backward(index)
        return rows.new_zeros(num_rows, rows.shape[1]).index_copy_(0, index, rows)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


class TextRows(NamedTuple):
    """Where the text tokens of a (rows, nq + text, .) hidden state are (rows: objective-major, ``r * B + b``).

    valid: (rows, text, 1) bool, True at a text token.
    rows_index: on the packed path, the flat (rows * (nq + text)) positions to compute: every query
        position (row-major), then every valid text position (row-major); None elsewhere.
    text_index: on the packed path, the valid text positions among the flat (rows * text) ones.
    query_rows: rows * nq (where the query rows end in the packed order).
    """

    valid: torch.Tensor
    rows_index: torch.Tensor | None
    text_index: torch.Tensor | None
    query_rows: int

    @classmethod
    def of(cls, lengths: torch.Tensor | None, rows: int, nq: int, seq_len: int, pack: bool) -> TextRows | None:
        """The layout of ``rows`` rows whose text lengths are ``lengths`` (B,) repeated per objective; None
        when no position is padding (no mask, or no text). ``pack``: whether the caller runs the CPU
        path (``FusedMHub._cpu_path``: eager torch ops on CPU tensors); elsewhere the padded slots are
        computed and zeroed, as on a GPU."""
        text_len = seq_len - nq
        if lengths is None or text_len <= 0:
            return None
        per_row = lengths.repeat(rows // lengths.shape[0])
        valid = torch.arange(text_len, device=lengths.device)[None, :] < per_row[:, None]
        if not pack or not PACK_ON_CPU:
            return cls(valid[..., None], None, None, rows * nq)
        if bool(valid.all()):
            return None  # nothing padded: the plain path is the same function
        positions = torch.arange(rows * seq_len).view(rows, seq_len)
        text_index = torch.arange(rows * text_len).view(rows, text_len)[valid]
        rows_index = torch.cat([positions[:, :nq].reshape(-1), positions[:, nq:][valid]])
        return cls(valid[..., None], rows_index, text_index, rows * nq)

    @property
    def packed(self) -> bool:
        return self.rows_index is not None

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, L, W) -> (rows * nq + text tokens, W): the query rows, then the valid text rows."""
        return x.reshape(-1, x.shape[-1]).index_select(0, self.rows_index)

    def scatter(self, x: torch.Tensor, seq_len: int) -> torch.Tensor:
        """(rows * nq + text tokens, ...) in :meth:`gather`'s order -> (rows, seq_len, ...), zeros in the padded slots."""
        rows = self.valid.shape[0]
        full = _ScatterRows.apply(x.reshape(x.shape[0], -1), self.rows_index, rows * seq_len)
        return full.view(rows, seq_len, *x.shape[1:])

    def scatter_text(self, text: torch.Tensor) -> torch.Tensor:
        """(text tokens, W) -> (rows, text, W) with zeros in the padded slots."""
        rows, text_len = self.valid.shape[:2]
        return _ScatterRows.apply(text, self.text_index, rows * text_len).view(rows, text_len, text.shape[-1])

    def zero_padding(self, text: torch.Tensor) -> torch.Tensor:
        """(rows, text, W) with its padded slots set to zero (the unpacked path)."""
        return torch.where(self.valid, text, 0.0)


__all__ = ["TextRows"]
