"""AIM's backbones read images and videos exactly as the stock transformers models do.

Tiny random-weight LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL (float64): the visual tokens and positions
a backbone gives, run through the model as embeddings, equal the stock model's own multimodal
forward on placeholder token ids with the processor's pixels (its vision tower, tiling or patch
merging, scattering and rotary positions). Plus: backbone_for, positions after a prefix,
video patches against the image processor, bad input.
"""

import inspect

import numpy as np
import pytest
import torch

from mmict_kernels.icl.aim import AIMModel, LlavaBackbone, LlavaNextBackbone, Qwen2VLBackbone, VisualInput, backbone_for
from mmict_kernels.icl.aim.backbones import default_processor
from mmict_kernels.icl.aim.backbones.qwen2_vl import video_patches
from mmict_kernels.icl.aim.tiny import TinyShape, tiny_model
from mmict_kernels.icl.aim.visual import Segment, text_segment

VOCAB = 40
SHAPE = TinyShape(image_size=16, patch_size=4, initializer_range=0.2)


def build(family, dtype=torch.float64, seed=0):
    model = tiny_model(family, VOCAB, SHAPE, seed=seed).to(dtype)
    return backbone_for(model, default_processor(model, SHAPE.image_size))


def frames(*sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def rope_index(model, ids, types, images=(), videos=()):
    """transformers' own positions for a plain prompt (the installed version's signature)."""
    fn = model.model.get_rope_index
    args = {
        "input_ids": torch.tensor([ids]),
        "mm_token_type_ids": torch.tensor([types], dtype=torch.int32),
        "image_grid_thw": torch.tensor([v.grid_thw for v in images]) if images else None,
        "video_grid_thw": torch.tensor([v.grid_thw for v in videos]) if videos else None,
        "second_per_grid_ts": torch.tensor([v.second_per_grid_t for v in videos]) if videos else None,
    }
    params = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in args.items() if k in params})[0]


def test_backbone_for_picks_each_family_and_refuses_others():
    assert isinstance(build("llava"), LlavaBackbone)
    assert isinstance(build("llava_next"), LlavaNextBackbone)
    qwen, qwen25 = build("qwen2_vl"), build("qwen2_5_vl")
    assert isinstance(qwen, Qwen2VLBackbone) and qwen.family == "qwen2_vl"
    assert isinstance(qwen25, Qwen2VLBackbone) and qwen25.family == "qwen2_5_vl"
    assert backbone_for(qwen) is qwen
    assert isinstance(AIMModel(qwen.lm).backbone, Qwen2VLBackbone)  # AIMModel takes a bare model too
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    for other in (llama, torch.nn.Linear(2, 2)):
        with pytest.raises(TypeError, match="model: AIM has no backbone for .*supported: Qwen2_5_VL"):
            backbone_for(other)


def test_llava_next_reads_each_image_at_its_tiles_as_the_stock_model():
    """Two aspect ratios (different tile grids and unpadding): logits over [image tokens ; text] equal the
    stock forward of image placeholders + pixel values + image sizes."""
    bb = build("llava_next")
    lm = bb.lm
    text = [5, 6, 7]
    counts = []
    for image in frames((24, 44), (16, 16)):
        item = bb.preprocess([image])
        tokens = bb.visual_tokens([item])[0]
        counts.append(tokens.embeds.shape[0])
        ours = lm(inputs_embeds=torch.cat([tokens.embeds, bb.embed(torch.tensor(text))])[None]).logits
        ids = torch.tensor([[lm.config.image_token_id] * counts[-1] + text])
        stock = lm(input_ids=ids, pixel_values=item.pixel_values.double(), image_sizes=torch.tensor(item.image_sizes)).logits
        torch.testing.assert_close(ours, stock, rtol=1e-10, atol=1e-10)
    base = (SHAPE.image_size // SHAPE.patch_size) ** 2
    assert counts[0] != counts[1] and min(counts) > base  # tiles beyond the base view, per image size


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_images_and_videos_with_positions_as_the_stock_model(family):
    """[image][text][video][text]: our wrapped visual tokens and M-RoPE positions give the stock model's logits
    on <|vision_start|> pads <|vision_end|> ids with pixel_values / pixel_values_videos and their grids."""
    bb = build(family)
    lm, cfg = bb.lm, bb.lm.config
    image = bb.preprocess(frames((20, 12))[:1])
    video = bb.preprocess(frames((16, 16), (16, 16), (16, 16), seed=1), "video", fps=1.0)  # 3 frames -> 2 temporal patches
    assert video.grid_thw[0] == 2 and video.second_per_grid_t == 1.0 * cfg.vision_config.temporal_patch_size
    vis = bb.visual_tokens([image, video])
    text1, text2 = [5, 6], [7, 8, 9]
    layout = vis[0].segments + (text_segment(2),) + vis[1].segments + (text_segment(3),)
    embeds = torch.cat([vis[0].embeds, bb.embed(torch.tensor(text1)), vis[1].embeds, bb.embed(torch.tensor(text2))])
    positions = torch.from_numpy(bb.row_positions(layout))[:, None]
    ours = lm(inputs_embeds=embeds[None], position_ids=positions).logits

    n_img, n_vid = vis[0].embeds.shape[0] - 2, vis[1].embeds.shape[0] - 2
    start, end = cfg.vision_start_token_id, cfg.vision_end_token_id
    ids = [start] + [cfg.image_token_id] * n_img + [end] + text1 + [start] + [cfg.video_token_id] * n_vid + [end] + text2
    types = [1 if i == cfg.image_token_id else 2 if i == cfg.video_token_id else 0 for i in ids]
    extra = {"second_per_grid_ts": torch.tensor([video.second_per_grid_t])} if family == "qwen2_5_vl" else {}
    stock = lm(
        input_ids=torch.tensor([ids]),
        mm_token_type_ids=torch.tensor([types]),
        pixel_values=image.pixel_values.double(),
        image_grid_thw=torch.tensor([image.grid_thw]),
        pixel_values_videos=video.pixel_values.double(),
        video_grid_thw=torch.tensor([video.grid_thw]),
        **extra,
    ).logits
    torch.testing.assert_close(ours, stock, rtol=1e-10, atol=1e-10)
    # the positions are 3-D: an image's tokens do not count on one by one
    assert not torch.equal(positions[0], positions[1])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_positions_after_a_fused_prefix_continue_as_in_a_plain_prompt(family):
    """A row's own positions + Lp are what transformers gives the same row after Lp text-like tokens."""
    bb = build(family)
    cfg = bb.lm.config
    image = bb.preprocess(frames((16, 24))[:1])
    video = bb.preprocess(frames(*[(16, 16)] * 4, seed=2), "video")
    vis = bb.visual_tokens([image, video])
    layout = (text_segment(3),) + vis[0].segments + (text_segment(2),) + vis[1].segments + (text_segment(4),)
    own = bb.row_positions(layout)
    ids, types = [], []
    for seg in layout:  # the layout as placeholder ids: wrappers around each image's / video's pads
        if seg.kind == "text":
            ids += [4] * seg.length
            types += [0] * seg.length
        else:
            ids[-1] = cfg.vision_start_token_id
            ids += [cfg.image_token_id if seg.kind == "image" else cfg.video_token_id] * seg.length
            types += [1 if seg.kind == "image" else 2] * seg.length
    for prefix in (0, 1, 7):
        full = rope_index(bb.lm, [4] * prefix + ids, [0] * prefix + types, images=[image], videos=[video])[:, 0]
        np.testing.assert_array_equal(full[:, prefix:].numpy(), own + prefix)
        np.testing.assert_array_equal(full[:, :prefix].numpy(), np.tile(np.arange(prefix), (3, 1)))


def test_video_patches_equal_the_image_processor_on_a_repeated_frame():
    """An image is a 2-frame clip of itself: the video path's patch layout must give the processor's own image patches."""
    bb = build("qwen2_vl")
    (image,) = frames((20, 28))
    reference = bb.processor(images=[image], return_tensors="pt")
    pixels, grid = video_patches(bb.processor, [image, image])
    assert grid == tuple(int(x) for x in reference["image_grid_thw"][0])
    torch.testing.assert_close(pixels, reference["pixel_values"], rtol=0, atol=0)
    odd, grid3 = video_patches(bb.processor, [image, image, image])  # odd tail: the last frame repeated
    assert grid3[0] == 2 and torch.equal(odd[: pixels.shape[0]], pixels) and torch.equal(odd[pixels.shape[0] :], pixels)


def test_llava_frames_read_as_images_one_after_the_other():
    bb = build("llava_next")
    clip = bb.preprocess(frames((16, 16), (16, 32), seed=3), "video")
    one_by_one = [bb.visual_tokens([bb.preprocess([f])])[0].embeds for f in frames((16, 16), (16, 32), seed=3)]
    together = bb.visual_tokens([clip])[0]
    torch.testing.assert_close(together.embeds, torch.cat(one_by_one), rtol=1e-12, atol=1e-12)
    assert together.segments == (Segment("video", together.embeds.shape[0]),)


def test_bad_visual_input():
    qwen, nxt = build("qwen2_vl"), build("llava_next")
    with pytest.raises(TypeError, match="images: the llava_next backbone takes a list of VisualInput"):
        nxt.visual_tokens(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"images\[0\]: expected flattened patches"):
        qwen.visual_tokens([VisualInput(torch.zeros(4, 3, 8, 8))])
    with pytest.raises(ValueError, match=r"grid_thw \(1, 4, 4\) needs 16 patches, got 15"):
        qwen.visual_tokens([VisualInput(torch.zeros(15, 96), grid_thw=(1, 4, 4))])
    with pytest.raises(ValueError, match="an image is one frame"):
        qwen.preprocess(frames((16, 16), (16, 16)))
    with pytest.raises(ValueError, match="frames must share one size"):
        qwen.preprocess(frames((16, 16), (16, 20)), "video")
    with pytest.raises(ValueError, match="kind: expected one of"):
        VisualInput(torch.zeros(1), kind="audio")
    with pytest.raises(ValueError, match=r"images\[0\]: expected \(F, P, 3, S, S\) tiles"):
        nxt.visual_tokens([VisualInput(torch.zeros(1, 3, 16, 16))])
