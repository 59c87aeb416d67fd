"""Run management: what a training run may do to the folder it writes (``train.output_dir``).

- A fresh run (``--no-resume``) into a folder that holds another run's checkpoints or metrics is
  refused; ``--overwrite`` removes that run (checkpoints, metrics, config, ...) first. Nothing
  else in the folder is touched.
- A resumed run whose config differs from the one it resumes is refused, listing the changed
  keys, unless ``--allow-config-change`` (the old config is kept as ``config-before-step-N.yaml``).
- On resume, rows that the interrupted run logged after its last checkpoint are dropped from
  ``metrics.jsonl``, so the file describes one run, step by step.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

import yaml

from .checkpoint import BEST_FILE
from .config import RunConfig, config_from_dict
from .run_logging import WANDB_ID_FILE

# What a training run writes into its folder (and --overwrite removes).
RUN_FILES = ("config.yaml", "metrics.jsonl", BEST_FILE, "eval.json", WANDB_ID_FILE)
RUN_FOLDERS = ("checkpoints", "tensorboard", "tokenizer", "wandb")
# Keys that change how a run is watched or where it reads things, not what it computes.
RESUME_INDEPENDENT_KEYS = frozenset(
    {
        "train.output_dir",
        "train.progress",
        "train.log_every",
        "train.tensorboard",
        "train.wandb",
        "model.backend",
        "data.feature_cache",
        "eval.output",
        "eval.batch_size",
    }
)


class RunFolderError(ValueError):
    """The folder holds another run, or the config changed on resume; the message says what to do."""


def holds_run(out: str) -> list[str]:
    """What in ``out`` belongs to an earlier run that a fresh one would lose or mix with: checkpoints, metrics."""
    found = []
    ckpt_dir = os.path.join(out, "checkpoints")
    if os.path.isdir(ckpt_dir):
        steps = sorted(n for n in os.listdir(ckpt_dir) if n.startswith("step-"))
        found += [f"checkpoints/{n}" for n in steps]
    if os.path.isfile(os.path.join(out, "metrics.jsonl")) and os.path.getsize(os.path.join(out, "metrics.jsonl")) > 0:
        found.append("metrics.jsonl")
    return found


def remove_run(out: str) -> list[str]:
    """Remove the run files and folders of ``out`` (and ``config-before-step-*.yaml``); returns what was removed."""
    removed = []
    if not os.path.isdir(out):
        return removed
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        is_old_config = name.startswith("config-before-step-") and name.endswith(".yaml")
        if name in RUN_FILES or is_old_config:
            os.remove(path)
            removed.append(name)
        elif name in RUN_FOLDERS and os.path.isdir(path):
            shutil.rmtree(path)
            removed.append(name + "/")
    return removed


def refuse_fresh_run(out: str) -> None:
    """A fresh run must not mix with or delete another run's work."""
    found = holds_run(out)
    if found:
        shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
        raise RunFolderError(
            f"train.output_dir {out} holds another run ({shown}); a fresh run (--no-resume) would mix with it and delete "
            "its checkpoints. Pass --overwrite to remove that run first, resume it (without --no-resume), "
            "or choose another train.output_dir"
        )


# ---------------------------------------------------------------------------------------
# Config changes between a run and its resume
# ---------------------------------------------------------------------------------------
def _flatten(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ("vision_config", "mhub_config", "llm_config", "generation_lengths"):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _normalised(values: dict) -> dict:
    """A config mapping as the current reader understands it (older spellings read, defaults filled), flattened."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # an older spelling was already reported when that run started
            values = config_from_dict(values).to_dict()
    except ValueError:
        pass  # a config of an older version this reader refuses: compare it as written
    return _flatten(json.loads(json.dumps(values, default=list)))


def saved_config(out: str) -> dict | None:
    path = os.path.join(out, "config.yaml")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def changed_keys(old: dict, cfg: RunConfig) -> dict[str, tuple]:
    """``{key: (old value, new value)}`` for every key that changes what the run computes."""
    before, after = _normalised(old), _normalised(cfg.to_dict())
    keys = sorted((set(before) | set(after)) - RESUME_INDEPENDENT_KEYS)
    return {k: (before.get(k), after.get(k)) for k in keys if before.get(k) != after.get(k)}


def check_config_change(out: str, cfg: RunConfig, step: int, allow: bool) -> dict[str, tuple]:
    """Refuse to resume ``out`` at ``step`` with a changed config unless ``allow``; returns the changes."""
    old = saved_config(out)
    if old is None:
        return {}
    changes = changed_keys(old, cfg)
    if changes and not allow:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in changes.items()))
        raise RunFolderError(
            f"train.output_dir {out}: resuming at step {step} with a changed config ({listed}). Pass "
            "--allow-config-change to resume anyway (the old config is kept), or --no-resume --overwrite to start over"
        )
    if changes:
        shutil.copyfile(os.path.join(out, "config.yaml"), os.path.join(out, f"config-before-step-{step}.yaml"))
    return changes


def write_config(out: str, cfg: RunConfig) -> None:
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, "config.yaml.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(json.loads(json.dumps(cfg.to_dict(), default=list)), f, sort_keys=False)
    os.replace(tmp, os.path.join(out, "config.yaml"))


# ---------------------------------------------------------------------------------------
# metrics.jsonl
# ---------------------------------------------------------------------------------------
def truncate_metrics(out: str, step: int) -> int:
    """Drop the rows logged after ``step`` (an interrupted run's steps past its last checkpoint); returns how many."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:  # a line cut by the interruption
                dropped += 1
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped
