"""python -m mmict_kernels.aim on the user's own JSONL data: images of any size, videos (frames and video files), own tasks.

Runs the CLI at a tiny budget on a tiny random-weight LLaVA-NeXT and Qwen2-VL: the warm-up reads
the user's data (not the embedded shapes), ``tasks: [caption, vqa]`` selects the file's tasks,
video records reach Qwen2-VL as videos and LLaVA-NeXT as frames; and a saved checkpoint folder
(model, image processor, tokenizer) loads as the backbone.
"""

import json

import numpy as np
import pytest
import torch

from helpers.published_layouts import write_video
from helpers.threads import one_thread
from mmict_kernels.aim import main
from mmict_kernels.icl.aim.config import AIMConfig
from mmict_kernels.icl.aim.run import build_backbone

WORDS = ["red", "blue", "green", "circle", "square", "a", "on", "grey"]


def write_data(folder, n=12, seed=0):
    """n records: images of several sizes (.npy), 3-frame videos and a video file (record 7, 5 frames
    at 8 per second), tasks caption and vqa (and an unused one)."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        task = ["caption", "vqa", "other"][i % 3]
        if i == 7:
            write_video(folder / "clip7.mp4", i, frames=5, size=(16, 16))
            rec = {"video": "clip7.mp4"}
        elif i % 4 == 3:
            frames = []
            for f in range(3):
                np.save(folder / f"v{i}_{f}.npy", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
                frames.append(f"v{i}_{f}.npy")
            rec = {"frames": frames}
        else:
            np.save(folder / f"im{i}.npy", rng.integers(0, 256, (16 + 4 * (i % 3), 16 + 8 * (i % 2), 3), dtype=np.uint8))
            rec = {"image": f"im{i}.npy"}
        rec.update(task=task, prompt="what is it ?" if task == "vqa" else "a photo of", answer=" ".join(rng.choice(WORDS, 2)))
        lines.append(json.dumps(rec))
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_args(out, data, backbone, *extra):
    return [
        "--set",
        f"out={out}",
        f"backbone={backbone}",
        f"train_data={data}",
        f"eval_data={data}",
        "tasks=[caption, vqa]",
        "image_size=16",
        "patch_size=4",
        "warmup_backbone_steps=3",
        "steps=3",
        "shots=1",
        "group_size=2",
        "batch_queries=4",
        "eval_shots=[0, 1]",
        *extra,
    ]


@pytest.mark.parametrize("backbone", ["llava_next", "qwen2_vl"])
def test_cli_on_own_images_and_videos(backbone, tmp_path):
    data = write_data(tmp_path)
    with one_thread():
        main(tiny_args(tmp_path / "run", data, backbone))
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["backbone"] == backbone and res["warmup_data"] == str(data)  # the warm-up read the user's data
    assert [e["shots"] for e in res["eval"]] == [0, 1]
    assert all(set(e["per_task"]) == {"caption", "vqa"} and e["n"] == 8 for e in res["eval"])  # "other" left out
    assert res["backbone_unchanged"] and res["bank"]["entries"] > 0 and len(res["train_losses"]) == 3


def test_a_video_file_reaches_qwen2_vl_as_a_video_at_its_own_rate(tmp_path):
    """``video``: video_frames frames decoded with PyAV, their rate from the file (4 of 5 frames at 8 per
    second: 6.4 per second), so Qwen2.5-style time positions see 2 / 6.4 s per temporal patch."""
    data = write_data(tmp_path)
    cfg = AIMConfig.from_dict({"backbone": "qwen2_vl", "train_data": str(data), "image_size": 16, "patch_size": 4,
                               "video_frames": 4})  # fmt: skip
    from mmict_kernels.icl.aim.data import jsonl_data, make_tokenizer

    tok = make_tokenizer(cfg)
    d = jsonl_data(str(data), None, tok, build_backbone(cfg, len(tok)), video_frames=cfg.video_frames)
    clip = d.visuals[7]
    assert clip.kind == "video" and clip.grid_thw[0] == 2  # 4 frames, temporal patches of 2
    assert clip.second_per_grid_t == pytest.approx(2 / 6.4)
    assert d.visuals[3].kind == "video" and d.visuals[3].second_per_grid_t == pytest.approx(2 / cfg.video_fps)  # frames
    with pytest.raises(ValueError, match="video_frames: expected a positive int"):
        AIMConfig.from_dict({"video_frames": 0})


def test_own_data_errors_name_the_problem(tmp_path):
    data = write_data(tmp_path)
    with pytest.raises(SystemExit):
        main(["--set", "backbone=gpt4"])
    cfg = AIMConfig.from_dict({"backbone": "qwen2_vl", "train_data": str(data), "tasks": ["caption", "ocr"]})
    from mmict_kernels.icl.aim.data import jsonl_data, make_tokenizer

    tok = make_tokenizer(cfg)
    backbone = build_backbone(cfg, len(tok))
    with pytest.raises(ValueError, match=r"tasks: \['ocr'\] do not occur in .*data.jsonl"):
        jsonl_data(str(data), None, tok, backbone, cfg.tasks)
    bad = tmp_path / "bad.jsonl"
    np.save(tmp_path / "a.npy", np.zeros((16, 16, 3), np.uint8))
    np.save(tmp_path / "b.npy", np.zeros((16, 24, 3), np.uint8))
    bad.write_text(json.dumps({"frames": ["a.npy", "b.npy"], "prompt": "p", "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 1: frames: a video's frames must share one size"):
        jsonl_data(str(bad), None, tok, backbone)


def test_checkpoint_folder_loads_as_the_backbone(tmp_path):
    """A saved Qwen2-VL folder (weights, image processor, tokenizer): its own architecture and processor are used."""
    from mmict_kernels.icl.aim.backbones import default_processor
    from mmict_kernels.icl.aim.tiny import TinyShape, tiny_model
    from mmict_kernels.icl.tokenizer import build_word_tokenizer

    data = write_data(tmp_path)
    tok = build_word_tokenizer(WORDS + ["what", "is", "it", "?", "photo", "of"])
    model = tiny_model("qwen2_vl", len(tok), TinyShape(image_size=16, patch_size=4))
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    default_processor(model, 16).save_pretrained(folder)
    tok.save_pretrained(folder)
    cfg = AIMConfig.from_dict({"checkpoint": str(folder)})
    backbone = build_backbone(cfg, len(tok))
    assert backbone.family == "qwen2_vl" and backbone.processor.patch_size == 4
    for name, param in model.state_dict().items():
        torch.testing.assert_close(backbone.lm.state_dict()[name], param, rtol=0, atol=0)
    with pytest.raises(ValueError, match="backbone: 'llava_next' was asked for, but checkpoint .* is a 'qwen2_vl' model"):
        build_backbone(AIMConfig.from_dict({"checkpoint": str(folder), "backbone": "llava_next"}), len(tok))
    with one_thread():
        main(["--set", f"out={tmp_path / 'run'}", f"checkpoint={folder}", f"train_data={data}", f"eval_data={data}"]
             + ["steps=2", "shots=1", "group_size=2", "batch_queries=4", "eval_shots=[1]"])  # fmt: skip
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["warmup_data"] is None and res["backbone"] == "qwen2_vl"  # a checkpoint is not warmed up
