"""FusedMHub.from_lavis: LAVIS / MMICT state dicts built here by renaming a transformers Q-Former's keys."""

from __future__ import annotations

import pytest
import torch

from helpers.mhub import HIDDEN, as_fused, make_hf, make_inputs
from mmict_kernels import FusedMHub
from mmict_kernels.modules.mhub.lavis import LavisCheckpointError, to_lavis_state_dict


def lavis_state_dict(hf, query_tokens, flavor):
    """What LAVIS's Qformer.py + blip2*.py would save for this Q-Former, written out key by key."""
    out = {"query_tokens": query_tokens.clone()}
    for name, tensor in hf.state_dict().items():
        if flavor == "blip2" and name.startswith("layernorm."):
            key = "embeddings.LayerNorm." + name[len("layernorm.") :]
        elif name.startswith("embeddings.layernorm."):
            key = "embeddings.LayerNorm." + name[len("embeddings.layernorm.") :]
        else:
            key = name.replace(".attention.attention.", ".attention.self.").replace(
                ".crossattention.attention.", ".crossattention.self."
            )
        out["Qformer.bert." + key] = tensor.clone()
    # What else a LAVIS checkpoint holds: the ViT, ln_vision, the projection, the LM head, the buffer.
    out["visual_encoder.blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    out["ln_vision.weight"] = torch.ones(4)
    out["t5_proj.weight"] = torch.zeros(2, HIDDEN)
    if flavor == "instructblip":
        out["Qformer.bert.embeddings.position_ids"] = torch.arange(hf.config.max_position_embeddings)[None]
        out["Qformer.cls.predictions.bias"] = torch.zeros(hf.config.vocab_size)
    return out


def _compare(hub, hf, query_tokens, flavor):
    inputs = make_inputs(
        flavor,
        batch=2,
        nq=query_tokens.shape[1],
        image_tokens=9,
        image_lengths=[9, 4],
        text_lengths=[3, 1] if flavor == "instructblip" else None,
    )
    inputs["query_embeds"] = query_tokens.expand(2, -1, -1)
    own = {k: v for k, v in inputs.items() if k != "query_embeds"}
    with torch.no_grad():
        ref = as_fused(hf(**inputs).last_hidden_state, inputs)
        torch.testing.assert_close(hub.eval()(**own).last_hidden_state, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flavor,layers,freq", [("instructblip", 3, 2), ("instructblip", 2, 1), ("blip2", 4, 2), ("blip2", 3, 3)])
def test_from_lavis_state_dict_equals_transformers(flavor, layers, freq):
    hf = make_hf(flavor, layers=layers, freq=freq)
    query_tokens = torch.randn(1, 6, HIDDEN)
    hub = FusedMHub.from_lavis(lavis_state_dict(hf, query_tokens, flavor), num_attention_heads=4, backend="torch")
    assert hub.flavor == flavor
    assert hub.cross_attention_layers == tuple(range(0, layers, freq))
    assert hub.config.encoder_hidden_size == 48 and hub.config.intermediate_size == 96 and hub.config.num_hidden_layers == layers
    assert torch.equal(hub.query_tokens, query_tokens)
    _compare(hub, hf, query_tokens, flavor)
    # and back: our LAVIS names are LAVIS's
    back = to_lavis_state_dict(hub)
    lavis = lavis_state_dict(hf, query_tokens, flavor)
    assert set(back) == {k for k in lavis if k.startswith("Qformer.bert.") and "position_ids" not in k} | {"query_tokens"}


def test_from_lavis_files_pth_wrapped_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    hf = make_hf("instructblip", layers=2, freq=1)
    query_tokens = torch.randn(1, 5, HIDDEN)
    state = lavis_state_dict(hf, query_tokens, "instructblip")
    pth = tmp_path / "checkpoint_best.pth"
    torch.save({"model": state, "epoch": 3, "config": {"run": {"lr": 1e-5}}}, pth)  # LAVIS's layout
    sft = tmp_path / "mmict.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(sft))
    ddp = {"module." + k: v for k, v in state.items()}
    for source in (pth, str(sft), ddp):
        hub = FusedMHub.from_lavis(source, num_attention_heads=4, backend="torch")
        _compare(hub, hf, query_tokens, "instructblip")


def test_from_lavis_errors_list_keys():
    hf = make_hf("instructblip", layers=3, freq=1)
    query_tokens = torch.randn(1, 5, HIDDEN)
    state = lavis_state_dict(hf, query_tokens, "instructblip")

    broken = dict(state)
    del broken["Qformer.bert.encoder.layer.1.output_query.dense.weight"]
    broken["Qformer.bert.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(2)
    with pytest.raises(LavisCheckpointError) as err:
        FusedMHub.from_lavis(broken, num_attention_heads=4)
    msg = str(err.value)
    assert "missing keys ['Qformer.bert.encoder.layer.1.output_query.dense.weight']" in msg
    assert "unexpected keys ['Qformer.bert.encoder.layer.0.attention.self.rotary.weight']" in msg

    no_queries = {k: v for k, v in state.items() if k != "query_tokens"}
    with pytest.raises(LavisCheckpointError, match="missing keys \\['query_tokens'\\]"):
        FusedMHub.from_lavis(no_queries, num_attention_heads=4)
    with pytest.raises(LavisCheckpointError, match="not a LAVIS Q-Former"):
        FusedMHub.from_lavis({"query_tokens": query_tokens, "visual_encoder.x": torch.zeros(1)})
    irregular = {k: v for k, v in state.items() if ".layer.2.crossattention." not in k}  # layers 0, 1 only
    with pytest.raises(LavisCheckpointError, match="not every f-th layer"):
        FusedMHub.from_lavis(irregular, num_attention_heads=4)
    with pytest.raises(LavisCheckpointError, match="multiple of 5"):
        FusedMHub.from_lavis(state, num_attention_heads=5)
    wrong = dict(state)
    wrong["Qformer.bert.encoder.layer.2.intermediate.dense.weight"] = torch.zeros(95, HIDDEN)
    with pytest.raises(LavisCheckpointError, match="intermediate.dense.weight has shape \\(95, 64\\)"):
        FusedMHub.from_lavis(wrong, num_attention_heads=4)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        FusedMHub.from_lavis("/nonexistent/model.pth")
    with pytest.raises(TypeError, match="path_or_state_dict"):
        FusedMHub.from_lavis(42)
