"""apply_mmict_kernels: swapped BLIP-2 / InstructBLIP models give the stock logits and greedy generations."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2Model,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
)

from mmict_kernels import FusedMHub
from mmict_kernels.modules import apply_mmict_kernels, apply_mmict_kernels_to_blip2, apply_mmict_kernels_to_instructblip

NQ, IMAGE_TOKEN = 4, 110
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
QFORMER = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_hidden_layers=3,
    intermediate_size=96,
    cross_attention_frequency=2,
    encoder_hidden_size=32,
    vocab_size=100,
    max_position_embeddings=32,
)
OPT = dict(
    model_type="opt",
    vocab_size=120,
    hidden_size=32,
    num_hidden_layers=2,
    ffn_dim=64,
    num_attention_heads=2,
    max_position_embeddings=64,
    word_embed_proj_dim=32,
    pad_token_id=1,
    bos_token_id=2,
    eos_token_id=3,
)
T5 = dict(
    model_type="t5",
    vocab_size=120,
    d_model=32,
    d_kv=16,
    d_ff=64,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=2,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)


def _randomize(model):
    """Random query tokens and LayerNorm parameters, so the swap is tested on non-trivial values."""
    torch.manual_seed(1)
    with torch.no_grad():
        model.query_tokens.normal_(0, 1)
        for name, p in model.qformer.named_parameters():
            if "LayerNorm" in name or "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _prompt(batch=2, length=5, with_image_tokens=True, seed=2):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 100, (batch, length), generator=gen)
    if with_image_tokens:  # transformers' processor puts one placeholder per query token first
        ids = torch.cat([torch.full((batch, NQ), IMAGE_TOKEN), ids], dim=1)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    return ids, mask


def _pixels(batch=2, seed=3):
    return torch.randn(batch, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def _swap(model):
    swapped = apply_mmict_kernels(copy.deepcopy(model), backend="torch")
    assert isinstance(swapped.qformer, FusedMHub) and swapped.qformer.query_tokens is None
    assert set(swapped.state_dict()) == set(model.state_dict())  # checkpoints keep their keys
    return swapped


def test_blip2_opt_logits_and_greedy_generation_unchanged(tmp_path):
    torch.manual_seed(0)
    model = _randomize(
        Blip2ForConditionalGeneration(
            Blip2Config(
                vision_config=VISION, qformer_config=QFORMER, text_config=OPT, num_query_tokens=NQ, image_token_index=IMAGE_TOKEN
            )
        )
    )
    swapped = _swap(model)
    ids, mask = _prompt()
    px = _pixels()
    with torch.no_grad():
        ref = model(pixel_values=px, input_ids=ids, attention_mask=mask)
        out = swapped(pixel_values=px, input_ids=ids, attention_mask=mask)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            out.qformer_outputs.last_hidden_state, ref.qformer_outputs.last_hidden_state, rtol=1e-5, atol=1e-5
        )
        gen_ref = model.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        gen = swapped.generate(pixel_values=px, input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(gen, gen_ref)
    # save_pretrained of the swapped model loads back into the stock class
    swapped.save_pretrained(tmp_path)
    reloaded = Blip2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(pixel_values=px, input_ids=ids, attention_mask=mask).logits, ref.logits, rtol=0, atol=0
        )


def test_blip2_model_features_and_training_gradients_unchanged():
    torch.manual_seed(0)
    model = _randomize(
        Blip2Model(
            Blip2Config(
                vision_config=VISION, qformer_config=QFORMER, text_config=OPT, num_query_tokens=NQ, image_token_index=IMAGE_TOKEN
            )
        )
    )
    swapped = _swap(model)
    px = _pixels()
    ref = model.get_qformer_features(pixel_values=px)
    out = swapped.get_qformer_features(pixel_values=px)
    ref_h = ref.last_hidden_state if hasattr(ref, "last_hidden_state") else ref[0]
    out_h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    torch.testing.assert_close(out_h, ref_h, rtol=1e-5, atol=1e-5)
    # gradients reach the (parent-held) query tokens and the Q-Former weights the same way
    ref_h.square().sum().backward()
    out_h.square().sum().backward()
    torch.testing.assert_close(swapped.query_tokens.grad, model.query_tokens.grad, rtol=1e-4, atol=1e-5)
    theirs = dict(model.qformer.named_parameters())
    ours = swapped.qformer.split_fused_names({n: p.grad for n, p in swapped.qformer.named_parameters()})
    assert set(ours) == set(theirs)
    for name, grad in ours.items():
        torch.testing.assert_close(grad, theirs[name].grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("llm", ["t5", "opt"])
def test_instructblip_logits_and_greedy_generation_unchanged(llm):
    torch.manual_seed(0)
    text_config = T5 if llm == "t5" else OPT
    config = InstructBlipConfig(
        vision_config=VISION, qformer_config=QFORMER, text_config=text_config, num_query_tokens=NQ, image_token_index=IMAGE_TOKEN
    )
    model = _randomize(InstructBlipForConditionalGeneration(config))
    swapped = _swap(model)
    ids, mask = _prompt()
    q_ids, q_mask = _prompt(length=6, with_image_tokens=False, seed=5)
    px = _pixels()
    kwargs = dict(pixel_values=px, input_ids=ids, attention_mask=mask, qformer_input_ids=q_ids, qformer_attention_mask=q_mask)
    with torch.no_grad():
        extra = {"decoder_input_ids": torch.zeros(2, 3, dtype=torch.long)} if llm == "t5" else {}
        ref = model(**kwargs, **extra)
        out = swapped(**kwargs, **extra)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
        gen_ref = model.generate(**kwargs, max_new_tokens=6, do_sample=False)
        gen = swapped.generate(**kwargs, max_new_tokens=6, do_sample=False)
    assert torch.equal(gen, gen_ref)


def test_blip2_retrieval_itc_and_itm_scores_unchanged():
    """BLIP-2 stage-1 heads: ITC (query-only and text-only passes) and ITM ([queries ; text] with the image)."""
    torch.manual_seed(0)
    qformer = dict(QFORMER, use_qformer_text_input=True)
    model = _randomize(
        Blip2ForImageTextRetrieval(
            Blip2Config(vision_config=VISION, qformer_config=qformer, num_query_tokens=NQ, image_text_hidden_size=16)
        )
    )
    swapped = _swap(model)
    ids, mask = _prompt(length=6, with_image_tokens=False)
    px = _pixels()
    with torch.no_grad():
        for itm in (False, True):
            ref = model(pixel_values=px, input_ids=ids, attention_mask=mask, use_image_text_matching_head=itm)
            out = swapped(pixel_values=px, input_ids=ids, attention_mask=mask, use_image_text_matching_head=itm)
            torch.testing.assert_close(out.logits_per_image, ref.logits_per_image, rtol=1e-5, atol=1e-5)


def test_swap_in_errors_and_retarget():
    with pytest.raises(TypeError, match="found no transformers Q-Former"):
        apply_mmict_kernels(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="expected a transformers BLIP-2"):
        apply_mmict_kernels("model")
    torch.manual_seed(0)
    model = Blip2Model(Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=OPT, num_query_tokens=NQ))
    with pytest.raises(TypeError, match="InstructBlip"):
        apply_mmict_kernels_to_instructblip(model)
    apply_mmict_kernels_to_blip2(model, backend="torch")
    hub = model.qformer
    apply_mmict_kernels(model, backend="auto")  # idempotent: same hub, new backend
    assert model.qformer is hub and hub.backend == "auto"
    with pytest.raises(ValueError, match="backend"):
        apply_mmict_kernels(model, backend="tpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()  # transformers' switch reaches the swapped-in hub
    assert hub.gradient_checkpointing
