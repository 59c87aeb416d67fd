"""Hugging Face ``datasets`` folders (``save_to_disk``, and a local folder ``load_dataset`` reads) with a column
mapping: captioning from an Image column, VQA from image paths; trained 2 steps and evaluated through the config."""

import json
import os

import numpy as np
import pytest

from helpers.published_layouts import WORDS, tiny_config, train_and_evaluate, write_jpeg
from mmict_kernels.icl.build import build_run

datasets = pytest.importorskip("datasets")


def caption_folder(root):
    """A DatasetDict: train one row per caption (Image column, image_id), validation a caption list per image."""
    from PIL import Image

    rng = np.random.default_rng(0)

    def image(i):
        return Image.fromarray(np.random.default_rng(i).integers(0, 255, (30, 40, 3), dtype=np.uint8))

    train = {"img": [image(i // 2) for i in range(8)], "text": [" ".join(rng.choice(WORDS, 4)) for _ in range(8)],
             "cocoid": [i // 2 for i in range(8)]}  # fmt: skip
    val = {"img": [image(10 + i) for i in range(3)], "text": [[" ".join(rng.choice(WORDS, 4)) for _ in range(2)] for _ in range(3)],
           "cocoid": [10 + i for i in range(3)]}  # fmt: skip
    feats = datasets.Features({"img": datasets.Image(), "text": datasets.Value("string"), "cocoid": datasets.Value("int64")})
    val_feats = datasets.Features({**feats, "text": datasets.Sequence(datasets.Value("string"))})
    path = os.path.join(root, "hf_captions")
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(train, features=feats),
        "validation": datasets.Dataset.from_dict(val, features=val_feats),
    }).save_to_disk(path)  # fmt: skip
    spec = {"format": "hf", "path": path, "image": "img", "caption": "text", "image_id": "cocoid"}
    return {**spec, "split": "train"}, {**spec, "split": "validation"}


def test_caption_rows_from_an_image_column(tmp_path):
    train, val = caption_folder(tmp_path)
    run = build_run(tiny_config(tmp_path, train, val))
    tr, ev = run.train_set, run.eval_set
    assert len(tr) == 8 and len(ev) == 3 and {e.kind for e in tr.examples + ev.examples} == {"caption"}
    assert tr[0].answers == tr[1].answers and len(tr[0].answers) == 2  # rows of one image_id: one image
    assert tr[0].media == tr[1].media != tr[2].media
    assert [e.image_id for e in ev.examples] == [10, 11, 12] and len(ev[0].answers) == 2
    assert ev.image_tokens(0).shape == (17, 64)


def test_caption_folder_trains_and_evaluates(tmp_path):
    train, val = caption_folder(tmp_path)
    _, results, _ = train_and_evaluate(tmp_path, train, val)
    res = results["by_num_demos"]["2"]
    assert res["scores"]["caption"]["headline"]["metric"] == "CIDEr"
    assert [r["image_id"] for r in json.load(open(res["predictions"]["caption"]))] == [10, 11, 12]


def test_vqa_from_a_local_load_dataset_folder(tmp_path):
    """A folder of JSON lines ``load_dataset`` reads; images as paths under ``media``; VQAv2-style answer records."""
    media = tmp_path / "images"
    folder = tmp_path / "hf_vqa"
    folder.mkdir()
    for split, n, seed in (("train", 6, 0), ("test", 2, 50)):
        rows = []
        for i in range(n):
            write_jpeg(media / f"{split}{i // 2}.jpg", seed + i // 2)
            answers = [{"answer": a, "answer_id": k} for k, a in enumerate(["red", "red", "blue"])]
            rows.append({"file": f"{split}{i // 2}.jpg", "q": f"what is {WORDS[i]} ?", "answers": answers, "qid": 100 * i + 7})
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    spec = {"format": "hf", "path": str(folder), "media": str(media), "image": "file", "question": "q", "answers": "answers",
            "question_id": "qid"}  # fmt: skip
    trainer, results, _ = train_and_evaluate(tmp_path, {**spec, "split": "train"}, {**spec, "split": "test"})
    tr = trainer.run.train_set
    assert len(tr) == 6 and tr[0].answers == ("red", "red", "blue") and tr[0].answer == "red" and tr[0].kind == "vqa"
    assert tr[0].prompt == "Question: what is a ? Short answer:" and tr[0].media == tr[1].media
    res = results["by_num_demos"]["0"]
    assert res["scores"]["vqa"]["headline"]["metric"] == "vqa_accuracy"
    assert [r["question_id"] for r in json.load(open(res["predictions"]["vqa"]))] == [7, 107]


def test_bad_mappings_are_named(tmp_path):
    train, val = caption_folder(tmp_path)
    with pytest.raises(ValueError, match=r"data\.hf\.caption: no column 'caption'"):
        build_run(tiny_config(tmp_path, {**train, "caption": "caption"}, val))
    with pytest.raises(ValueError, match=r"data\.hf\.split: expected one of \['train', 'validation'\]"):
        build_run(tiny_config(tmp_path, {**train, "split": "test"}, val))
    with pytest.raises(ValueError, match=r"data\.train: format 'hf' needs exactly one of 'image' or 'video'"):
        tiny_config(tmp_path, {k: v for k, v in train.items() if k != "image"}, val)
    with pytest.raises(ValueError, match=r"data\.eval: unknown keys \['captions'\] for format 'hf'"):
        tiny_config(tmp_path, train, {**val, "captions": "text"})
