"""End-to-end training of the MMICT driver on the embedded data, on CPU.

- the tiny run learns: the loss falls, accuracy clearly beats chance, and demonstrations help
  on the task that needs them (``what_color`` / ``what_shape`` share one prompt);
- a run interrupted and resumed from its checkpoint repeats the uninterrupted run's losses;
- (multi-process runs, DDP and FSDP, and run management: tests/icl/runs/);
- a missing or corrupt data file fails with the file's name and loses nothing already written.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

from helpers.threads import one_thread
from mmict_kernels import evaluate as evaluate_cli
from mmict_kernels import train as train_cli
from mmict_kernels.icl import checkpoint as ckpt
from mmict_kernels.icl.config import load_config
from mmict_kernels.icl.evaluation import evaluate
from mmict_kernels.icl.training import Trainer, lr_at

LEARN = [
    "data.shapes_tasks=[color,what_color,what_shape]",
    "data.shapes_train_size=300",
    "data.shapes_eval_size=90",
    "train.max_steps=150",
    "train.warmup_steps=10",
    "train.save_every=0",
    "train.progress=false",
    "model.backend=torch",
]
SHORT = [
    "data.shapes_train_size=48",
    "data.shapes_eval_size=8",
    "train.batch_size=8",
    "train.max_steps=6",
    "train.warmup_steps=2",
    "train.progress=false",
    "model.backend=torch",
    "train.log_every=1",
]


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    out = tmp_path_factory.mktemp("learn")
    with one_thread():
        trainer = Trainer(load_config(None, LEARN + [f"train.output_dir={out}"]))
        losses = trainer.fit(resume=False)
        results = evaluate(trainer.run, demo_counts=(0, 2), max_new_tokens=3, batch_size=90, print_table=False)
    return losses, {k: v["scores"] for k, v in results["by_num_demos"].items()}, out


def test_loss_falls(learned):
    losses, _, _ = learned
    first, last = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    assert last < 0.4 * first, (first, last)


def test_accuracy_beats_chance(learned):
    _, scores, _ = learned
    # 5 colours: chance is 20%.
    assert scores["2"]["color"]["exact_match"] >= 60, scores["2"]["color"]


def test_demonstrations_help_where_the_task_needs_them(learned):
    _, scores, _ = learned
    with_demos = (scores["2"]["what_color"]["exact_match"] + scores["2"]["what_shape"]["exact_match"]) / 2
    without = (scores["0"]["what_color"]["exact_match"] + scores["0"]["what_shape"]["exact_match"]) / 2
    assert with_demos >= without + 20, (with_demos, without)


def test_evaluate_cli_writes_json(learned, capsys):
    _, _, out = learned
    assert evaluate_cli.main(["--run", str(out), "--demos", "2", "--limit", "8"]) == 0
    printed = capsys.readouterr().out
    assert "exact" in printed and os.path.isfile(os.path.join(out, "eval.json"))
    # A fresh process, one-to-many: generation on the shared prefix is the first use of the prefix cache.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "mmict_kernels.evaluate",
        "--run",
        str(out),
        "--sampling",
        "one-to-many",
        "--demos",
        "2",
        "--limit",
        "2",
        "--output",
        str(out / "o2m.json"),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "one-to-many" in done.stdout and os.path.isfile(out / "o2m.json")
    # Another seed re-creates another random frozen LLM: the checkpoint refuses to pair with it.
    assert evaluate_cli.main(["--run", str(out), "--set", "model.init_seed=7", "--limit", "1"]) == 2
    assert "another frozen LLM" in capsys.readouterr().err


# ------------------------------------------------------------------ resume
def test_resume_reproduces_the_uninterrupted_losses(tmp_path):
    # M-Hub dropout on: the resumed run must also restore the random streams.
    extra = SHORT + ['model.mhub_config={"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}']
    full = Trainer(load_config(None, extra + [f"train.output_dir={tmp_path / 'full'}"])).fit(resume=False)
    cfg = load_config(None, extra + [f"train.output_dir={tmp_path / 'cut'}"])
    first = Trainer(cfg).fit(resume=False, stop_after=3)
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path / "cut"))] == [3]
    rest = Trainer(cfg).fit(resume=True)
    assert first + rest == full  # bitwise: same batches, demonstrations, RNG and optimizer state
    a = ckpt.latest_checkpoint(str(tmp_path / "full"))
    b = ckpt.latest_checkpoint(str(tmp_path / "cut"))
    from safetensors.torch import load_file

    wa, wb = load_file(os.path.join(a, "trainable.safetensors")), load_file(os.path.join(b, "trainable.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not any(k.startswith("llm.") for k in wa)  # only the trainable parts are saved


def test_prefetched_batches_train_identically(tmp_path):
    """The GPU path builds the next batch on a thread: same batches, same losses."""
    plain = Trainer(load_config(None, SHORT + [f"train.output_dir={tmp_path / 'a'}"])).fit(resume=False)
    trainer = Trainer(load_config(None, SHORT + [f"train.output_dir={tmp_path / 'b'}"]))
    trainer.prefetch = True
    assert trainer.fit(resume=False) == plain


def test_one_to_many_training_with_the_prefix_cache_equals_without(tmp_path):
    base = SHORT + ["demos.sampling=one-to-many", "demos.group_size=4", "train.max_steps=3"]
    with_cache = Trainer(load_config(None, base + [f"train.output_dir={tmp_path / 'a'}"]))
    assert with_cache.builder.shared_prefix
    without = Trainer(load_config(None, base + ["model.use_prefix_cache=false", f"train.output_dir={tmp_path / 'b'}"]))
    assert not without.builder.shared_prefix
    torch.testing.assert_close(
        torch.tensor(with_cache.fit(resume=False)), torch.tensor(without.fit(resume=False)), rtol=1e-5, atol=1e-6
    )


def test_similar_sampling_trains(tmp_path):
    losses = Trainer(load_config(None, SHORT + ["demos.sampling=similar", f"train.output_dir={tmp_path}"])).fit(resume=False)
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))


# ------------------------------------------------------------------ bad data
def test_bad_data_file_is_named_and_nothing_written_is_lost(tmp_path, capsys):
    out = tmp_path / "run"
    Trainer(load_config(None, SHORT + ["train.max_steps=2", f"train.output_dir={out}"])).fit(resume=False)
    saved = ckpt.latest_checkpoint(str(out))
    before = {f: open(os.path.join(saved, f), "rb").read() for f in os.listdir(saved)}

    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        Trainer(load_config(None, SHORT + [f"data.train={missing}", f"train.output_dir={out}"]))
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_bytes(b'{"image": "a.npy", "prompt": "p", "answer": "a"}\n\xff\xfe{broken')
    code = train_cli.main(["--set", f"data.train={corrupt}", "--output-dir", str(out), "--no-progress"])
    assert code == 2 and "corrupt.jsonl" in capsys.readouterr().err
    assert ckpt.latest_checkpoint(str(out)) == saved
    assert {f: open(os.path.join(saved, f), "rb").read() for f in os.listdir(saved)} == before


def test_lr_schedule_per_step_and_per_epoch_as_lavis():
    """``epoch``: LAVIS's LinearWarmupCosineLRScheduler (warm-up by step in epoch 0, one cosine value per epoch)."""
    cfg = load_config(
        None,
        [
            "train.lr=1e-3",
            "train.warmup_start_lr=1e-6",
            "train.warmup_steps=4",
            "train.min_lr=1e-5",
            "train.lr_schedule_unit=epoch",
        ],
    ).train
    per_epoch, total = 10, 50  # 5 epochs
    lavis = []  # LAVIS's formulas, written out
    for step in range(total):
        epoch = step // per_epoch
        if epoch == 0:
            lavis.append(min(1e-3, 1e-6 + (1e-3 - 1e-6) * step / 4))
        else:
            lavis.append((1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * epoch / 5)) + 1e-5)
    ours = [lr_at(s, total, cfg, per_epoch) for s in range(total)]
    assert ours == pytest.approx(lavis, rel=1e-12)
    assert len(set(ours[10:20])) == 1 and ours[9] == 1e-3  # constant within an epoch; epoch 0 ends at the peak
    with pytest.raises(ValueError, match="steps_per_epoch"):
        lr_at(12, total, cfg)
    cfg.lr_schedule_unit = "step"
    step_lrs = [lr_at(s, total, cfg) for s in range(total)]
    assert step_lrs[4] == pytest.approx(1e-3) and len(set(step_lrs[10:20])) == 10  # decays every step
    with pytest.raises(ValueError, match="lr_schedule_unit"):
        load_config(None, ["train.lr_schedule_unit=iteration"])


def test_trainer_applies_the_epoch_schedule(tmp_path):
    trainer = Trainer(
        load_config(
            None,
            SHORT + ["train.lr_schedule_unit=epoch", "train.max_steps=null", "train.epochs=2", f"train.output_dir={tmp_path}"],
        )
    )
    spe = trainer.steps_per_epoch
    assert trainer.total_steps == 2 * spe
    assert trainer.lr(spe) == pytest.approx(
        trainer.cfg.train.min_lr + 0.5 * (trainer.cfg.train.lr - trainer.cfg.train.min_lr) * (1 + math.cos(math.pi / 2))
    )
    trainer.train_step(spe - 1)
    assert trainer.last_lr == trainer.lr(spe - 1)
