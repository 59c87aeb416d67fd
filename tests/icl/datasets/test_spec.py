"""The data section of the config: each source's format and keys, frames and feature storage, checked when read."""

import pytest

from mmict_kernels.icl.config import load_config
from mmict_kernels.icl.datasets import FORMATS


def _load(*overrides):
    return load_config(None, list(overrides))


def test_string_sources_keep_meaning_shapes_or_jsonl():
    assert _load().data.train == "shapes"
    assert _load("data.eval=/data/val.jsonl").data.eval == "/data/val.jsonl"


@pytest.mark.parametrize(
    "spec, match",
    [
        ("{annotations: a.json, media: m}", r"data\.train\.format: expected one of \['coco_karpathy', 'hf', 'msrvtt', 'msvd', "),
        ("{format: coco, annotations: a.json}", r"data\.train\.format: expected one of"),
        ("{format: coco_karpathy, annotations: a.json}", r"data\.train: format 'coco_karpathy' needs \['media'\]"),
        ("{format: coco_karpathy, annotation: a.json, media: m}", r"data\.train: unknown keys \['annotation'\]"),
        ("{format: msrvtt, annotations: a.json, media: m}", r"needs \['split'\]"),
        (
            "{format: msrvtt, annotations: a.json, media: m, split: val}",
            r"data\.train\.split: expected one of \['train', 'validate', 'test'\]",
        ),
        ("{format: msvd, annotations: a.json, media: m, limit: 0}", r"data\.train\.limit: expected an integer >= 1"),
        ("{format: videoqa, annotations: 3, media: m}", r"data\.train\.annotations: expected a string"),
        ("{format: hf, path: d, image: img}", r"a VQA data set needs 'question'|expected 'caption' or 'vqa'"),
        ("{format: hf, path: d, image: img, question: q}", r"a VQA data set needs 'question' and 'answer' or 'answers'"),
        ("{format: hf, path: d, image: img, video: v, caption: c}", r"exactly one of 'image' or 'video'"),
        ("{format: hf, path: d, image: img, kind: caption}", r"a caption data set needs 'caption'"),
        ("[a, b]", r"data\.train: expected"),
    ],
)
def test_bad_sources_are_refused_by_key(spec, match):
    with pytest.raises(ValueError, match=match):
        _load(f"data.train={spec}")


def test_every_format_has_a_reader_and_a_valid_example():
    from mmict_kernels.icl.datasets import READERS

    assert set(READERS) == set(FORMATS)
    examples = {
        "coco_karpathy": "{format: coco_karpathy, annotations: a.json, media: m}",
        "vqav2": "{format: vqav2, questions: q.json, annotations: a.json, media: m}",
        "msrvtt": "{format: msrvtt, annotations: a.json, media: m, split: test}",
        "msvd": "{format: msvd, annotations: a.json, media: m}",
        "videoqa": "{format: videoqa, annotations: a.json, media: m, task: msrvtt_qa, prompt: 'Q: {question} A:'}",
        "hf": "{format: hf, path: d, split: train, image: img, caption: text, limit: 5}",
    }
    for fmt, spec in examples.items():
        assert _load(f"data.eval={spec}").data.eval["format"] == fmt


@pytest.mark.parametrize(
    "override, match",
    [
        ("data.num_frames=0", r"data\.num_frames: expected an integer >= 1"),
        ("data.feature_dtype=fp8", r"data\.feature_dtype: expected float16, bfloat16 or float32"),
        ("data.feature_shard_mb=0", r"data\.feature_shard_mb: expected a number > 0"),
        ("data.feature_batch_size=-2", r"data\.feature_batch_size: expected an integer >= 1"),
    ],
)
def test_frame_and_feature_keys_are_checked(override, match):
    with pytest.raises(ValueError, match=match):
        _load(override)
