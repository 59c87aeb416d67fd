"""Videos decoded with PyAV: MSR-VTT, MSVD and MSRVTT-QA in their published layouts, trained 2 steps and
evaluated through the config; frames sampled uniformly, encoded once and cached; undecodable files named."""

import json
import os

import numpy as np
import pytest
import torch

from helpers.published_layouts import msrvtt, msvd, tiny_config, train_and_evaluate, videoqa, write_video
from mmict_kernels.icl.build import build_run
from mmict_kernels.icl.datasets import LoadContext
from mmict_kernels.icl.datasets.media import uniform_indices, video_clip, video_frames


def test_frames_are_sampled_uniformly(tmp_path):
    assert uniform_indices(10, 4) == [1, 3, 6, 8] and uniform_indices(3, 5) == [0, 0, 1, 2, 2]
    path = write_video(tmp_path / "v.mp4", 0, frames=10)
    import av

    with av.open(path) as c:
        every = [np.asarray(f.to_image().resize((16, 16), 3)) for f in c.decode(video=0)]  # 3: bicubic
    got = video_frames(path, 4, 16, "test")
    assert got.shape == (4, 16, 16, 3) and got.dtype == np.uint8
    for j, i in enumerate([1, 3, 6, 8]):
        assert np.array_equal(got[j], every[i])


def test_video_clip_keeps_the_size_and_gives_the_sampled_rate(tmp_path):
    """At the file's own size (AIM's processors resize or tile): the same frames, and their rate."""
    path = write_video(tmp_path / "v.mp4", 1, frames=6, size=(32, 24))  # 8 frames per second: 0.75 s
    import av

    with av.open(path) as c:
        every = [np.asarray(f.to_image()) for f in c.decode(video=0)]
    frames, fps = video_clip(path, 4, "test")
    assert [f.shape for f in frames] == [(24, 32, 3)] * 4
    for got, i in zip(frames, uniform_indices(6, 4)):
        assert np.array_equal(got, every[i])
    assert fps == pytest.approx(4 / 0.75)


def test_a_jsonl_video_record_is_decoded_like_the_published_sets(tmp_path):
    """The driver's own format takes a video file (``"video"``): data.num_frames frames, packed."""
    write_video(tmp_path / "clips" / "a.mp4", 2, frames=5)
    np.save(tmp_path / "x.npy", np.zeros((8, 8, 3), np.uint8))
    lines = [
        {"video": "clips/a.mp4", "prompt": "A short video caption:", "answer": "a red square", "kind": "caption"},
        {"image": "x.npy", "prompt": "what is it ?", "answer": "nothing", "kind": "vqa"},
    ]
    (tmp_path / "own.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    own = str(tmp_path / "own.jsonl")
    run = build_run(tiny_config(tmp_path, own, own))
    video = next(e for e in run.train_set.examples if e.kind == "caption")
    assert len(video.images) == 3 and video.image_id == "clips/a.mp4"  # tiny_config: data.num_frames=3


def test_msrvtt_reads_the_split_and_its_sentences(tmp_path):
    train, val = msrvtt(tmp_path)
    run = build_run(tiny_config(tmp_path, train, val))
    tr, ev = run.train_set, run.eval_set
    assert len(tr) == 9 and len(ev) == 1  # 3 training videos x 3 sentences; the validate video with its 3
    assert {e.image_id for e in tr.examples} == {"video0", "video1", "video2"} and ev[0].image_id == "video3"
    assert len(ev[0].answers) == 3 and ev[0].kind == "caption" and ev[0].prompt == "A short video caption:"
    assert len(ev[0].images) == 3 and ev.image_tokens(0).shape == (3 * 17, 64)  # data.num_frames=3 frames, packed


def test_msrvtt_trains_and_evaluates(tmp_path):
    train, val = msrvtt(tmp_path, splits=("train", "train", "train", "validate", "validate"))
    _, results, _ = train_and_evaluate(tmp_path, train, val)
    res = results["by_num_demos"]["2"]
    assert res["scores"]["msrvtt_caption"]["headline"]["metric"] == "CIDEr"
    saved = json.load(open(res["predictions"]["msrvtt_caption"]))
    assert [r["image_id"] for r in saved] == ["video3", "video4"]


def test_msvd_trains_and_evaluates(tmp_path):
    train, test = msvd(tmp_path)
    _, results, _ = train_and_evaluate(tmp_path, train, test)
    res = results["by_num_demos"]["2"]
    assert res["scores"]["msvd_caption"]["headline"]["metric"] == "CIDEr" and res["scores"]["msvd_caption"]["n"] == 2
    saved = json.load(open(res["predictions"]["msvd_caption"]))
    assert [r["image_id"] for r in saved] == ["clip3_15_19", "clip4_20_24"]  # the .avi file names


def test_videoqa_trains_and_evaluates(tmp_path):
    train, test = videoqa(tmp_path)
    trainer, results, _ = train_and_evaluate(tmp_path, train, test)
    tr = trainer.run.train_set
    assert [os.path.basename(e.media) for e in tr.examples[:4]] == ["video0.mp4", "video1.mp4", "video2.mp4", "video0.mp4"]
    assert tr[0].question_id == 0 and tr[0].answers == ("run",) and tr[0].kind == "vqa"
    res = results["by_num_demos"]["2"]
    assert res["scores"]["videoqa"]["headline"]["metric"] == "vqa_accuracy"
    assert [r["question_id"] for r in json.load(open(res["predictions"]["videoqa"]))] == [9001, 9002]


def test_video_frames_go_through_the_encoder_once(tmp_path, monkeypatch):
    train, val = msrvtt(tmp_path)
    encoded = []
    original = LoadContext.encode

    def counting(self, frames):
        encoded.append(len(frames))
        return original(self, frames)

    monkeypatch.setattr(LoadContext, "encode", counting)
    first = build_run(tiny_config(tmp_path, train, val))
    assert sum(encoded) == 4 * 3  # 4 videos x 3 frames, whatever the number of sentences
    encoded.clear()
    again = build_run(tiny_config(tmp_path, train, val))
    assert encoded == []  # all cached in data.feature_cache
    assert torch.equal(again.train_set.image_tokens(5), first.train_set.image_tokens(5))


def test_an_undecodable_video_is_named_with_its_entry(tmp_path):
    train, val = msrvtt(tmp_path)
    with open(os.path.join(train["media"], "video1.mp4"), "wb") as f:
        f.write(b"\x00\x00\x00\x18ftypmp42 not really a video")
    with pytest.raises(
        ValueError,
        match=r"video1\.mp4 \(referenced by .*train_val_videodatainfo\.json, videos\[1\] \(video1\)\) cannot be decoded",
    ):
        build_run(tiny_config(tmp_path, train, val))
    os.remove(os.path.join(train["media"], "video1.mp4"))
    with pytest.raises(FileNotFoundError, match=r"video1\.mp4 \(referenced by .*videos\[1\]"):
        build_run(tiny_config(tmp_path, train, val))
