"""Data, configs, sampling and metrics of the MMICT driver (fast: no training)."""

import json
import logging
import os

import numpy as np
import pytest
import torch

from helpers.threads import one_thread
from mmict_kernels.icl import shapes
from mmict_kernels.icl.config import load_config
from mmict_kernels.icl.datasets import LoadContext, jsonl
from mmict_kernels.icl.datasets.shapes import shapes_dataset
from mmict_kernels.icl.features import FeatureStore
from mmict_kernels.icl.sampling import DemoSampler, batches_of, epoch_groups
from mmict_kernels.icl.vision import build_vision_encoder, encode_pixels, fingerprint


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def encoder():
    return build_vision_encoder(load_config(None).model)


def _dataset(encoder, num=40, tasks=("color", "shape", "what_color", "what_shape")):
    return shapes_dataset(num, tasks, 0, encoder, "blip2", 32, "t")


def _load_jsonl(path, encoder, cache=None):
    """A JSONL file through the driver's reader (features in ``cache``, or in memory)."""
    store = FeatureStore(str(cache) if cache else None, fingerprint(encoder))
    return jsonl.load(str(path), LoadContext(encoder, "blip2", 32, store, progress=False)), store


# ------------------------------------------------------------------ embedded data
def test_shapes_are_deterministic_and_balanced():
    r1, im1 = shapes.make_shapes(40, seed=3)
    r2, im2 = shapes.make_shapes(40, seed=3)
    assert r1 == r2 and np.array_equal(im1, im2) and im1.shape == (40, 32, 32, 3) and im1.dtype == np.uint8
    tasks = [r["task"] for r in r1]
    assert all(tasks.count(t) == 10 for t in ("color", "shape", "what_color", "what_shape"))
    # The two in-context tasks share one prompt: only demonstrations tell them apart.
    assert {r["prompt"] for r in r1 if r["task"].startswith("what_")} == {"what is this ?"}
    for r in r1:
        color, shape = r["label"].split()
        assert r["answer"] == (color if r["task"] in ("color", "what_color") else shape)
    with pytest.raises(ValueError, match="shapes tasks"):
        shapes.make_shapes(4, tasks=("colour",))


# ------------------------------------------------------------------ JSONL data
def _write_images(folder, n):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = os.path.join(folder, f"img{i}.npy")
        np.save(p, rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
        paths.append(os.path.basename(p))
    return paths


def test_jsonl_loads_images_frames_and_caches_features(tmp_path, encoder, monkeypatch):
    imgs = _write_images(tmp_path, 3)
    rows = [
        {"image": imgs[0], "prompt": "q one", "answer": "a", "task": "vqa", "kind": "vqa", "question_id": 7},
        {"frames": [imgs[1], imgs[2]], "prompt": "caption", "answer": "b c", "answers": ["b c", "b"], "kind": "caption"},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    cache = tmp_path / "cache"
    ds, store = _load_jsonl(path, encoder, cache)
    assert len(ds) == 2 and ds[0].task == "vqa" and ds[1].answers == ("b c", "b")
    assert (ds[0].question_id, ds[0].image_id, ds[1].question_id) == (7, imgs[0], 2)  # default: the line number
    tokens = ds.image_tokens(0).shape[0]
    assert ds.image_tokens(1).shape[0] == 2 * tokens  # a video's frames are packed into one sequence
    assert ds.image_tokens(0).dtype == torch.float32 and store[ds[0].images[0]].dtype == torch.float16
    assert os.listdir(store.folder)

    # Second load: every feature comes from the cache, the encoder is not called.
    def boom(*a, **k):
        raise AssertionError("the image encoder ran although the cache holds every image")

    monkeypatch.setattr(LoadContext, "encode", boom)
    again, _ = _load_jsonl(path, encoder, cache)
    assert torch.equal(again.image_tokens(1), ds.image_tokens(1))


def test_jsonl_refuses_unknown_keys_and_says_when_it_guesses_the_kind(tmp_path, encoder, caplog):
    imgs = _write_images(tmp_path, 1)
    path = tmp_path / "d.jsonl"
    good = {"image": imgs[0], "prompt": "p", "answer": "a"}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "answer_list": ["a", "b"]}) + "\n")
    with pytest.raises(ValueError, match=r"d\.jsonl, line 2: unknown keys \['answer_list'\]"):
        _load_jsonl(path, encoder)
    path.write_text(json.dumps({**good, "task": "msrvtt_caption"}) + "\n" + json.dumps({**good, "task": "msrvtt_caption"}))
    with caplog.at_level(logging.WARNING):
        ds, _ = _load_jsonl(path, encoder)
    assert ds[0].kind == "caption" and caplog.text.count("treated as 'caption' from its name") == 1
    caplog.clear()
    path.write_text(json.dumps({**good, "task": "msrvtt", "kind": "caption"}))
    with caplog.at_level(logging.WARNING):
        assert _load_jsonl(path, encoder)[0][0].kind == "caption"
    assert "from its name" not in caplog.text


def test_corrupt_feature_cache_is_reported_and_rebuilt(tmp_path, encoder, caplog):
    imgs = _write_images(tmp_path, 1)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"image": imgs[0], "prompt": "p", "answer": "a"}))
    ds, store = _load_jsonl(path, encoder, tmp_path / "c")
    ref = ds.image_tokens(0)
    (shard,) = [os.path.join(store.folder, f) for f in os.listdir(store.folder)]
    with open(shard, "wb") as f:
        f.write(b"not a safetensors file")
    with caplog.at_level(logging.WARNING):
        got, store2 = _load_jsonl(path, encoder, tmp_path / "c")
    assert "unreadable" in caplog.text and shard in caplog.text and os.path.isfile(shard + ".corrupt")
    assert torch.equal(got.image_tokens(0), ref)
    assert len(FeatureStore(str(tmp_path / "c"), fingerprint(encoder))) == 1  # rewritten, readable


@pytest.mark.parametrize(
    "content, error, match",
    [
        (None, FileNotFoundError, "data file not found"),
        ('{"image": "x.npy", "prompt": "p", "answer": "a"}\n{not json', ValueError, r"line 2: not valid JSON"),
        ('{"image": "x.npy", "answer": "a"}', ValueError, r"line 1: expected a string 'prompt'"),
        (
            '{"image": "x.npy", "frames": ["x.npy"], "prompt": "p", "answer": "a"}',
            ValueError,
            "exactly one of 'image', 'frames' or 'video'",
        ),
        ('{"image": "missing.npy", "prompt": "p", "answer": "a"}', FileNotFoundError, r"missing\.npy.*line 1"),
        ('{"image": "bad.npy", "prompt": "p", "answer": "a"}', ValueError, r"bad\.npy.*cannot be read"),
        ("", ValueError, "has no examples"),
    ],
)
def test_bad_data_files_name_the_file(tmp_path, encoder, content, error, match):
    (tmp_path / "bad.npy").write_bytes(b"garbage, not an array")
    np.save(tmp_path / "x.npy", np.zeros((8, 8, 3), np.uint8))
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(error, match=match) as info:
        _load_jsonl(path, encoder)
    if "image" not in match and "npy" not in match:
        assert str(path) in str(info.value)


# ------------------------------------------------------------------ config
def test_config_rejects_unknown_keys_and_reads_numbers(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1e-5\n  bogus: 1\n")
    with pytest.raises(ValueError, match=r"'train'.*unknown keys \['bogus'\]"):
        load_config(str(p))
    p.write_text("train:\n  lr: 1e-5\n")
    assert load_config(str(p)).train.lr == 1e-5  # YAML 1.1 reads 1e-5 as a string
    with pytest.raises(ValueError, match="demos.sampling"):
        load_config(None, ["demos.sampling=nearest"])
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(str(tmp_path / "none.yaml"))
    for name in ("tiny.yaml", "mmict_paper.yaml"):
        load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", name))


# ------------------------------------------------------------------ sampling
def test_random_demos_are_same_task_never_self_and_deterministic(encoder):
    ds = _dataset(encoder)
    s = DemoSampler(ds, ds, 3, "random", seed=1)
    for q in range(len(ds)):
        g = s.group([q], epoch=0)
        assert q not in g.demos and len(set(g.demos)) == 3
        assert all(ds[d].task == ds[q].task for d in g.demos)
        assert s.group([q], epoch=0).demos == g.demos  # a pure function of (seed, epoch, query)


def test_similar_demos_are_nearest_neighbours(encoder):
    ds = _dataset(encoder)
    s = DemoSampler(ds, ds, 2, "similar", same_task=False)
    emb = ds.image_embeddings()
    for q in (0, 7, 13):
        sims = emb @ emb[q]
        sims[q] = -2
        expected = torch.topk(sims, 2).indices.flip(0).tolist()
        assert s.group([q], 0).demos == expected


def test_same_class_demos_share_the_label_then_the_task(encoder):
    ds = _dataset(encoder, num=80)
    s = DemoSampler(ds, ds, 2, "same-class", seed=3)
    for q in range(len(ds)):
        g = s.group([q], 0)
        same = [i for i in range(len(ds)) if i != q and ds[i].task == ds[q].task and ds[i].label == ds[q].label]
        assert q not in g.demos and len(set(g.demos)) == 2 and all(ds[d].task == ds[q].task for d in g.demos)
        assert sum(ds[d].label == ds[q].label for d in g.demos) == min(2, len(same))


def test_one_to_many_groups_share_task_and_demos(encoder):
    ds = _dataset(encoder)
    groups = epoch_groups(ds.tasks(), "one-to-many", 4, seed=0, epoch=0)
    assert all(len(g) == 4 and len({ds[i].task for i in g}) == 1 for g in groups)
    s = DemoSampler(ds, ds, 2, "one-to-many")
    for g in s.groups(groups, 0):
        assert not set(g.demos) & set(g.queries)
    batches = batches_of(groups, 8, drop_last=True)
    assert all(sum(len(g) for g in b) == 8 for b in batches)


# ------------------------------------------------------------------ models from local folders
@pytest.mark.parametrize("family", ["blip2", "clip", "siglip"])
def test_vision_families_give_token_features(family):
    cfg = load_config(None, [f"model.vision_family={family}"]).model
    enc = build_vision_encoder(cfg)
    feats = encode_pixels(enc, torch.randn(2, 3, 32, 32))
    assert feats.shape[0] == 2 and feats.shape[2] == enc.config.hidden_size and feats.std() > 1e-3


def test_models_load_from_local_checkpoint_folders(tmp_path):
    """An InstructBLIP folder serves as vision and M-Hub checkpoint; a Llama folder as the LLM."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration, LlamaConfig

    from mmict_kernels.icl.build import build_run
    from mmict_kernels.icl.tokenizer import build_word_tokenizer

    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        initializer_range=0.2,
    )
    tok = build_word_tokenizer(shapes.shapes_vocabulary())  # no separator: the driver adds it
    qformer = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        encoder_hidden_size=32,
        vocab_size=len(tok) + 1,
        max_position_embeddings=64,
    )
    text = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    full = InstructBlipForConditionalGeneration(
        InstructBlipConfig(vision_config=vision, qformer_config=qformer, text_config=text.to_dict(), num_query_tokens=4)
    )
    full.save_pretrained(tmp_path / "instructblip")
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(text).save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "qtok")
    cfg = load_config(
        None,
        [
            f"model.vision_checkpoint={tmp_path / 'instructblip'}",
            f"model.mhub_checkpoint={tmp_path / 'instructblip'}",
            f"model.mhub_tokenizer={tmp_path / 'qtok'}",
            f"model.llm_checkpoint={tmp_path / 'llm'}",
            "model.num_query_tokens=4",
            "data.shapes_train_size=8",
            "data.shapes_eval_size=4",
            "model.backend=torch",
        ],
    )
    run = build_run(cfg)
    m = run.model
    torch.testing.assert_close(m.mhub.query_tokens, full.query_tokens)
    torch.testing.assert_close(m.ln_vision.weight, full.vision_model.post_layernorm.weight)
    assert run.llm_tokenizer.convert_tokens_to_ids("<|endofchunk|>") == len(tok)  # added, embedding row added
    assert m.llm.get_input_embeddings().num_embeddings == len(tok) + 1

    from mmict_kernels.icl.batch import BatchBuilder
    from mmict_kernels.icl.sampling import Group

    b = BatchBuilder(run.mhub_tokenizer, run.llm_tokenizer, 4, "<|endofchunk|>", "decoder")(
        [Group([0], [1, 2])], run.train_set, run.train_set
    )
    nll, n = m(b)
    assert n > 0 and torch.isfinite(nll)
    with pytest.raises(FileNotFoundError, match="llm_checkpoint"):
        build_run(
            load_config(
                None, [f"model.llm_checkpoint={tmp_path / 'none'}", "data.shapes_train_size=8", "data.shapes_eval_size=4"]
            )
        )


def test_jpeg_and_png_images_through_pillow(tmp_path, encoder):
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 60, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"image": "a.png", "prompt": "p", "answer": "a"}))
    ds, _ = _load_jsonl(good, encoder)
    assert ds.image_tokens(0).shape[1] == encoder.config.hidden_size
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "bad.jpg", "prompt": "p", "answer": "a"}))
    with pytest.raises(ValueError, match=r"bad\.jpg.*bad\.jsonl, line 1.*cannot be read"):
        _load_jsonl(bad, encoder)
