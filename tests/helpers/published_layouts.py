"""Tiny data sets in each published layout (JPEGs written with Pillow, videos with PyAV), and a 2-step run on them.

Layouts as the published files have them: COCO Karpathy (LAVIS), VQAv2 questions/annotations,
MSR-VTT ``train_val_videodatainfo.json``, MSVD (LAVIS), MSRVTT-QA, a Hugging Face ``save_to_disk``
folder. Every image and video is a distinct random pattern, so every one has its own features.
"""

import json
import os

import numpy as np

from mmict_kernels.icl.config import load_config

TINY = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny.yaml")
WORDS = ["a", "dog", "cat", "runs", "on", "the", "grass", "red", "ball", "man", "plays", "guitar", "is", "sitting"]


def write_jpeg(path, seed: int, size=(40, 30)) -> str:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=95)
    return str(path)


def write_video(path, seed: int, frames: int = 6, size=(32, 24)) -> str:
    """A short video (MPEG-4 part 2 in .mp4 or .avi) whose frames differ."""
    import av

    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        base = rng.integers(0, 255, (size[1], size[0], 3))
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(((base + 40 * i) % 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def sentence(rng) -> str:
    return " ".join(rng.choice(WORDS, 4))


def dump(path, value) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f)
    return str(path)


# ---------------------------------------------------------------------------------------------- layouts
def coco_karpathy(root, n_train=4, n_eval=3, captions=3):
    """LAVIS's coco_karpathy_train.json (one line per caption) and coco_karpathy_val.json (caption lists)."""
    rng = np.random.default_rng(1)
    media = os.path.join(root, "coco")
    train, val = [], []
    for i in range(n_train):
        image = f"train2014/COCO_train2014_{i + 1:012d}.jpg"
        write_jpeg(os.path.join(media, image), i)
        train += [{"caption": sentence(rng), "image": image, "image_id": f"coco_{i + 1}"} for _ in range(captions)]
    for i in range(n_eval):
        image = f"val2014/COCO_val2014_{100 + i:012d}.jpg"
        write_jpeg(os.path.join(media, image), 100 + i)
        val.append({"image": image, "caption": [sentence(rng) for _ in range(captions)]})
    return (
        {"format": "coco_karpathy", "annotations": dump(os.path.join(root, "coco_karpathy_train.json"), train), "media": media},
        {"format": "coco_karpathy", "annotations": dump(os.path.join(root, "coco_karpathy_val.json"), val), "media": media},
    )


def vqav2(root, subtype: str, first_image: int, n_images=3, per_image=2):
    """The official v2_OpenEnded_mscoco_<subtype>_questions.json and v2_mscoco_<subtype>_annotations.json."""
    rng = np.random.default_rng(first_image)
    media = os.path.join(root, "vqa", subtype)
    questions, annotations = [], []
    for i in range(n_images):
        image_id = first_image + i
        write_jpeg(os.path.join(media, f"COCO_{subtype}_{image_id:012d}.jpg"), image_id)
        for j in range(per_image):
            qid = image_id * 1000 + j
            answers = list(rng.choice(["red", "two", "yes", "no"], 10))
            questions.append({"image_id": image_id, "question": f"what is {WORDS[j]} ?", "question_id": qid})
            annotations.append({
                "question_type": "what is", "multiple_choice_answer": max(answers, key=answers.count), "image_id": image_id,
                "answer_type": "other", "question_id": qid,
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)],
            })  # fmt: skip
    q = dump(os.path.join(root, f"v2_OpenEnded_mscoco_{subtype}_questions.json"),
             {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": subtype,
              "questions": questions})  # fmt: skip
    a = dump(os.path.join(root, f"v2_mscoco_{subtype}_annotations.json"),
             {"info": {}, "license": {}, "data_subtype": subtype, "annotations": annotations})  # fmt: skip
    return {"format": "vqav2", "questions": q, "annotations": a, "media": media}


def msrvtt_videos(root, n=4):
    media = os.path.join(root, "msrvtt", "videos")
    for i in range(n):
        write_video(os.path.join(media, f"video{i}.mp4"), i, frames=5 + i)
    return media


def msrvtt(root, splits=("train", "train", "train", "validate"), captions=3):
    """train_val_videodatainfo.json: videos with their split, sentences by video_id; videos {video_id}.mp4."""
    rng = np.random.default_rng(3)
    media = msrvtt_videos(root, len(splits))
    videos = [{"category": 0, "url": "", "video_id": f"video{i}", "start time": 0.0, "end time": 1.0, "split": s, "id": i}
              for i, s in enumerate(splits)]  # fmt: skip
    sentences = [{"caption": sentence(rng), "video_id": f"video{i}", "sen_id": i * captions + j}
                 for i in range(len(splits)) for j in range(captions)]  # fmt: skip
    ann = dump(
        os.path.join(root, "msrvtt", "train_val_videodatainfo.json"), {"info": {}, "videos": videos, "sentences": sentences}
    )
    return (
        {"format": "msrvtt", "annotations": ann, "media": media, "split": "train"},
        {"format": "msrvtt", "annotations": ann, "media": media, "split": "validate"},
    )


def msvd(root, n_train=3, n_eval=2):
    """LAVIS's MSVD caption JSONs: train one entry per caption, test a caption list per video; .avi videos."""
    rng = np.random.default_rng(4)
    media = os.path.join(root, "msvd", "YouTubeClips")
    train, test = [], []
    for i in range(n_train + n_eval):
        name = f"clip{i}_{i * 5}_{i * 5 + 4}.avi"
        write_video(os.path.join(media, name), 50 + i, frames=4)
        if i < n_train:
            train += [{"video": name, "caption": sentence(rng)} for _ in range(2)]
        else:
            test.append({"video": name, "caption": [sentence(rng) for _ in range(3)]})
    return (
        {"format": "msvd", "annotations": dump(os.path.join(root, "msvd", "cap_train.json"), train), "media": media},
        {"format": "msvd", "annotations": dump(os.path.join(root, "msvd", "cap_test.json"), test), "media": media},
    )


def videoqa(root):
    """MSRVTT-QA as released (``video_id`` numbers -> video{N}.mp4) and LAVIS's layout (``video`` file names)."""
    media = msrvtt_videos(root)
    train = [{"answer": a, "id": k, "question": f"what is the {w} doing ?", "video_id": k % 3, "category_id": 0}
             for k, (a, w) in enumerate(zip(["run", "sit", "play", "run", "sit", "play"], WORDS))]  # fmt: skip
    test = [{"question": "who is sitting ?", "answer": "man", "video": "video3.mp4", "question_id": 9001},
            {"question": "what is red ?", "answer": "ball", "video": "video3.mp4", "question_id": 9002}]  # fmt: skip
    return (
        {"format": "videoqa", "annotations": dump(os.path.join(root, "msrvtt_qa", "train_qa.json"), train), "media": media},
        {"format": "videoqa", "annotations": dump(os.path.join(root, "msrvtt_qa", "test_qa.json"), test), "media": media},
    )


# ---------------------------------------------------------------------------------------------- a run
def tiny_config(tmp_path, train_spec, eval_spec, *extra):
    """configs/tiny.yaml at test sizes, reading the given sources."""
    overrides = [
        f"data.train={json.dumps(train_spec)}",
        f"data.eval={json.dumps(eval_spec)}",
        f"data.feature_cache={tmp_path / 'cache'}",
        "data.num_frames=3",
        f"train.output_dir={tmp_path / 'run'}",
        "train.max_steps=2",
        "train.batch_size=4",
        "train.warmup_steps=1",
        "train.save_every=0",
        "train.progress=false",
        "model.backend=torch",
        "demos.num_demos=2",
        "eval.batch_size=8",
        "eval.max_new_tokens=4",
        *extra,
    ]
    return load_config(TINY, overrides)


def train_and_evaluate(tmp_path, train_spec, eval_spec, *extra):
    """2 training steps, then evaluation with 0 and 2 demonstrations; returns (trainer, results, eval.json path)."""
    from mmict_kernels.icl.evaluation import evaluate
    from mmict_kernels.icl.training import Trainer

    cfg = tiny_config(tmp_path, train_spec, eval_spec, *extra)
    trainer = Trainer(cfg)
    losses = trainer.fit(resume=False)
    assert len(losses) == 2 and all(np.isfinite(losses))
    output = str(tmp_path / "run" / "eval.json")
    e = cfg.eval
    results = evaluate(
        trainer.run, demo_counts=(0, 2), sampling=cfg.demos.sampling, output=output, print_table=False,
        batch_size=e.batch_size, max_new_tokens=e.max_new_tokens, min_new_tokens=e.min_new_tokens, seed=cfg.data.seed,
    )  # fmt: skip
    return trainer, results, output
