"""FusedMHub image K/V cache (encode_image / image_kv=) and multi-objective passes (forward_objectives)."""

from __future__ import annotations

import pytest
import torch

from helpers.mhub import ENCODER, as_fused, assert_matches_hf, make_hf, make_inputs
from mmict_kernels import FusedMHub
from mmict_kernels.modules import ImageKVCache
from mmict_kernels.modules.mhub import epilogue

TOL = dict(rtol=1e-5, atol=2e-6)


def _hub(flavor="instructblip", layers=3, freq=2, dropout=0.0):
    return FusedMHub.from_hf(make_hf(flavor, layers=layers, freq=freq, dropout=dropout), backend="torch").eval()


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _grads(hub, *tensors):
    params = [p for p in hub.parameters()]
    return torch.autograd.grad(tensors[0], list(tensors[1:]) + params, allow_unused=True)


def test_cache_reuse_is_exactly_recompute_outputs_and_grads():
    hub = _hub()
    inputs = make_inputs("instructblip", batch=3, nq=6, image_tokens=11, image_lengths=[11, 4, 7], text_lengths=[3, 0, 5])
    image, image_mask = inputs.pop("encoder_hidden_states"), inputs.pop("encoder_attention_mask")
    dout = torch.randn(3, 6 + 5, 64)

    x1 = _leaf(image)
    out1 = hub(**inputs, encoder_hidden_states=x1, encoder_attention_mask=image_mask).last_hidden_state
    g1 = _grads(hub, (out1 * dout).sum(), x1)

    x2 = _leaf(image)
    cache = hub.encode_image(x2, image_mask, packed=False)  # the layout forward uses internally
    out2 = hub(**inputs, image_kv=cache).last_hidden_state
    g2 = _grads(hub, (out2 * dout).sum(), x2)
    assert torch.equal(out1, out2)
    for a, b in zip(g1, g2):
        assert (a is None and b is None) or torch.equal(a, b)


def test_packed_cache_matches_dense_and_transformers():
    hf = make_hf("instructblip", layers=3, freq=1)
    hub = FusedMHub.from_hf(hf, backend="torch").eval()
    inputs = make_inputs("instructblip", batch=3, nq=5, image_tokens=9, image_lengths=[2, 9, 5], text_lengths=[1, 4, 2])
    image, image_mask = inputs.pop("encoder_hidden_states"), inputs.pop("encoder_attention_mask")
    cache = hub.encode_image(image, image_mask)
    assert cache.packed and cache.keys[0].shape[0] == 16
    assert cache.cu_seqlens_k.tolist() == [0, 2, 11, 16]
    with torch.no_grad():
        ref = as_fused(hf(**inputs, encoder_hidden_states=image, encoder_attention_mask=image_mask).last_hidden_state, inputs)
        out = hub(**inputs, image_kv=cache).last_hidden_state
    torch.testing.assert_close(out, ref, **TOL)


def test_video_frames_packed_match_padded_transformers():
    """num_frames: every frame's tokens of a sample form one key sequence (no padding to the longest video)."""
    hf = make_hf("instructblip", layers=2, freq=1)
    hub = FusedMHub.from_hf(hf, backend="torch").eval()
    frames, per_frame = [2, 1, 3], 4
    clips = torch.randn(sum(frames), per_frame, ENCODER)
    inputs = make_inputs("instructblip", batch=3, nq=5, image_tokens=1, text_lengths=[2, 3, 1])
    inputs.pop("encoder_hidden_states")
    # The same videos padded to the longest one, as transformers needs them.
    padded = torch.zeros(3, max(frames) * per_frame, ENCODER)
    mask = torch.zeros(3, max(frames) * per_frame, dtype=torch.long)
    start = 0
    for b, n in enumerate(frames):
        padded[b, : n * per_frame] = clips[start : start + n].reshape(-1, ENCODER)
        mask[b, : n * per_frame] = 1
        start += n
    x = _leaf(clips)
    cache = hub.encode_image(x, num_frames=frames)
    assert cache.packed and cache.keys[0].shape[0] == sum(frames) * per_frame
    out = hub(**inputs, image_kv=cache).last_hidden_state
    with torch.no_grad():
        ref = as_fused(hf(**inputs, encoder_hidden_states=padded, encoder_attention_mask=mask).last_hidden_state, inputs)
    torch.testing.assert_close(out.detach(), ref, **TOL)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # Already-packed tokens with cu_seqlens give the same cache.
    cu = torch.tensor([0, 8, 12, 24], dtype=torch.int32)
    cache2 = hub.encode_image(clips.reshape(-1, ENCODER), cu_seqlens=cu)
    with torch.no_grad():
        torch.testing.assert_close(hub(**inputs, image_kv=cache2).last_hidden_state, out.detach(), rtol=0, atol=0)


def test_one_cache_shared_by_several_passes_accumulates_gradients():
    """Two passes (different text) over one cache: same outputs and summed gradients as two full passes."""
    hub = _hub(layers=3, freq=1)
    a = make_inputs("instructblip", batch=2, nq=5, image_tokens=8, image_lengths=[8, 3], text_lengths=[2, 4], seed=3)
    b = make_inputs("instructblip", batch=2, nq=5, image_tokens=8, image_lengths=[8, 3], text_lengths=[5, 1], seed=4)
    image, image_mask = a.pop("encoder_hidden_states"), a.pop("encoder_attention_mask")
    b.pop("encoder_hidden_states"), b.pop("encoder_attention_mask")

    x1 = _leaf(image)
    loss1 = sum(
        hub(**t, encoder_hidden_states=x1, encoder_attention_mask=image_mask).last_hidden_state.square().sum() for t in (a, b)
    )
    g1 = _grads(hub, loss1, x1)
    x2 = _leaf(image)
    cache = hub.encode_image(x2, image_mask)
    loss2 = sum(hub(**t, image_kv=cache).last_hidden_state.square().sum() for t in (a, b))
    g2 = _grads(hub, loss2, x2)
    torch.testing.assert_close(loss2, loss1, rtol=1e-6, atol=0)
    for u, v in zip(g1, g2):
        if u is None:
            assert v is None
        else:
            torch.testing.assert_close(v, u, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_select_rows_equals_encoding_the_selected_images(packed):
    hub = _hub(layers=2, freq=1)
    image = torch.randn(3, 7, ENCODER)
    mask = torch.tensor([[1] * 7, [1, 1, 0, 0, 0, 0, 0], [0, 1, 1, 1, 0, 1, 0]])
    index = [2, 0, 2, 1]
    picked = hub.encode_image(image, mask, packed=packed).select(index)
    direct = hub.encode_image(image[index], mask[index], packed=packed)
    assert picked.batch_size == 4 and picked.packed == packed
    for u, v in zip(picked.keys + picked.values, direct.keys + direct.values):
        torch.testing.assert_close(u, v, **TOL)
    with pytest.raises(ValueError, match="index"):
        hub.encode_image(image).select([3])


@pytest.mark.parametrize("packed", [False, True])
def test_select_gradients_sum_over_repeated_rows_and_identity_is_free(packed):
    """select's gradients reach each image once per row that shows it; selecting 0..B-1 returns the cache itself."""
    hub = _hub(layers=2, freq=1)
    image = _leaf(torch.randn(3, 7, ENCODER))
    mask = torch.tensor([[1] * 7, [1, 1, 0, 0, 0, 0, 0], [0, 1, 1, 1, 0, 1, 0]])
    cache = hub.encode_image(image, mask, packed=packed)
    assert cache.select(torch.arange(3)) is cache
    picked = cache.select([2, 0, 2, 1])
    (g_picked,) = torch.autograd.grad(sum(k.square().sum() for k in picked.keys), image)
    direct = [hub.encode_image(image, mask, packed=packed).select([i]) for i in (2, 0, 2, 1)]
    (g_direct,) = torch.autograd.grad(sum(k.square().sum() for c in direct for k in c.keys), image)
    torch.testing.assert_close(g_picked, g_direct, rtol=1e-5, atol=1e-5)


def test_cache_errors():
    hub = _hub(layers=3, freq=2)
    other = _hub(layers=3, freq=1)
    inputs = make_inputs("instructblip", batch=2, nq=5, image_tokens=7, text_lengths=[2, 1])
    image = inputs.pop("encoder_hidden_states")
    with pytest.raises(ValueError, match="image_kv: cache holds layers"):
        hub(**inputs, image_kv=other.encode_image(image))
    with pytest.raises(ValueError, match="image batch 3"):
        hub(**inputs, image_kv=hub.encode_image(torch.randn(3, 7, ENCODER)))
    with pytest.raises(ValueError, match="num_frames: expected frame counts summing"):
        hub.encode_image(torch.randn(4, 3, ENCODER), num_frames=[1, 2])
    with pytest.raises(ValueError, match="at most one of"):
        hub.encode_image(image, torch.ones(2, 7), num_frames=[1, 1])
    with pytest.raises(ValueError, match="image_embeds: with cu_seqlens"):
        hub.encode_image(image, cu_seqlens=torch.tensor([0, 3, 7]))
    assert isinstance(hub.encode_image(image).detach(), ImageKVCache)


# ---------------------------------------------------------------------------------------------
# Several objectives in one pass
# ---------------------------------------------------------------------------------------------
MASKS = ("unimodal", "bidirectional", "multimodal_causal")


@pytest.mark.parametrize("use_cache", [False, True])
def test_forward_objectives_equals_separate_calls(use_cache):
    hub = _hub(layers=3, freq=2)
    inputs = make_inputs("instructblip", batch=3, nq=5, image_tokens=9, image_lengths=[9, 2, 6], text_lengths=[3, 5, 0])
    image, image_mask = inputs.pop("encoder_hidden_states"), inputs.pop("encoder_attention_mask")
    douts = [torch.randn(3, 10, 64) for _ in MASKS]

    def run(together: bool):
        x = _leaf(image)
        if use_cache:
            img = {"image_kv": hub.encode_image(x, image_mask)}
        else:
            img = {"encoder_hidden_states": x, "encoder_attention_mask": image_mask}
        if together:
            outs = [o.last_hidden_state for o in hub.forward_objectives(**inputs, **img, masks=MASKS)]
        else:
            outs = [hub(**inputs, **img, mask=m).last_hidden_state for m in MASKS]
        loss = sum((o * d).sum() for o, d in zip(outs, douts))
        return outs, _grads(hub, loss, x)

    sep_out, sep_grads = run(False)
    one_out, one_grads = run(True)
    for u, v in zip(sep_out, one_out):
        torch.testing.assert_close(v, u, **TOL)
    for u, v in zip(sep_grads, one_grads):
        if u is None:
            assert v is None
        else:
            torch.testing.assert_close(v, u, rtol=1e-5, atol=1e-5)
    # the masks really differ: ITC text rows do not see the queries
    assert not torch.allclose(one_out[0], one_out[1])


def test_forward_objectives_bidirectional_matches_transformers():
    hf = make_hf("instructblip", layers=2, freq=1)
    hub = FusedMHub.from_hf(hf, backend="torch").eval()
    inputs = make_inputs("instructblip", batch=2, nq=5, image_tokens=8, image_lengths=[8, 5], text_lengths=[3, 1])
    outs = hub.forward_objectives(**inputs, masks=("multimodal_causal", "bidirectional"))
    with torch.no_grad():
        ref = as_fused(hf(**inputs).last_hidden_state, inputs)
    torch.testing.assert_close(outs[1].last_hidden_state.detach(), ref, **TOL)
    with pytest.raises(TypeError, match="masks"):
        hub.forward_objectives(**inputs, masks="unimodal")
    with pytest.raises(TypeError, match="masks=\\(...\\), not mask="):
        hub.forward_objectives(**inputs, mask="unimodal")


def test_unimodal_mask_equals_separate_query_and_text_passes():
    """ITC semantics: with the unimodal mask, queries never see text and text never sees queries."""
    hf = make_hf("instructblip", layers=3, freq=1)
    hub = FusedMHub.from_hf(hf, backend="torch").eval()
    inputs = make_inputs("instructblip", batch=2, nq=5, image_tokens=8, image_lengths=[8, 4], text_lengths=[4, 2])
    with torch.no_grad():
        both = hub(**inputs, mask="unimodal").last_hidden_state
        queries = hub(**{k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}).last_hidden_state
        text = hub(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"][:, 5:]).last_hidden_state
    torch.testing.assert_close(both[:, :5], queries, **TOL)
    valid = inputs["attention_mask"][:, 5:].bool()
    torch.testing.assert_close(both[:, 5:][valid], text[valid], **TOL)


def test_bidirectional_cache_path_still_matches_transformers_grads():
    hf = make_hf("blip2", layers=3, freq=2)
    hub = FusedMHub.from_hf(hf, backend="torch")
    inputs = make_inputs("blip2", batch=3, nq=6, image_tokens=10, image_lengths=[1, 10, 6])
    assert_matches_hf(hub, hf, inputs)


def _count_query_ffn_rows(hub, monkeypatch):
    """Record the rows each layer's query FFN sees (one query stream = B rows)."""
    counts = []
    query_ffns = {id(layer.intermediate_query) for layer in hub.encoder.layer}
    original = epilogue.feed_forward

    def counting(intermediate, output, x, backend):
        if id(intermediate) in query_ffns:
            counts.append(x.shape[0])
        return original(intermediate, output, x, backend)

    monkeypatch.setattr(epilogue, "feed_forward", counting)
    return counts


def test_itc_and_itg_share_one_query_stream(monkeypatch):
    """ITC + ITM + ITG run two query streams, not three; ITC's query rows are ITG's, hidden states included."""
    hub = _hub(layers=3, freq=2)
    inputs = make_inputs("instructblip", batch=3, nq=5, image_tokens=9, image_lengths=[9, 2, 6], text_lengths=[3, 5, 0])
    counts = _count_query_ffn_rows(hub, monkeypatch)
    with torch.no_grad():
        itc, itm, itg = hub.forward_objectives(**inputs, masks=("itc", "bidirectional", "itg"), output_hidden_states=True)
        assert counts == [2 * 3] * 3  # ITM's and the shared stream, B = 3 rows each, per layer
        torch.testing.assert_close(itc.last_hidden_state[:, :5], itg.last_hidden_state[:, :5], rtol=0, atol=0)
        counts.clear()
        separate = [hub(**inputs, mask=m, output_hidden_states=True) for m in MASKS]
        assert counts == [3] * 9
        # without an ITG to share with, ITC keeps rows of its own
        counts.clear()
        hub.forward_objectives(**inputs, masks=("unimodal", "bidirectional"))
        assert counts == [2 * 3] * 3
    for ours, ref in zip((itc, itm, itg), separate):
        torch.testing.assert_close(ours.last_hidden_state, ref.last_hidden_state, **TOL)
        torch.testing.assert_close(ours.pooler_output, ref.pooler_output, **TOL)
        assert len(ours.hidden_states) == len(ref.hidden_states) == 4
        for a, b in zip(ours.hidden_states, ref.hidden_states):
            torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("masks", [("unimodal", "multimodal_causal"), ("multimodal_causal", "bidirectional", "unimodal")])
def test_shared_query_stream_in_training_with_dropout(masks):
    """Training mode, fixed seed: one dropout draw for the shared query stream, reproducible, same with checkpointing."""
    hub = FusedMHub.from_hf(make_hf("instructblip", layers=2, freq=1, dropout=0.2), backend="torch").train()
    inputs = make_inputs("instructblip", batch=2, nq=4, image_tokens=7, image_lengths=[7, 3], text_lengths=[3, 1])
    image = inputs.pop("encoder_hidden_states")
    itc, itg = masks.index("unimodal"), masks.index("multimodal_causal")

    def step(checkpointing):
        hub.gradient_checkpointing = checkpointing
        torch.manual_seed(11)
        x = _leaf(image)
        outs = [o.last_hidden_state for o in hub.forward_objectives(**inputs, encoder_hidden_states=x, masks=masks)]
        loss = sum((o * (i + 1)).square().mean() for i, o in enumerate(outs))
        return outs, _grads(hub, loss, x)

    outs, grads = step(False)
    assert all(torch.isfinite(o).all() for o in outs)
    torch.testing.assert_close(outs[itc][:, :4], outs[itg][:, :4], rtol=0, atol=0)  # the same draws
    again, again_grads = step(False)
    recomputed, recomputed_grads = step(True)
    for other, other_grads in ((again, again_grads), (recomputed, recomputed_grads)):
        for a, b in zip(outs, other):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
        for a, b in zip(grads, other_grads):
            if a is None:
                assert b is None
            else:
                torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        evals = hub.eval().forward_objectives(**inputs, encoder_hidden_states=image, masks=masks)
    assert not torch.allclose(outs[itc], evals[itc].last_hidden_state)  # dropout was active
