"""What a FusedMHub training forward keeps for backward, against transformers' Q-Former (same weights, dropout on).

Bytes are counted with ``torch.autograd.graph.saved_tensors_hooks``, once per storage, parameters
excluded (a copy of a weight counts). ``benchmarks/memory.py`` measures the production shape; here a
small config with the same structure (queries + text, cross-attention every 2nd layer) runs in seconds.
"""

from __future__ import annotations

import pytest
import torch

from helpers.mhub import make_hf, make_inputs
from mmict_kernels import FusedMHub


def saved_bytes(model, inputs) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t.detach()  # not t itself: a node keeping its own output would form an uncollectable cycle

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    return sum(seen.values())


def _pair(checkpointing=False):
    hf = make_hf("instructblip", layers=4, freq=2, dropout=0.1, hidden_size=96, num_attention_heads=4, intermediate_size=384)
    hf.train()
    if checkpointing:
        hf.gradient_checkpointing_enable()
    hub = FusedMHub.from_hf(hf, backend="torch").train()
    return hf, hub


def _inputs():
    inputs = make_inputs("instructblip", batch=4, nq=8, image_tokens=33, text_lengths=[8, 8, 5, 8])
    inputs["query_embeds"] = torch.randn(4, 8, 96)
    return inputs


def test_keeps_at_most_07x_of_transformers():
    hf, hub = _pair()
    inputs = _inputs()
    ours, theirs = saved_bytes(hub, inputs), saved_bytes(hf, inputs)
    assert ours <= 0.7 * theirs, (ours, theirs, ours / theirs)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_gradient_checkpointing_keeps_layer_inputs_only():
    hf, hub = _pair(checkpointing=True)
    assert hub.gradient_checkpointing
    inputs = _inputs()
    ours = saved_bytes(hub, inputs)
    hub.gradient_checkpointing_disable()
    assert ours < 0.2 * saved_bytes(hub, inputs)
    assert ours <= saved_bytes(hf, inputs)
