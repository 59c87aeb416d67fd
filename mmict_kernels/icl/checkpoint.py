"""Checkpoints of the trainable parts (safetensors) and the training state, written atomically.

Layout of a run folder::

    config.yaml            the run's config
    tokenizer/             the word tokenizer (embedded / tiny runs only)
    checkpoints/step-N/    trainable.safetensors, state.pt (optimizer, step), rng-rank{r}.pt
    metrics.jsonl          one row per logged step
    eval.json              evaluate's results

A checkpoint folder is built under a temporary name and renamed into place in one step, so a
crash leaves either the previous checkpoints or a complete new one, never a half-written one.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile

import torch

_STEP_DIR = re.compile(r"^step-(\d+)$")


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    folder = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(folder, name, "trainable.safetensors")):
            found.append((int(m.group(1)), os.path.join(folder, name)))
    return sorted(found)


def latest_checkpoint(run_dir: str) -> str | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def staging_dir(run_dir: str, step: int) -> str:
    """Where every rank writes its part of checkpoint ``step`` before rank 0 publishes it."""
    path = os.path.join(run_dir, "checkpoints", f".staging-step-{step}")
    os.makedirs(path, exist_ok=True)
    return path


def publish(run_dir: str, step: int, keep: int = 2) -> str:
    """Rename the staging folder to ``step-N`` (atomic) and drop all but the ``keep`` newest."""
    final = os.path.join(run_dir, "checkpoints", f"step-{step}")
    staging = os.path.join(run_dir, "checkpoints", f".staging-step-{step}")
    if os.path.exists(final):  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(staging, final)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def atomic_torch_save(obj, path: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_trainable(model, path: str) -> None:
    """Load ``trainable.safetensors`` (or a checkpoint folder holding it) into ``model``; strict."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if os.path.isdir(path):
        path = os.path.join(path, "trainable.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        state = load_file(path)
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise ValueError(f"checkpoint file {path} cannot be read: {exc}") from exc
    trained_with = meta.get("llm_fingerprint")
    if trained_with is not None:
        from .vision import fingerprint

        now = fingerprint(model.llm)
        if now != trained_with:
            # A frozen LLM built from a config is re-created from its seed: another seed, config or
            # torch version would silently pair the trained M-Hub with a different LLM.
            raise ValueError(
                f"checkpoint file {path} was trained with another frozen LLM (fingerprint {trained_with}, this model's {now}); "
                "use the run's config.yaml, init_seed and LLM checkpoint"
            )
    expected = model.trainable_state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint file {path} does not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    bad = [k for k in state if tuple(state[k].shape) != tuple(expected[k].shape)]
    if bad:
        raise ValueError(f"checkpoint file {path}: shapes differ from the model for {bad[:8]}")
    model.load_state_dict(state, strict=False)
