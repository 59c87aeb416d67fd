"""Rows with their own positions on a cached prefix: Qwen2-VL's 3-D M-RoPE positions (``row_position_ids``)."""

import pytest
import torch

from mmict_kernels.modules.prefix_cache import DemoPrefixCache, forward_with_prefix, generate_with_prefix


def tiny_qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=48, max_position_embeddings=256, initializer_range=0.2, bos_token_id=None, eos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})  # fmt: skip
    vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4, spatial_merge_size=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=44, video_token_id=45,
                           vision_start_token_id=46, vision_end_token_id=47)  # fmt: skip
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config).double().eval()


def row_positions(length: int, grid_hw=(2, 3), start: int = 1):
    """A text token, a 2 x 3 image block (3-D positions), then text: as Qwen2-VL numbers such a row."""
    h, w = grid_hw
    t = torch.arange(length).expand(3, length).clone()
    hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    block = torch.stack([torch.zeros(h * w, dtype=torch.long), hh.flatten(), ww.flatten()]) + start
    t[:, start : start + h * w] = block
    t[:, start + h * w :] = torch.arange(length - start - h * w) + start + max(h, w)
    return t


def test_rows_with_3d_positions_equal_the_stock_model_after_the_prefix():
    model = tiny_qwen2_vl()
    g = torch.Generator().manual_seed(1)
    prefix = torch.randn(2, 5, 32, generator=g, dtype=torch.float64)
    lengths = torch.tensor([5, 3])
    rows = torch.randn(3, 10, 32, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[2, 9:] = 0  # right padding
    own = row_positions(10)[:, None].expand(3, 3, 10).clone()
    ids = torch.tensor([0, 1, 0])
    cache = DemoPrefixCache.build(model, prefix, lengths)
    out = forward_with_prefix(model, cache, inputs_embeds=rows, attention_mask=mask, prefix_ids=ids, row_position_ids=own).logits
    for r in range(3):
        lp, n = int(lengths[ids[r]]), int(mask[r].sum())
        seq = torch.cat([prefix[ids[r], :lp], rows[r, :n]])[None]
        positions = torch.cat([torch.arange(lp).expand(3, lp), own[:, r, :n] + lp], dim=1)[:, None]
        stock = model(inputs_embeds=seq, position_ids=positions).logits[0, lp:]
        torch.testing.assert_close(out[r, :n], stock, rtol=1e-10, atol=1e-10)


def test_generation_continues_after_the_largest_position():
    """Decoding goes on at (largest position of the prompt) + 1, as transformers' rope deltas do."""
    model = tiny_qwen2_vl()
    g = torch.Generator().manual_seed(2)
    prefix = torch.randn(1, 4, 32, generator=g, dtype=torch.float64)
    prompt = torch.randn(1, 9, 32, generator=g, dtype=torch.float64)
    own = row_positions(9)[:, None]
    cache = DemoPrefixCache.build(model, prefix)
    new = generate_with_prefix(model, cache, inputs_embeds=prompt, row_position_ids=own, max_new_tokens=4)
    seq = torch.cat([prefix[0], prompt[0]])[None]
    positions = torch.cat([torch.arange(4).expand(3, 4), own[:, 0] + 4], dim=1)[:, None]
    expected = []
    with torch.no_grad():
        for _ in range(4):
            token = int(model(inputs_embeds=seq, position_ids=positions).logits[0, -1].argmax())
            expected.append(token)
            seq = torch.cat([seq, model.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
            positions = torch.cat([positions, positions.amax(dim=-1, keepdim=True) + 1], dim=-1)
    assert new[0].tolist() == expected


def test_row_position_ids_shape_is_checked():
    model = tiny_qwen2_vl()
    cache = DemoPrefixCache.build(model, torch.randn(1, 3, 32, dtype=torch.float64))
    rows = torch.randn(2, 6, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"row_position_ids: expected shape \(2, 6\) or \(P, 2, 6\)"):
        forward_with_prefix(model, cache, inputs_embeds=rows, row_position_ids=torch.zeros(3, 2, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="row_position_ids: expected dtype"):
        forward_with_prefix(model, cache, inputs_embeds=rows, row_position_ids=torch.zeros(3, 2, 6))
