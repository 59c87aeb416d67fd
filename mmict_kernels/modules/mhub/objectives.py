"""How FusedMHub lays several self-attention masks (BLIP-2 stage-1 objectives) over one pass.

``forward_objectives`` runs ITC ("unimodal"), ITM ("bidirectional") and ITG ("multimodal_causal")
over the same inputs: their rows are stacked objective-major in one hidden-state tensor, so every
layer projects, normalises and cross-attends them in one call. This module holds the planning
only (which objective gets rows, and where each objective's output is read back); the layer loop
that runs the plan is :class:`~mmict_kernels.modules.mhub.hub.FusedMHub`'s. Plain functions on
tuples and ints, so ``torch.compile(fullgraph=True)`` traces them as constants.
"""

from __future__ import annotations

import torch

from ... import ops


def share_query_stream(masks):
    """How forward_objectives lays out its objectives: (row_masks, itc, itg_row).

    Under both the "unimodal" (ITC) and the "multimodal_causal" (ITG) mask a query row attends to
    query keys only, then cross-attends the image, in every layer. Both start from the same
    embeddings, so by induction over the layers their query rows are equal: one query stream serves
    both. ITC's text rows attend to valid text keys only, which is exactly a text-only pass (no
    queries, the padding mask); ITG's text rows attend to the shared queries and earlier text.
    So when the masks hold one ITC and one ITG, ITC gets no rows of its own: its output is
    [ITG's query rows ; a text-only stream], and ``row_masks`` lists the other objectives.
    Exact up to rounding: the text-only attention drops the masked query keys, which add exact zeros.
    This is also how LAVIS's BLIP-2 stage 1 runs them (ITG reads the query K/V of ITC's pass; ITC's
    text is its own BERT pass), so in training ITC and ITG share one dropout draw for the queries.

    Returns ``(masks, None, None)`` when there is nothing to share (duplicates are left as they are).
    """
    names = [ops.canonical_mask(m) for m in masks]
    if names.count("unimodal") != 1 or names.count("multimodal_causal") != 1:
        return tuple(masks), None, None
    itc = names.index("unimodal")
    row_masks = tuple(masks[:itc]) + tuple(masks[itc + 1 :])
    itg_row = (names[:itc] + names[itc + 1 :]).index("multimodal_causal")
    return row_masks, itc, itg_row


def objective_state(objective: int, rows_state, text_state, *, itc, itg_row, num_rows: int, batch: int, nq: int) -> torch.Tensor:
    """Objective ``objective``'s hidden states (B, L, hidden) at one depth, read back from the stacked rows.

    ``rows_state`` is (num_rows * B, L, hidden), one block of B rows per mask of ``row_masks``;
    ``text_state`` is the shared ITC's text-only stream (or None). A shared ITC (``itc`` is not None)
    is ITG's query rows followed by that stream.
    """
    if objective == itc:
        queries = rows_state[itg_row * batch : (itg_row + 1) * batch, :nq]
        return queries if text_state is None else torch.cat([queries, text_state], dim=1)
    r = objective if itc is None or objective < itc else objective - 1
    return rows_state[r * batch : (r + 1) * batch] if num_rows > 1 else rows_state
