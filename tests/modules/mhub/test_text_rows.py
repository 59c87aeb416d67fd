"""Padded text slots: skipped on a CPU (the valid rows gathered), zeroed elsewhere; the same function either way."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers.mhub import HIDDEN, INTERMEDIATE, as_fused, make_hf, make_inputs, run_with_grads, valid_positions
from mmict_kernels import FusedMHub
from mmict_kernels.modules.mhub import text_rows
from mmict_kernels.modules.mhub.text_rows import TextRows

TEXT = [3, 0, 7, 5]  # of 7 slots: 13 padded


def _hub_and_inputs(dropout=0.0, seed=0):
    hf = make_hf("instructblip", seed=seed, layers=3, freq=2, dropout=dropout)
    hub = FusedMHub.from_hf(copy.deepcopy(hf), backend="torch")
    inputs = make_inputs("instructblip", batch=4, nq=6, image_tokens=9, image_lengths=[9, 4, 1, 6], text_lengths=TEXT)
    return hf, hub, inputs


@pytest.mark.parametrize("masks", [None, ("unimodal", "bidirectional", "multimodal_causal")])
def test_packed_and_zeroed_paths_agree(monkeypatch, masks):
    """Outputs and every gradient of the CPU (gathered rows) path equal the unpacked one's (padded slots computed, then zeroed)."""
    _, hub, inputs = _hub_and_inputs()
    hub.eval()
    results = []
    for pack in (True, False):
        monkeypatch.setattr(text_rows, "PACK_ON_CPU", pack)
        torch.manual_seed(0)  # the same output weights (randn_like below) in both passes
        model = copy.deepcopy(hub)
        if masks is None:
            shape = (4, 13, HIDDEN)
            dout = torch.randn(shape, generator=torch.Generator().manual_seed(3))
            out, grads = run_with_grads(model, inputs, torch.float32, dout)
            outs = [out]
        else:
            leaves = {k: (v.detach().requires_grad_(True) if v.is_floating_point() else v) for k, v in inputs.items()}
            outs = [o.last_hidden_state for o in model.forward_objectives(**leaves, masks=masks)]
            sum((o * torch.randn_like(o)).sum() for o in outs).backward()
            grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            grads.update({k: v.grad for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.grad is not None})
        results.append(([o.detach() for o in outs], grads))
    (outs_a, grads_a), (outs_b, grads_b) = results
    for a, b in zip(outs_a, outs_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not a.masked_select(~valid_positions(inputs, a.shape).expand_as(a)).any()
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_training_with_dropout_zeroes_padding_and_matches_transformers_in_eval():
    hf, hub, inputs = _hub_and_inputs(dropout=0.1)
    hub.train()
    out = hub(**inputs).last_hidden_state
    valid = valid_positions(inputs, out.shape)
    assert not out.masked_select(~valid.expand_as(out)).any()
    (out * valid).square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in hub.parameters() if p.grad is not None)
    with torch.no_grad():
        torch.testing.assert_close(
            hub.eval()(**inputs).last_hidden_state, as_fused(hf.eval()(**inputs).last_hidden_state, inputs)
        )


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_padded_rows_cost_no_position_wise_work(monkeypatch):
    """FLOPs saved by gathering the rows: per padded slot and layer, the Q/K/V projection (3 x 2 W^2), the output
    block (2 W^2) and the text FFN (4 W I) in the forward, twice that in the backward (input and weight
    gradients); transformers does them all."""
    hf, hub, inputs = _hub_and_inputs()
    hub.train()
    padded, layers = sum(7 - n for n in TEXT), 3
    forward = padded * layers * (4 * 2 * HIDDEN * HIDDEN + 4 * HIDDEN * INTERMEDIATE)
    counts = {}
    for pack in (True, False):
        monkeypatch.setattr(text_rows, "PACK_ON_CPU", pack)
        with torch.no_grad():
            fwd = _flops(lambda: hub(**inputs))
        step = _flops(lambda: hub(**inputs).last_hidden_state.sum().backward())
        counts[pack] = fwd, step
    assert counts[False][0] - counts[True][0] == forward
    assert counts[False][1] - counts[True][1] == 3 * forward
    theirs = _flops(lambda: hf.train()(**inputs).last_hidden_state.sum().backward())
    assert theirs - counts[True][1] >= 3 * forward


def test_layout_of_the_rows():
    lengths = torch.tensor([2, 0, 3], dtype=torch.int32)
    assert TextRows.of(None, 3, 2, 5, True) is None  # no mask
    assert TextRows.of(lengths, 3, 2, 2, True) is None  # no text
    assert TextRows.of(torch.tensor([3, 3, 3], dtype=torch.int32), 3, 2, 5, True) is None  # nothing padded
    rows = TextRows.of(lengths, 6, 2, 5, True)  # two objectives over a batch of 3: rows r * 3 + b
    assert rows.packed and rows.query_rows == 12
    # rows of 5 positions (2 queries + 3 text): queries first, then the valid text positions, row by row
    queries = [r * 5 + i for r in range(6) for i in range(2)]
    text = [0 * 5 + 2, 0 * 5 + 3, 2 * 5 + 2, 2 * 5 + 3, 2 * 5 + 4, 3 * 5 + 2, 3 * 5 + 3, 5 * 5 + 2, 5 * 5 + 3, 5 * 5 + 4]
    assert rows.rows_index.tolist() == queries + text
    assert not TextRows.of(lengths, 6, 2, 5, False).packed  # the GPU kernels' path: every slot, then zeroed
    x = torch.arange(6 * 5, dtype=torch.float32).view(6, 5, 1)
    gathered = rows.gather(x)
    assert gathered.flatten().tolist() == queries + text
    back = rows.scatter_text(gathered[rows.query_rows :])
    torch.testing.assert_close(back, rows.zero_padding(x[:, 2:]))
