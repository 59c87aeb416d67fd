"""Runs never lose work: what a training run may do to its folder, and what evaluate loads.

- a fresh run (``--no-resume``) into a folder holding another run is refused; ``--overwrite``
  removes that run first (the scenario of the issue: an old run's step-10/step-12 and a new
  3-step run);
- ``train.keep_checkpoints`` keeps the newest N and always the best one;
- evaluation during training (``eval.every_steps``) records the best checkpoint, which
  ``evaluate --run`` loads (and says so) unless ``--checkpoint`` names another;
- a resume with a changed config is refused, naming the changed keys, unless allowed;
- a corrupt or truncated latest checkpoint is named and the previous valid one is used, and the
  resumed run still repeats the uninterrupted losses;
- rows logged after the last checkpoint of an interrupted run are dropped on resume;
- evaluation writes each demonstration count as it finishes: a failure at 2 keeps the 0 results.
"""

import json
import os
import shutil

import pytest
import yaml

from mmict_kernels import evaluate as evaluate_cli
from mmict_kernels import train as train_cli
from mmict_kernels.icl import checkpoint as ckpt
from mmict_kernels.icl.build import build_run
from mmict_kernels.icl.config import load_config
from mmict_kernels.icl.evaluation import evaluate
from mmict_kernels.icl.run_dir import RunFolderError
from mmict_kernels.icl.training import Trainer


def steps_in(out) -> list[int]:
    return [s for s, _ in ckpt.list_checkpoints(str(out))]


def metric_rows(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def cli_sets(overrides) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


# ------------------------------------------------------------------ fresh runs
def test_no_resume_into_another_run_is_refused_and_overwrite_replaces_it(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    # The earlier run: checkpoints step-10 and step-12, 12 metric rows, its config.
    old = tiny(out, "train.max_steps=12", "train.save_every=10")
    assert train_cli.main(cli_sets(old)) == 0
    assert steps_in(out) == [10, 12]
    before = {p: open(os.path.join(out, p), "rb").read() for p in ("metrics.jsonl", "config.yaml")}

    new = tiny(out, "train.max_steps=3", "train.lr=1e-3")
    assert train_cli.main([*cli_sets(new), "--no-resume"]) == 2
    err = capsys.readouterr().err
    assert "holds another run" in err and "checkpoints/step-10" in err and "--overwrite" in err
    assert steps_in(out) == [10, 12]  # nothing deleted, nothing mixed
    assert {p: open(os.path.join(out, p), "rb").read() for p in before} == before

    assert train_cli.main([*cli_sets(new), "--no-resume", "--overwrite"]) == 0
    assert "removed the earlier run" in capsys.readouterr().out
    assert steps_in(out) == [3]  # only the new run's checkpoint: the old step-12 cannot shadow it
    assert [r["step"] for r in metric_rows(out) if "loss" in r] == [1, 2, 3]
    with open(out / "config.yaml", encoding="utf-8") as f:
        saved = yaml.safe_load(f)
    assert saved["train"]["max_steps"] == 3 and saved["train"]["lr"] == 1e-3
    assert evaluate_cli.main(["--run", str(out), "--demos", "0", "--limit", "2"]) == 0
    assert f"{out}/checkpoints/step-3 (newest" in capsys.readouterr().out


def test_keep_checkpoints_keeps_the_newest_and_the_best(tmp_path, tiny):
    out = tmp_path / "run"
    cfg = load_config(None, tiny(out, "train.max_steps=8", "train.save_every=1", "train.keep_checkpoints=2",
                                 "eval.every_steps=2", "eval.limit=6"))  # fmt: skip
    trainer = Trainer(cfg)
    trainer.fit(resume=False)
    evals = [r for r in metric_rows(out) if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4, 6, 8]
    best = ckpt.read_best(str(out))
    values = [r["eval"][best["metric"]] for r in evals]  # the headline metric (exact match on the embedded data)
    best_step = evals[values.index(max(values))]["step"]  # the first of equal values stays the best
    assert best["step"] == best_step and best["value"] == max(values)
    assert best == {**trainer.best, "checkpoint": f"checkpoints/step-{best_step}"}
    assert best_step < 7  # (the first evaluation, here): kept although older than the newest two
    assert steps_in(out) == sorted({7, 8, best_step})


def test_evaluate_loads_the_best_checkpoint_unless_one_is_named(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    # lr 0 after a few steps would keep later evaluations equal: the best is then the first evaluated.
    Trainer(load_config(None, tiny(out, "train.max_steps=6", "eval.every_steps=3", "eval.limit=4"))).fit(resume=False)
    best = ckpt.read_best(str(out))
    capsys.readouterr()
    assert evaluate_cli.main(["--run", str(out), "--demos", "0", "--limit", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"checkpoint: {out}/checkpoints/step-{best['step']} (best: {best['metric']} {best['value']:.2f}" in printed
    other = ckpt.latest_checkpoint(str(out))
    assert evaluate_cli.main(["--run", str(out), "--checkpoint", other, "--demos", "0", "--limit", "2"]) == 0
    assert f"checkpoint: {other} (--checkpoint)" in capsys.readouterr().out


# ------------------------------------------------------------------ resume
def test_resume_with_a_changed_config_is_refused_naming_the_keys(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    Trainer(load_config(None, tiny(out))).fit(resume=False, stop_after=2)
    changed = tiny(out, "train.lr=0.5", "train.batch_size=4")
    with pytest.raises(RunFolderError, match=r"train.batch_size: 8 -> 4.*train.lr: 0.005 -> 0.5"):
        Trainer(load_config(None, changed)).fit(resume=True)
    assert steps_in(out) == [2]
    # The CLI says the same, with exit status 2, and resumes when allowed (keeping the old config).
    assert train_cli.main(cli_sets(changed)) == 2
    assert "--allow-config-change" in capsys.readouterr().err
    # Keys that only change how the run is watched are not changes.
    trainer = Trainer(load_config(None, tiny(out, "train.log_every=2", "train.progress=true")))
    assert trainer.fit(resume=True, stop_after=3)
    with pytest.warns(UserWarning, match="changed config"):
        trainer = Trainer(load_config(None, changed))
        trainer.fit(resume=True, allow_config_change=True)
    assert trainer.step == trainer.total_steps
    assert os.path.isfile(out / "config-before-step-3.yaml")


def test_corrupt_latest_checkpoint_is_named_and_the_previous_one_used(tmp_path, tiny):
    full = Trainer(load_config(None, tiny(tmp_path / "full", "train.max_steps=6"))).fit(resume=False)
    out = tmp_path / "cut"
    cfg = load_config(None, tiny(out, "train.max_steps=6", "train.save_every=2"))
    Trainer(cfg).fit(resume=False, stop_after=4)
    assert steps_in(out) == [2, 4]
    state = out / "checkpoints" / "step-4" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # a truncated copy
    with pytest.warns(
        RuntimeWarning,
        match=rf"checkpoint {out}/checkpoints/step-4 .*cannot be read.*previous valid checkpoint {out}/checkpoints/step-2",
    ):
        trainer = Trainer(cfg)
        rest = trainer.fit(resume=True)
    assert rest == full[2:]  # resumed exactly from step 2
    assert [r["step"] for r in metric_rows(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]  # steps 3-4 logged once

    # A truncated weights file: same fallback; nothing readable at all: an error naming every checkpoint.
    for step in (2, 4, 6):
        weights = out / "checkpoints" / f"step-{step}" / "trainable.safetensors"
        if weights.exists():
            weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match=r"no checkpoint can be read.*step-6.*step-4"):
        Trainer(cfg).fit(resume=True)
    assert evaluate_cli.main(["--run", str(out), "--checkpoint", str(out / "checkpoints" / "step-6")]) == 2


def test_rows_logged_after_the_last_checkpoint_are_dropped_on_resume(tmp_path, tiny):
    out = tmp_path / "run"
    cfg = load_config(None, tiny(out, "train.max_steps=6", "train.save_every=4"))
    Trainer(cfg).fit(resume=False)
    shutil.rmtree(out / "checkpoints" / "step-6")  # as if the run had died before its last save
    Trainer(cfg).fit(resume=True)
    rows = metric_rows(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r for r in rows if r.get("event") == "resumed"] == [{"step": 4, "event": "resumed"}]


# ------------------------------------------------------------------ evaluation
def test_evaluation_keeps_finished_demo_counts_when_a_later_one_fails(tmp_path, tiny, capsys):
    # An OPT with 24 positions: the queries alone fit, with 2 demonstrations they do not.
    cfg = load_config(None, tiny(tmp_path, "model.llm_type=opt", 'model.llm_config={"max_position_embeddings": 24}'))
    run = build_run(cfg)
    output = tmp_path / "eval.json"
    with pytest.raises(IndexError):
        evaluate(run, demo_counts=(0, 2), output=str(output), max_new_tokens=2, batch_size=6, limit=6)
    captured = capsys.readouterr()
    assert "    0  all" in captured.out  # the finished 0-demonstration table was printed
    assert "evaluation with 2 demonstrations failed; finished demo counts: 0" in captured.err
    results = json.loads(output.read_text())
    assert list(results["by_num_demos"]) == ["0"] and results["by_num_demos"]["0"]["scores"]["all"]["n"] == 6
    assert results["failed"]["num_demos"] == 2 and "IndexError" in results["failed"]["error"]
