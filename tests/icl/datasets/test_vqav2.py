"""VQAv2 / OK-VQA official files: joined on question_id with the 10 answers, images COCO_{subtype}_{id:012d}.jpg;
trained 2 steps and evaluated through the config; VQA accuracy (official rule) is the headline."""

import json
import os

import pytest

from helpers.published_layouts import tiny_config, train_and_evaluate, vqav2
from mmict_kernels.icl import metrics
from mmict_kernels.icl.build import build_run


def test_questions_join_annotations_with_every_answer(tmp_path):
    train, val = vqav2(tmp_path, "train2014", 1), vqav2(tmp_path, "val2014", 500)
    run = build_run(tiny_config(tmp_path, train, val))
    tr = run.train_set
    anns = {a["question_id"]: a for a in json.load(open(train["annotations"]))["annotations"]}
    questions = json.load(open(train["questions"]))["questions"]
    assert len(tr) == len(questions) == 6
    for e, q in zip(tr.examples, questions):
        a = anns[q["question_id"]]
        assert (e.question_id, e.image_id, e.kind, e.task) == (q["question_id"], q["image_id"], "vqa", "vqav2")
        assert e.answers == tuple(x["answer"] for x in a["answers"]) and len(e.answers) == 10
        assert e.answer == a["multiple_choice_answer"]
        assert e.prompt == f"Question: {q['question']} Short answer:"
        assert e.media.endswith(f"COCO_train2014_{q['image_id']:012d}.jpg")
    # The two questions of one image show the same features.
    assert tr[0].images == tr[1].images and tr[0].images != tr[2].images


def test_two_steps_and_evaluation_write_vqa_results(tmp_path):
    train, val = vqav2(tmp_path, "train2014", 1), vqav2(tmp_path, "val2014", 500)
    _, results, output = train_and_evaluate(tmp_path, train, val, "demos.sampling=similar")
    anns = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in json.load(open(val["annotations"]))["annotations"]}
    for k in ("0", "2"):
        res = results["by_num_demos"][k]
        s = res["scores"]["vqav2"]
        assert s["kind"] == "vqa" and s["headline"] == {"metric": "vqa_accuracy", "value": s["vqa_accuracy"]}
        assert "captions" not in s
        saved = json.load(open(res["predictions"]["vqav2"]))
        assert sorted(r["question_id"] for r in saved) == sorted(anns)
        # Re-scored from the saved answers with the official rule: the same accuracy.
        again = 100 * sum(metrics.vqa_accuracy(r["answer"], anns[r["question_id"]]) for r in saved) / len(saved)
        assert again == pytest.approx(s["vqa_accuracy"])
    assert os.path.isfile(output)


def test_bad_files_are_named(tmp_path):
    train, val = vqav2(tmp_path, "train2014", 1), vqav2(tmp_path, "val2014", 500)
    anns = json.load(open(train["annotations"]))
    del anns["annotations"][3]
    bad = tmp_path / "bad_annotations.json"
    bad.write_text(json.dumps(anns))
    with pytest.raises(
        ValueError, match=r"questions\.json, question 3: question_id 2001 has no entry in the annotations file .*bad_annotations"
    ):
        build_run(tiny_config(tmp_path, {**train, "annotations": str(bad)}, val))
    os.remove(os.path.join(train["media"], "COCO_train2014_000000000002.jpg"))
    with pytest.raises(FileNotFoundError, match=r"COCO_train2014_000000000002\.jpg.*question 2"):
        build_run(tiny_config(tmp_path, train, val))
    with pytest.raises(ValueError, match=r"data\.train: format 'vqav2' needs \['questions'\]"):
        tiny_config(tmp_path, {k: v for k, v in train.items() if k != "questions"}, val)
