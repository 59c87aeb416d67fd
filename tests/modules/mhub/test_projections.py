"""FusedMHub's fused Q/K/V (cross-attention K/V) weights: one parameter each, transformers' names in every state dict.

Round trips both ways against real transformers Q-Formers (random weights): transformers -> FusedMHub
(``from_hf``, ``load_state_dict`` of its state dict, a safetensors file of it) and FusedMHub ->
transformers (``load_state_dict`` of the hub's state dict, strict), with equal outputs; no saved tensor
is a copy of a weight.
"""

from __future__ import annotations

import pytest
import torch

from helpers.mhub import as_fused, make_hf, make_inputs, small_config
from mmict_kernels import FusedMHub

FLAVORS = [("blip2", False), ("blip2", True), ("instructblip", False)]


def _eval_out(model, inputs):
    with torch.no_grad():
        return model(**inputs).last_hidden_state


@pytest.mark.parametrize("flavor,text", FLAVORS)
def test_parameters_are_fused_and_state_dict_uses_transformers_names(flavor, text):
    hf = make_hf(flavor, layers=3, freq=2, text=text)
    hub = FusedMHub.from_hf(hf, backend="torch")
    names = dict(hub.named_parameters())
    assert "encoder.layer.0.attention.attention.qkv.weight" in names
    assert "encoder.layer.0.crossattention.attention.kv.weight" in names
    assert "encoder.layer.0.crossattention.attention.query.weight" in names  # the query reads the queries, not the image
    assert not any(n.endswith((".attention.attention.query.weight", ".key.weight", ".value.weight")) for n in names)
    hidden = hf.config.hidden_size
    assert names["encoder.layer.1.attention.attention.qkv.weight"].shape == (3 * hidden, hidden)
    assert names["encoder.layer.2.crossattention.attention.kv.bias"].shape == (2 * hidden,)
    state = hub.state_dict()
    assert set(state) - {"query_tokens"} == set(hf.state_dict())
    for key, ref in hf.state_dict().items():
        assert torch.equal(state[key], ref), key
    # a snapshot: the split parts share no storage with the parameters or with each other
    ptrs = [
        state[f"encoder.layer.0.attention.attention.{p}.weight"].untyped_storage().data_ptr() for p in ("query", "key", "value")
    ]
    assert (
        len(set(ptrs)) == 3 and names["encoder.layer.0.attention.attention.qkv.weight"].untyped_storage().data_ptr() not in ptrs
    )


@pytest.mark.parametrize("flavor,text", FLAVORS)
def test_round_trip_to_transformers_and_back(flavor, text):
    hf = make_hf(flavor, layers=3, freq=2, text=text)
    hub = FusedMHub(hf.config, flavor=flavor, num_query_tokens=6, backend="torch").eval()  # its own random weights
    fresh = make_hf(flavor, seed=5, layers=3, freq=2, text=text)
    fresh.load_state_dict({k: v for k, v in hub.state_dict().items() if k != "query_tokens"}, strict=True)
    inputs = make_inputs(
        flavor, batch=2, nq=6, image_tokens=9, text_lengths=[3, 1] if (text or flavor == "instructblip") else None
    )
    if flavor == "instructblip":
        inputs.pop("query_embeds")
        inputs["query_embeds"] = hub.query_tokens.detach().expand(2, -1, -1)
    torch.testing.assert_close(as_fused(_eval_out(fresh, inputs), inputs), _eval_out(hub, inputs), rtol=1e-5, atol=1e-5)
    # ... and back: transformers' state dict into another hub, strict
    again = FusedMHub(hf.config, flavor=flavor, num_query_tokens=6, backend="torch").eval()
    again.load_state_dict(fresh.state_dict(), strict=True)  # no query_tokens in it: ours are kept
    again.query_tokens.data.copy_(hub.query_tokens)
    torch.testing.assert_close(_eval_out(again, inputs), _eval_out(hub, inputs), rtol=0, atol=0)


def test_safetensors_file_and_fused_keys_load(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = make_hf("instructblip", layers=2, freq=1)
    hub = FusedMHub.from_hf(hf, backend="torch").eval()
    path = tmp_path / "hub.safetensors"
    save_file(hub.state_dict(), str(path))  # refuses tensors sharing storage: the split parts must be fresh
    loaded = FusedMHub(hf.config, flavor="instructblip", num_query_tokens=32, backend="torch").eval()
    loaded.load_state_dict(load_file(str(path)), strict=True)
    inputs = make_inputs("instructblip", batch=2, nq=32, image_tokens=7, text_lengths=[2, 3])
    torch.testing.assert_close(_eval_out(loaded, inputs), _eval_out(hub, inputs), rtol=0, atol=0)
    # the fused names load too (e.g. a state dict built by hand from named_parameters)
    fused = {n: p.detach().clone() for n, p in hub.named_parameters()}
    other = FusedMHub(hf.config, flavor="instructblip", num_query_tokens=32, backend="torch").eval()
    other.load_state_dict(fused, strict=True)
    torch.testing.assert_close(_eval_out(other, inputs), _eval_out(hub, inputs), rtol=0, atol=0)
    # keep_vars: views of the parameters, no copies
    kept = hub.state_dict(keep_vars=True)["encoder.layer.0.attention.attention.key.weight"]
    assert kept.untyped_storage().data_ptr() == hub.encoder.layer[0].attention.attention.qkv.weight.untyped_storage().data_ptr()


def test_incomplete_or_misshapen_projections_are_refused_by_name():
    hf = make_hf("blip2", layers=2, freq=1)
    hub = FusedMHub(hf.config, flavor="blip2", num_query_tokens=4, backend="torch")
    state = hf.state_dict()
    partial = {k: v for k, v in state.items() if k != "encoder.layer.1.attention.attention.value.weight"}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*encoder\.layer\.1\.attention\.attention\.qkv\.weight"):
        hub.load_state_dict(partial, strict=True)
    bad = dict(state)
    bad["encoder.layer.0.crossattention.attention.key.weight"] = torch.zeros(5, hf.config.encoder_hidden_size)
    with pytest.raises(RuntimeError, match="crossattention.attention.key.weight: expected 64 rows"):
        hub.load_state_dict(bad, strict=True)


def test_split_fused_names_maps_gradients_to_transformers_names():
    hf = make_hf("instructblip", layers=2, freq=2)
    hub = FusedMHub.from_hf(hf, backend="torch").train()
    inputs = make_inputs("instructblip", batch=2, nq=5, image_tokens=7, text_lengths=[2, 4])
    hub(**inputs).last_hidden_state.sum().backward()
    grads = hub.split_fused_names({n: p.grad for n, p in hub.named_parameters()})
    assert set(grads) - {"query_tokens"} == {n for n, _ in hf.named_parameters()}
    assert grads["encoder.layer.1.attention.attention.value.bias"].shape == (hf.config.hidden_size,)


def test_no_saved_tensor_is_a_copy_of_a_weight():
    """In a training forward every weight-shaped tensor autograd keeps is a parameter (no concatenated copy)."""
    config = small_config("instructblip", layers=2, freq=1, dropout=0.1)
    hub = FusedMHub(config, flavor="instructblip", num_query_tokens=5, backend="torch").train()
    params = {p.untyped_storage().data_ptr() for p in hub.parameters()}
    weight_shapes = {tuple(p.shape) for p in hub.parameters() if p.dim() == 2}
    copies = []

    def pack(t):
        if tuple(t.shape) in weight_shapes and t.untyped_storage().data_ptr() not in params:
            copies.append(tuple(t.shape))
        return t.detach()  # not t itself: a node keeping its own output would form an uncollectable cycle

    inputs = make_inputs("instructblip", batch=2, nq=5, image_tokens=7, text_lengths=[2, 4])
    inputs.pop("query_embeds")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hub(**inputs)
    assert copies == []
