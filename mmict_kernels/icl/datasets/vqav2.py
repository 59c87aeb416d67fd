"""VQAv2 and OK-VQA in their official layout: a ``questions`` and an ``annotations`` JSON, joined on ``question_id``.

questions: ``{"data_subtype": "train2014", "questions": [{"image_id", "question", "question_id"}]}``;
annotations: ``{"annotations": [{"question_id", "image_id", "answers": [10 x {"answer"}],
"multiple_choice_answer"}]}``. Images: ``COCO_{data_subtype}_{image_id:012d}.jpg`` in ``media``
(or in ``media/{data_subtype}/``). Every human answer is kept (the VQA accuracy needs all 10);
the training target is ``multiple_choice_answer`` (the most common answer).

Config: ``{format: vqav2, questions: FILE, annotations: FILE, media: DIR}``.
"""

from __future__ import annotations

import os

from . import media as media_mod
from .common import VQA_PROMPT, Entry, LoadContext, build_dataset, expect, field, read_json, vqa_prompt


def image_path(root: str, subtype: str, image_id: int, where: str) -> str:
    name = f"COCO_{subtype}_{image_id:012d}.jpg"
    candidates = [os.path.join(root, name), os.path.join(root, subtype, name)]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise FileNotFoundError(f"image file not found: {candidates[0]} (nor {candidates[1]}; referenced by {where})")


def load(spec: dict, ctx: LoadContext):
    qpath, apath, root = spec["questions"], spec["annotations"], spec["media"]
    questions = read_json(qpath, "VQA questions")
    annotations = read_json(apath, "VQA annotations")
    expect(isinstance(questions, dict) and isinstance(questions.get("questions"), list), qpath,
           "expected a JSON object with a 'questions' list (the official VQA questions file)")  # fmt: skip
    expect(isinstance(annotations, dict) and isinstance(annotations.get("annotations"), list), apath,
           "expected a JSON object with an 'annotations' list (the official VQA annotations file)")  # fmt: skip
    subtype = questions.get("data_subtype")
    expect(
        isinstance(subtype, str) and bool(subtype), qpath, "expected 'data_subtype' (e.g. \"train2014\"), which names the images"
    )
    by_qid = {}
    for i, ann in enumerate(annotations["annotations"]):
        where = f"{apath}, annotation {i}"
        qid = field(ann, "question_id", int, where)
        answers = field(ann, "answers", list, where)
        texts = [field(a, "answer", str, f"{where}, answer {j}") for j, a in enumerate(answers)]
        expect(bool(texts), where, "'answers' is empty")
        by_qid[qid] = (ann, texts, where)
    entries, template = [], spec.get("prompt", VQA_PROMPT)
    for i, q in enumerate(questions["questions"]):
        where = f"{qpath}, question {i}"
        qid = field(q, "question_id", int, where)
        image_id = field(q, "image_id", int, where)
        question = field(q, "question", str, where)
        if qid not in by_qid:
            raise ValueError(f"{where}: question_id {qid} has no entry in the annotations file {apath}")
        ann, answers, awhere = by_qid[qid]
        expect(ann.get("image_id", image_id) == image_id, awhere,
               f"image_id {ann.get('image_id')} differs from the question's ({image_id}, {where})")  # fmt: skip
        target = ann.get("multiple_choice_answer")
        if not isinstance(target, str):
            target = max(answers, key=answers.count)  # the first of the most frequent
        image = media_mod.image(image_path(root, subtype, image_id, where), ctx.image_size, where)
        entries.append(Entry(image, vqa_prompt(template, question, where), target.strip(), tuple(answers), image_id, qid))
    return build_dataset(entries, ctx, spec.get("task", "vqav2"), "vqa", os.path.basename(qpath), spec.get("limit"))
