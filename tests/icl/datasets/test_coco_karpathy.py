"""COCO Karpathy (LAVIS's JSONs): read exactly, trained 2 steps and evaluated through the config; CIDEr is the headline."""

import json
import os

import pytest

from helpers.published_layouts import coco_karpathy, tiny_config, train_and_evaluate, write_jpeg
from mmict_kernels.icl import metrics
from mmict_kernels.icl.build import build_run
from mmict_kernels.icl.evaluation import format_table


def test_train_lines_per_caption_eval_images_with_caption_lists(tmp_path):
    train, val = coco_karpathy(tmp_path)
    run = build_run(tiny_config(tmp_path, train, val))
    tr, ev = run.train_set, run.eval_set
    assert len(tr) == 12 and len(ev) == 3  # train: one example per caption; val: one per image
    assert {e.kind for e in tr.examples} == {e.kind for e in ev.examples} == {"caption"}
    assert {e.task for e in tr.examples} == {"coco_caption"}
    raw = json.load(open(train["annotations"]))
    assert [e.answer for e in tr.examples] == [r["caption"].strip() for r in raw]
    assert tr[0].answers == tuple(r["caption"] for r in raw[:3])  # every caption of the image is a reference
    assert [e.image_id for e in tr.examples[:4]] == [1, 1, 1, 2]  # the number in COCO_train2014_000000000001.jpg
    val_raw = json.load(open(val["annotations"]))
    assert [e.answers for e in ev.examples] == [tuple(r["caption"]) for r in val_raw]
    assert [e.image_id for e in ev.examples] == [100, 101, 102]
    assert ev[0].prompt == "A short image caption:"
    assert ev.image_tokens(0).shape == (17, 64)  # 32 px, 8 px patches + CLS; width 64 (tiny encoder)


def test_two_steps_and_evaluation_write_coco_results(tmp_path):
    train, val = coco_karpathy(tmp_path)
    _, results, output = train_and_evaluate(tmp_path, train, val)
    for k in ("0", "2"):
        res = results["by_num_demos"][k]
        s = res["scores"]["coco_caption"]
        assert s["kind"] == "caption" and s["headline"]["metric"] == "CIDEr"
        assert s["headline"]["value"] == pytest.approx(100 * s["captions"]["CIDEr"])
        saved = json.load(open(res["predictions"]["coco_caption"]))
        assert os.path.dirname(res["predictions"]["coco_caption"]) == os.path.dirname(output)
        assert [r["image_id"] for r in saved] == [100, 101, 102] and all(isinstance(r["caption"], str) for r in saved)
        # Re-scored from the saved file and the annotations alone: the same numbers.
        refs = {100 + i: r["caption"] for i, r in enumerate(json.load(open(val["annotations"])))}
        again = metrics.caption_metrics({r["image_id"]: r["caption"] for r in saved}, refs)
        assert again["CIDEr"] == pytest.approx(s["captions"]["CIDEr"])
    assert json.load(open(output))["by_num_demos"]["2"]["scores"]["coco_caption"]["headline"]["metric"] == "CIDEr"
    assert "CIDEr" in format_table(results).splitlines()[2]


def test_bad_entries_are_named(tmp_path):
    train, val = coco_karpathy(tmp_path, n_train=2, n_eval=1)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "x.jpg", "caption": "a"}, {"image": "y.jpg"}]))
    write_jpeg(os.path.join(train["media"], "x.jpg"), 0)
    with pytest.raises(ValueError, match=r"bad\.json, entry 1: missing 'caption'"):
        build_run(tiny_config(tmp_path, {**train, "annotations": str(bad)}, val))
    bad.write_text(json.dumps([{"image": "missing.jpg", "caption": "a"}]))
    with pytest.raises(FileNotFoundError, match=r"missing\.jpg \(referenced by .*bad\.json, entry 0\)"):
        build_run(tiny_config(tmp_path, {**train, "annotations": str(bad)}, val))
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match=r"bad\.json: expected a JSON list"):
        build_run(tiny_config(tmp_path, {**train, "annotations": str(bad)}, val))
    broken = os.path.join(train["media"], "broken.jpg")
    open(broken, "wb").write(b"not a jpeg")
    bad.write_text(json.dumps([{"image": "broken.jpg", "caption": "a"}]))
    with pytest.raises(ValueError, match=r"broken\.jpg \(referenced by .*bad\.json, entry 0\) cannot be read"):
        build_run(tiny_config(tmp_path, {**train, "annotations": str(bad)}, val))
