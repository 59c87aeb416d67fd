"""AIM on tiny random-weight LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL: the shared prefix equals the stock model.

For each backbone (float64): image demonstrations of different sizes and a video demonstration,
image and video queries, two shared groups and a zero-shot one. The loss and the projection's
gradients (through the fused demonstration tokens) equal the stock model on every row's
concatenated input [fused demos ; query visual tokens ; prompt ; answer], with transformers' own
positions for that plain prompt (Qwen: ``get_rope_index``); greedy answers equal transformers'
``generate`` on the same concatenated input. Then: aggregations equal the stock model's hidden
states, the bank (exact hits, keys change with the backbone), training moves only the projection,
and a training step's host syncs.
"""

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmict_kernels.backends import simulate_gpu
from mmict_kernels.icl.aim import IGNORE, AIMBatch, AIMModel, DemonstrationBank, backbone_for
from mmict_kernels.icl.aim.backbones import default_processor
from mmict_kernels.icl.aim.tiny import TinyShape, tiny_model
from mmict_kernels.testing.host_syncs import HostSyncCounter

FAMILIES = ["llava_next", "qwen2_vl", "qwen2_5_vl"]
VOCAB, EOS, PAD, PLAIN = 40, 3, 0, 4
SHAPE = TinyShape(image_size=16, patch_size=4, initializer_range=0.2)


def build(family, dtype=torch.float64, seed=0, **kwargs):
    model = tiny_model(family, VOCAB, SHAPE, seed=seed).to(dtype)
    m = AIMModel(backbone_for(model, default_processor(model, 16)), projection="mlp", eos_id=EOS, pad_id=PAD, **kwargs)
    torch.nn.init.normal_(m.proj.down.weight, std=0.05, generator=torch.Generator().manual_seed(seed))  # away from the identity
    return m.to(dtype)


def make_batch(m, seed=1):
    rng = np.random.default_rng(seed)

    def image(h, w):
        return m.backbone.preprocess([rng.integers(0, 256, (h, w, 3), dtype=np.uint8)])

    def video(n, h=16, w=16):
        return m.backbone.preprocess([rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)], "video")

    return AIMBatch(
        demo_images=[image(16, 24), image(16, 16), video(3)],
        demo_text=[[5, 6, 7], [8, 9], [10, 11, 12, 13]],
        group_demos=[[0, 2], [1], []],  # two shared groups (one with a video demonstration) and a zero-shot one
        query_images=[image(20, 16), video(2), image(16, 16), image(12, 20)],
        query_group=torch.tensor([0, 1, 0, 2]),
        query_prompt=[[14, 15], [16], [17, 18, 19], [20]],
        query_answer=[[21], [22, 23], [24], [25]],
    )


def placeholder_ids(m, visual, prefix: int, text: list[int]):
    """A row as a plain prompt's token ids: the fused prefix as text, <|vision_start|> pads <|vision_end|>, the text."""
    cfg = m.backbone.lm.config
    (seg,) = [s for s in visual.segments if s.kind != "text"]
    pad = cfg.image_token_id if seg.kind == "image" else cfg.video_token_id
    ids = [PLAIN] * prefix + [cfg.vision_start_token_id] + [pad] * seg.length + [cfg.vision_end_token_id] + text
    types = [0] * (prefix + 1) + [1 if seg.kind == "image" else 2] * seg.length + [0] * (len(text) + 1)
    return ids, types


def stock_kwargs(m, item, ids, types):
    """What transformers needs to place a Qwen row's vision tokens (grid, token types) for positions and generate."""
    if not m.backbone.family.startswith("qwen"):
        return {}
    key = "image_grid_thw" if item.kind == "image" else "video_grid_thw"
    out = {"input_ids": torch.tensor([ids]), "mm_token_type_ids": torch.tensor([types]), key: torch.tensor([item.grid_thw])}
    if item.kind == "video" and m.backbone.family == "qwen2_5_vl":
        out["second_per_grid_ts"] = torch.tensor([item.second_per_grid_t])
    return out


def stock_positions(m, kwargs):
    if not kwargs:
        return None  # LLaVA-NeXT: positions count tokens (the model's default)
    fn = m.backbone.lm.model.get_rope_index
    params = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in kwargs.items() if k in params})[0]


def expanded_rows(m, b, with_answer=True):
    """Each row's [fused demos ; visual tokens ; prompt (; answer eos)] embeddings, targets and stock kwargs."""
    aggs = m.aggregate(b.demo_images, b.demo_text)
    visual = m.backbone.visual_tokens(b.query_images)
    rows = []
    for r, v in enumerate(visual):
        fused = [m.proj(aggs[i].to(m.proj.up.weight.dtype)) for i in b.group_demos[int(b.query_group[r])]]
        tail = b.query_answer[r] + [EOS] if with_answer else []
        text = b.query_prompt[r] + tail
        seq = torch.cat(fused + [v.embeds, m.backbone.embed(torch.tensor(text))])
        prefix = sum(f.shape[0] for f in fused)
        qwen = m.backbone.family.startswith("qwen")
        rows.append((seq, tail, stock_kwargs(m, b.query_images[r], *placeholder_ids(m, v, prefix, text)) if qwen else {}))
    return rows


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_demonstration_gradients_equal_the_stock_model(family):
    m = build(family)
    b = make_batch(m)
    loss, n = m(b)
    loss.backward()
    ours = [p.grad.clone() for p in m.proj.parameters()]
    m.zero_grad()
    total = 0
    for seq, tail, kwargs in expanded_rows(m, b):
        logits = m.backbone.lm(inputs_embeds=seq[None], position_ids=stock_positions(m, kwargs)).logits[0]
        labels = torch.tensor([IGNORE] * (seq.shape[0] - len(tail)) + tail)
        total = total + F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE, reduction="sum")
    total.backward()
    assert n == sum(len(a) + 1 for a in b.query_answer)
    torch.testing.assert_close(loss, total, rtol=1e-10, atol=1e-10)
    # transformers' RMSNorm computes in float32 even in a float64 model, so gradients that the shared
    # prefix sums over a group's rows before the norm (the stock model: after it, row by row) agree
    # to float32 precision, not float64's.
    for a, e in zip(ours, [p.grad for p in m.proj.parameters()]):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6 * float(e.abs().max()))
    assert all(p.grad is None for p in m.backbone.parameters())  # frozen: no gradient


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prefix_greedy_answers_equal_transformers_generate(family):
    m = build(family)
    b = make_batch(m)
    ours = m.generate(b, max_new_tokens=4)
    assert max(len(a) for a in ours) >= 3  # the random model says something before its eos
    for (seq, _, kwargs), got in zip(expanded_rows(m, b, with_answer=False), ours):
        with torch.no_grad():
            out = m.backbone.lm.generate(
                inputs_embeds=seq[None], max_new_tokens=4, do_sample=False, eos_token_id=EOS, pad_token_id=PAD, **kwargs
            )[0].tolist()
        new = out[len(kwargs["input_ids"][0]) :] if kwargs else out  # with input_ids, generate returns them too
        assert got == (new[: new.index(EOS)] if EOS in new else new)


@pytest.mark.parametrize("family", FAMILIES)
def test_aggregations_are_the_stock_models_hidden_states_at_the_text(family):
    """A demonstration read alone by the stock model (its own pixels, tiling / patching and positions)."""
    m = build(family)
    b = make_batch(m)
    aggs = m.aggregate(b.demo_images, b.demo_text)
    lm, cfg = m.backbone.lm, m.backbone.lm.config
    for item, text, agg in zip(b.demo_images, b.demo_text, aggs):
        if family == "llava_next":
            frames = item.pixel_values.shape[0]
            n = m.backbone.visual_tokens([item])[0].embeds.shape[0]
            ids = [cfg.image_token_id] * n + text
            # a video's frames are read as images: their placeholder runs back to back
            extra = {"pixel_values": item.pixel_values, "image_sizes": torch.tensor(item.image_sizes)}
            assert frames == len(item.image_sizes)
        else:
            v = m.backbone.visual_tokens([item])[0]
            ids, types = placeholder_ids(m, v, 0, text)
            kw = stock_kwargs(m, item, ids, types)
            pixel_key = "pixel_values" if item.kind == "image" else "pixel_values_videos"
            extra = {k: w for k, w in kw.items() if k != "input_ids"} | {pixel_key: item.pixel_values}
        with torch.no_grad():
            states = lm(input_ids=torch.tensor([ids]), output_hidden_states=True, **extra).hidden_states[-1][0]
        torch.testing.assert_close(agg, states[-len(text) :].float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_bank_hits_are_exact_and_keys_follow_the_backbone(family, tmp_path):
    m = build(family, bank=DemonstrationBank(tmp_path))
    b = make_batch(m)
    first = m.aggregate(b.demo_images, b.demo_text)
    again = m.aggregate(b.demo_images, b.demo_text)
    fresh = m._aggregate_now(b.demo_images, b.demo_text)
    assert (m.bank.hits, m.bank.misses) == (3, 3)
    for x, y, z in zip(first, again, fresh):
        assert torch.equal(x, y) and torch.equal(y, z)
    # The same demonstrations through another backbone (other weights) in the same bank folder: all misses.
    other = build(family, seed=1, bank=DemonstrationBank(tmp_path))
    assert other.fingerprint != m.fingerprint
    other.aggregate(b.demo_images, b.demo_text)
    assert (other.bank.hits, other.bank.misses) == (0, 3) and len(m.bank) == 6


@pytest.mark.parametrize("family", FAMILIES)
def test_training_moves_only_the_projection(family):
    m = build(family, dtype=torch.float32)
    b = make_batch(m)
    before = {k: v.clone() for k, v in m.backbone.state_dict().items()}
    opt = torch.optim.AdamW(m.proj.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        loss, n = m(b)
        opt.zero_grad()
        (loss / n).backward()
        opt.step()
        losses.append(loss.item() / n)
    assert losses[-1] < losses[0]
    assert all(torch.equal(before[k], v) for k, v in m.backbone.state_dict().items())


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_host_syncs(family, tmp_path):
    """Counted as on a GPU (CPU tensors stand for GPU ones; device-side asserts instead of checks).

    A step whose demonstrations are in the bank and whose query images are in the visual token
    cache makes no host sync. The first sight of an image runs the stock vision tower: LLaVA-NeXT's
    makes none, Qwen2-VL's reads its patch grid on the host (its syncs are transformers')."""
    m = build(family, dtype=torch.float32, bank=DemonstrationBank(tmp_path), visual_cache_bytes=1 << 24, backend="torch")
    b = make_batch(m)

    def step():
        loss, n = m(b)
        (loss / n).backward()

    step()  # fills the bank, the visual token cache and the backbone's position memo
    with simulate_gpu():
        with HostSyncCounter() as warm:
            step()
        with HostSyncCounter() as tower:
            m.backbone.visual_tokens(b.query_images)
    assert warm.count == 0, warm.report()
    if family == "llava_next":
        assert tower.count == 0, tower.report()
