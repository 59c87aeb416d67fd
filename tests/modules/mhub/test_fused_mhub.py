"""FusedMHub against transformers' Blip2QFormerModel / InstructBlipQFormerModel: outputs, gradients, errors."""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers.mhub import HIDDEN, as_fused, assert_matches_hf, make_hf, make_inputs, small_config
from mmict_kernels import FusedMHub, MHubOutput

# (flavor, layers, cross_attention_frequency, text_lengths or None)
CASES = [
    ("blip2", 3, 2, None),
    ("blip2", 4, 1, None),
    ("blip2", 3, 2, [4, 0, 6]),  # BLIP-2 with text (use_qformer_text_input): query_length < L, no image mask (*)
    ("instructblip", 3, 2, [4, 0, 6]),
    ("instructblip", 4, 1, [2, 5, 1]),
    ("instructblip", 3, 3, [0, 0, 0]),  # text slots all padding
]


@pytest.mark.parametrize("flavor,layers,freq,text", CASES)
def test_matches_transformers_ragged(flavor, layers, freq, text):
    hf = make_hf(flavor, layers=layers, freq=freq, text=text is not None)
    hub = FusedMHub.from_hf(hf, backend="torch")
    nq = 5 + layers  # 8 or 9 ... keep the query count varied with the config
    # (*) transformers' Blip2QFormerModel builds the image mask for all L positions instead of the
    # query_length queries and fails on it, so that case runs without encoder_attention_mask.
    image_lengths = None if flavor == "blip2" and text is not None else [5, 2, 7 + 2 * layers]
    inputs = make_inputs(
        flavor, batch=3, nq=min(nq, 8), image_tokens=7 + 2 * layers, image_lengths=image_lengths, text_lengths=text
    )
    assert_matches_hf(hub, hf, inputs)


def test_no_image_mask_and_default_attention_mask():
    hf = make_hf("instructblip", layers=3, freq=2)
    hub = FusedMHub.from_hf(hf, backend="torch")
    inputs = make_inputs("instructblip", batch=2, nq=5, image_tokens=13, text_lengths=[3, 3])
    inputs.pop("attention_mask")
    assert_matches_hf(hub, hf, inputs)


def test_positional_arguments_follow_each_flavor():
    for flavor in ("blip2", "instructblip"):
        hf = make_hf(flavor, layers=2, freq=1, text=True)
        hub = FusedMHub.from_hf(hf, backend="torch").eval()
        inputs = make_inputs(flavor, batch=2, nq=5, image_tokens=9, image_lengths=[9, 4], text_lengths=[2, 4])
        if flavor == "blip2":
            inputs["encoder_attention_mask"] = None  # (*) in test_matches_transformers_ragged
        if flavor == "blip2":
            args = (
                inputs["query_embeds"],
                inputs["query_length"],
                inputs["attention_mask"],
                inputs["encoder_hidden_states"],
                inputs["encoder_attention_mask"],
            )
        else:
            args = (
                inputs["input_ids"],
                inputs["attention_mask"],
                None,
                inputs["query_embeds"],
                inputs["encoder_hidden_states"],
                inputs["encoder_attention_mask"],
            )
        with torch.no_grad():
            ref = as_fused(hf(*args).last_hidden_state, inputs)
            out = hub(*args)
        assert isinstance(out, MHubOutput)
        torch.testing.assert_close(out.last_hidden_state, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.pooler_output, ref[:, 0], rtol=1e-5, atol=1e-5)
        tup = hub(*args, return_dict=False)
        assert isinstance(tup, tuple) and torch.equal(tup[0], out.last_hidden_state)


def test_blip2_text_only_query_length_zero():
    hf = make_hf("blip2", layers=3, freq=1, text=True)
    hub = FusedMHub.from_hf(hf, backend="torch")
    text = torch.randn(3, 6, HIDDEN)
    mask = (torch.arange(6)[None] < torch.tensor([6, 1, 3])[:, None]).long()
    assert_matches_hf(hub, hf, {"query_embeds": text, "query_length": 0, "attention_mask": mask})


def test_instructblip_text_only_and_queries_only():
    hf = make_hf("instructblip", layers=3, freq=2)
    hub = FusedMHub.from_hf(hf, backend="torch")
    ids = torch.randint(1, 100, (3, 5))
    mask = (torch.arange(5)[None] < torch.tensor([5, 2, 4])[:, None]).long()
    assert_matches_hf(hub, hf, {"input_ids": ids, "attention_mask": mask})
    inputs = make_inputs("instructblip", batch=2, nq=7, image_tokens=8, image_lengths=[8, 3])
    assert_matches_hf(hub, hf, dict(inputs, input_ids=None))  # transformers needs input_ids passed


def test_state_dict_names_are_transformers_names():
    for flavor, text in (("blip2", False), ("blip2", True), ("instructblip", False)):
        hf = make_hf(flavor, layers=3, freq=2, text=text)
        hub = FusedMHub(hf.config, flavor=flavor, num_query_tokens=4)
        theirs, ours = set(hf.state_dict()), set(hub.state_dict())
        assert ours - theirs == {"query_tokens"}
        assert theirs == ours - {"query_tokens"}
        before = hub.query_tokens.detach().clone()
        hub.load_state_dict(hf.state_dict())  # strict: the missing query_tokens are kept
        assert torch.equal(hub.query_tokens, before)
        with pytest.raises(RuntimeError, match="Unexpected"):
            hub.load_state_dict({**hf.state_dict(), "encoder.extra.weight": torch.zeros(1)})


def test_own_query_tokens_used_without_query_embeds():
    hf = make_hf("instructblip", layers=2, freq=1)
    queries = torch.randn(1, 6, HIDDEN)
    hub = FusedMHub.from_hf(hf, backend="torch", query_tokens=queries).eval()
    inputs = make_inputs("instructblip", batch=2, nq=6, image_tokens=9, image_lengths=[9, 5], text_lengths=[3, 1])
    explicit = dict(inputs, query_embeds=queries.expand(2, -1, -1))
    inputs.pop("query_embeds")
    with torch.no_grad():
        ours = hub(**inputs).last_hidden_state
        torch.testing.assert_close(ours, as_fused(hf(**explicit).last_hidden_state, inputs), rtol=1e-5, atol=1e-5)
        # the text-only mask (B, T) is accepted too: the queries are always valid
        text_mask = inputs["attention_mask"][:, 6:]
        torch.testing.assert_close(hub(**dict(inputs, attention_mask=text_mask)).last_hidden_state, ours, rtol=0, atol=0)


def test_build_from_config_without_transformers_module():
    config = small_config("blip2", layers=2, freq=1)
    hub = FusedMHub(config, flavor="blip2", num_query_tokens=8, backend="torch").eval()
    assert hub.query_tokens.shape == (1, 8, HIDDEN)
    image = torch.randn(2, 10, 48)
    out = hub(encoder_hidden_states=image)
    assert out.last_hidden_state.shape == (2, 8, HIDDEN)
    # a freshly built transformers module with our weights agrees
    from transformers import Blip2QFormerModel

    config._attn_implementation = "eager"
    hf = Blip2QFormerModel(config).eval()
    hf.load_state_dict({k: v for k, v in hub.state_dict().items() if k != "query_tokens"})
    with torch.no_grad():
        ref = hf(query_embeds=hub.query_tokens.expand(2, -1, -1), encoder_hidden_states=image).last_hidden_state
    torch.testing.assert_close(out.last_hidden_state.detach(), ref, rtol=1e-5, atol=1e-5)


def test_other_activation_eps_and_head_count():
    hf = make_hf(
        "instructblip", layers=2, freq=1, hidden_act="gelu_new", layer_norm_eps=1e-6, num_attention_heads=2, intermediate_size=40
    )
    hub = FusedMHub.from_hf(hf, backend="torch")
    inputs = make_inputs("instructblip", batch=2, nq=5, image_tokens=7, image_lengths=[3, 7], text_lengths=[4, 2])
    assert_matches_hf(hub, hf, inputs)


def test_fully_masked_image_row_gives_zero_cross_attention_not_nan():
    hf = make_hf("blip2", layers=2, freq=1)
    hub = FusedMHub.from_hf(hf, backend="torch").eval()
    inputs = make_inputs("blip2", batch=2, nq=5, image_tokens=7, image_lengths=[4, 0])
    out = hub(**inputs).last_hidden_state
    assert torch.isfinite(out).all()
    with torch.no_grad():
        ref = hf(**inputs).last_hidden_state
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-5)  # the sample with image tokens is unaffected
    # the packed cache (zero-length segment) agrees
    cache = hub.encode_image(inputs["encoder_hidden_states"], inputs["encoder_attention_mask"])
    assert cache.packed and cache.cu_seqlens_k.tolist() == [0, 4, 4]
    with torch.no_grad():
        torch.testing.assert_close(
            hub(query_embeds=inputs["query_embeds"], image_kv=cache).last_hidden_state, out.detach(), rtol=1e-5, atol=1e-5
        )


def test_training_dropout_statistics_match_transformers():
    """Same dropout sites and rates: the mean and spread of train-mode outputs agree with transformers'."""
    hf = make_hf("instructblip", layers=2, freq=1, dropout=0.3)
    hub = FusedMHub.from_hf(hf, backend="torch")
    hf.train()
    hub.train()
    # One sample repeated over the batch: rows draw independent dropout masks, so a few passes
    # give many draws.
    inputs = make_inputs("instructblip", batch=1, nq=5, image_tokens=7, image_lengths=[6], text_lengths=[3])
    rows, passes = 64, 5
    inputs = {k: v.expand(rows, *v.shape[1:]) for k, v in inputs.items()}
    with torch.no_grad():
        ours = torch.cat([hub(**inputs).last_hidden_state for _ in range(passes)])
        theirs = torch.cat([hf(**inputs).last_hidden_state for _ in range(passes)])
        evals = hub.eval()(**inputs).last_hidden_state[0]
    runs = rows * passes
    assert not torch.allclose(ours[0], evals)  # dropout is active
    assert not torch.equal(ours[0], ours[1])
    # Means agree to a few standard errors; the per-element spread agrees to ~15%.
    sem = (theirs.std(0) ** 2 / runs + ours.std(0) ** 2 / runs).sqrt()
    z = (ours.mean(0) - theirs.mean(0)).abs() / sem.clamp_min(1e-6)
    assert z.mean() < 1.5 and z.max() < 6, (z.mean(), z.max())
    ratio = ours.std(0).mean() / theirs.std(0).mean()
    assert 0.85 < ratio < 1.15, ratio
    # dropout 0 in training mode equals eval mode
    hf0 = make_hf("instructblip", layers=2, freq=1, dropout=0.0)
    hub0 = FusedMHub.from_hf(hf0, backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(hub0.train()(**inputs).last_hidden_state, hub0.eval()(**inputs).last_hidden_state)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ib_hub():
    return FusedMHub.from_hf(make_hf("instructblip", layers=2, freq=1), backend="torch").eval()


def test_rejects_output_attentions(ib_hub):
    inputs = make_inputs("instructblip", batch=2, nq=5, image_tokens=7, text_lengths=[1, 2])
    with pytest.raises(ValueError, match="output_attentions"):
        ib_hub(**inputs, output_attentions=True)
    ib_hub(**inputs, output_attentions=False, output_hidden_states=False)  # accepted and ignored


def test_rejects_left_padded_text_and_masked_queries(ib_hub):
    inputs = make_inputs("instructblip", batch=2, nq=5, image_tokens=7, text_lengths=[1, 3])
    bad = inputs["attention_mask"].clone()
    bad[0] = bad[0].flip(0)
    with pytest.raises(ValueError, match="attention_mask.*right-padded"):
        ib_hub(**dict(inputs, attention_mask=bad))
    bad = inputs["attention_mask"].clone()
    bad[1, 0] = 0
    with pytest.raises(ValueError, match="attention_mask"):
        ib_hub(**dict(inputs, attention_mask=bad))
    with pytest.raises(ValueError, match="attention_mask: expected shape"):
        ib_hub(**dict(inputs, attention_mask=inputs["attention_mask"][:, :-1]))
    with pytest.raises(ValueError, match="attention_mask: expected a 2-D"):
        ib_hub(**dict(inputs, attention_mask=inputs["attention_mask"][:, None, None]))


def test_rejects_bad_shapes_and_arguments(ib_hub):
    inputs = make_inputs("instructblip", batch=2, nq=5, image_tokens=7, text_lengths=[1, 3])
    with pytest.raises(ValueError, match="image_embeds: expected last dim encoder_hidden_size"):
        ib_hub(**dict(inputs, encoder_hidden_states=torch.randn(2, 7, 47)))
    with pytest.raises(ValueError, match="query_embeds: expected last dim"):
        ib_hub(**dict(inputs, query_embeds=torch.randn(2, 5, 63)))
    with pytest.raises(ValueError, match="image_mask: expected shape"):
        ib_hub(**dict(inputs, encoder_attention_mask=torch.ones(2, 6)))
    with pytest.raises(ValueError, match="image batch"):
        ib_hub(**dict(inputs, encoder_hidden_states=torch.randn(3, 7, 48)))
    with pytest.raises(ValueError, match="encoder_hidden_states: required"):
        ib_hub(**{k: v for k, v in inputs.items() if k != "encoder_hidden_states"})
    with pytest.raises(TypeError, match="unexpected keyword argument 'foo'"):
        ib_hub(**inputs, foo=1)
    with pytest.raises(TypeError, match="query_length"):
        ib_hub(**inputs, query_length=5)
    with pytest.raises(TypeError, match="multiple values"):
        ib_hub(inputs["input_ids"], input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match="mask: expected one of"):
        ib_hub(**inputs, mask="causal")
    with pytest.raises(ValueError, match="query_embeds: expected device cpu"):
        ib_hub(**dict(inputs, query_embeds=inputs["query_embeds"].to("meta")))
    with pytest.raises(ValueError, match="image_embeds: expected device cpu"):
        ib_hub.encode_image(inputs["encoder_hidden_states"].to("meta"))
    with pytest.raises(TypeError, match="input_ids: expected dtype"):
        ib_hub(**dict(inputs, input_ids=inputs["input_ids"].float()))
    with pytest.raises(TypeError, match="attention_mask: expected a torch.Tensor"):
        ib_hub(**dict(inputs, attention_mask=[[1, 1]]))
    cache = ib_hub.encode_image(inputs["encoder_hidden_states"])
    with pytest.raises(ValueError, match="image_kv: pass either"):
        ib_hub(**inputs, image_kv=cache)
    with pytest.raises(TypeError, match="image_kv: expected an ImageKVCache"):
        ib_hub(**{k: v for k, v in inputs.items() if k != "encoder_hidden_states"}, image_kv=(1, 2))


def test_rejects_bad_construction():
    with pytest.raises(TypeError, match="module: expected a transformers"):
        FusedMHub.from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="flavor"):
        FusedMHub(small_config("blip2"), flavor="blip3")
    with pytest.raises(ValueError, match="backend"):
        FusedMHub(small_config("blip2"), backend="metal")
    hf = make_hf("blip2", layers=2, freq=1)
    with pytest.raises(ValueError, match="query_tokens: expected shape"):
        FusedMHub.from_hf(hf, query_tokens=torch.zeros(1, 4, 63))
    hub = FusedMHub.from_hf(hf, num_query_tokens=0)
    assert hub.query_tokens is None
    with pytest.raises(ValueError, match="query_embeds: required"):
        hub(encoder_hidden_states=torch.randn(2, 5, 48))
    with pytest.raises(ValueError, match="text FFN"):
        hub(query_embeds=torch.randn(2, 6, HIDDEN), query_length=4, encoder_hidden_states=torch.randn(2, 5, 48))


def test_output_hidden_states_match_transformers():
    hf = make_hf("instructblip", layers=3, freq=2)
    hub = FusedMHub.from_hf(hf, backend="torch").eval()
    inputs = make_inputs("instructblip", batch=2, nq=5, image_tokens=8, image_lengths=[8, 5], text_lengths=[3, 1])
    with torch.no_grad():
        ref = hf(**inputs, output_hidden_states=True).hidden_states
        ours = hub(**inputs, output_hidden_states=True).hidden_states
        both = hub.forward_objectives(**inputs, masks=("unimodal", "bidirectional"), output_hidden_states=True)
    assert len(ours) == len(ref) == 4  # embeddings + one per layer
    for i, (a, b, c) in enumerate(zip(ours, ref, both[1].hidden_states)):
        # the embeddings (i = 0) as transformers has them; every layer's output zero at padded text slots
        torch.testing.assert_close(a, b if i == 0 else as_fused(b, inputs), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)
    assert hub(**inputs).hidden_states is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_by_the_oracle_rule(dtype):
    hf = make_hf("instructblip", layers=2, freq=1)
    hub = FusedMHub.from_hf(hf, backend="torch")
    inputs = make_inputs("instructblip", batch=2, nq=5, image_tokens=8, image_lengths=[8, 3], text_lengths=[4, 1])
    assert_matches_hf(hub, hf, inputs, dtype=dtype)


def test_gradient_checkpointing_gives_the_same_step_with_dropout():
    hf = make_hf("instructblip", layers=3, freq=2, dropout=0.2)
    with warnings.catch_warnings():  # transformers 5.2x renames it; 5.17 (the GPU image) has only this name
        warnings.simplefilter("ignore", FutureWarning)
        hf.gradient_checkpointing_enable()  # carried over by from_hf
    hub = FusedMHub.from_hf(hf, backend="torch").train()
    assert hub.gradient_checkpointing
    inputs = make_inputs("instructblip", batch=2, nq=5, image_tokens=8, image_lengths=[8, 3], text_lengths=[4, 1])

    def step():
        torch.manual_seed(3)
        hub.zero_grad(set_to_none=True)
        x = inputs["encoder_hidden_states"].clone().requires_grad_(True)
        out = hub(**dict(inputs, encoder_hidden_states=x)).last_hidden_state
        out.square().sum().backward()
        return out.detach(), x.grad, [p.grad.clone() for p in hub.parameters() if p.grad is not None]

    with_ckpt = step()
    hub.gradient_checkpointing_disable()
    without = step()
    assert torch.equal(with_ckpt[0], without[0]) and torch.equal(with_ckpt[1], without[1])
    for a, b in zip(with_ckpt[2], without[2]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
