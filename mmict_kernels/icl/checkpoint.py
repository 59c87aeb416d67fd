"""Checkpoints of the trainable parts (safetensors) and the training state, written atomically.

Layout of a run folder::

    config.yaml            the run's config
    tokenizer/             the word tokenizer (embedded / tiny runs only)
    checkpoints/step-N/    trainable.safetensors   the trainable parts, whole (every strategy)
                           state.pt                step, world size, strategy, best so far; the optimizer (DDP / one process)
                           sharded/                FSDP: trainable parts and optimizer state, one shard per process
                                                   (torch.distributed.checkpoint)
                           rng-rank{r}.pt          each process's random streams
    best.json              the best checkpoint by the headline metric (eval.every_steps)
    metrics.jsonl          one row per logged step and per evaluation
    tensorboard/           the same, for TensorBoard
    eval.json              evaluate's results

A checkpoint folder is built under a temporary name and renamed into place in one step, so a
crash leaves either the previous checkpoints or a complete new one, never a half-written one.
A checkpoint that cannot be read anyway (a disk error, a truncated copy) is named with its path
and the previous valid one is used (:func:`readable_checkpoints`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import torch

_STEP_DIR = re.compile(r"^step-(\d+)$")
TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "state.pt"
SHARDED_DIR = "sharded"
BEST_FILE = "best.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names its path and why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"checkpoint {path}: {reason}")
        self.path, self.reason = path, reason


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


def atomic_torch_save(obj, path: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(obj, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------
# Listing, publishing, pruning
# ---------------------------------------------------------------------------------------
def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """Every published ``step-N`` folder that holds a trainable-parts file, oldest first: ``[(N, path)]``."""
    folder = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(folder, name, TRAINABLE_FILE)):
            found.append((int(m.group(1)), os.path.join(folder, name)))
    return sorted(found)


def step_of(path: str) -> int | None:
    m = _STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest checkpoint whose files can be read (see :func:`readable_checkpoints`), or None."""
    for path, _ in readable_checkpoints(run_dir):
        return path
    return None


def staging_dir(run_dir: str, step: int) -> str:
    """Where every rank writes its part of checkpoint ``step`` before rank 0 publishes it."""
    path = os.path.join(run_dir, "checkpoints", f".staging-step-{step}")
    os.makedirs(path, exist_ok=True)
    return path


def publish(run_dir: str, step: int, keep: int = 2, protect: tuple[int, ...] = ()) -> str:
    """Rename the staging folder to ``step-N`` (atomic) and drop all but the ``keep`` newest and the ``protect`` steps."""
    final = os.path.join(run_dir, "checkpoints", f"step-{step}")
    staging = os.path.join(run_dir, "checkpoints", f".staging-step-{step}")
    if os.path.exists(final):  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(staging, final)
    prune(run_dir, keep, protect)
    return final


def prune(run_dir: str, keep: int, protect: tuple[int, ...] = ()) -> None:
    """Remove every checkpoint but the ``keep`` newest and the steps in ``protect`` (the best one)."""
    found = list_checkpoints(run_dir)
    for step, old in found[: max(len(found) - keep, 0)]:
        if step not in protect:
            shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Reading and checking
# ---------------------------------------------------------------------------------------
def _torch_load(path: str, what: str, map_location="cpu"):
    if not os.path.isfile(path):
        raise CheckpointError(os.path.dirname(path), f"{what} is missing ({os.path.basename(path)})")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # a truncated zip, a pickle error, an I/O error: all mean "unreadable"
        raise CheckpointError(path, f"{what} cannot be read ({type(exc).__name__}: {exc})") from exc


def read_trainable(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of ``trainable.safetensors`` (or of a checkpoint folder holding it)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if os.path.isdir(path):
        path = os.path.join(path, TRAINABLE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        state = load_file(path)
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise CheckpointError(path, f"cannot be read ({type(exc).__name__}: {exc})") from exc
    return state, meta


def read_state(path: str, map_location="cpu") -> dict:
    """``state.pt`` of a checkpoint folder: step, world size, strategy, best so far, the optimizer (DDP / one process)."""
    return _torch_load(os.path.join(path, STATE_FILE), "the training state", map_location)


def read_rng(path: str, rank: int) -> dict | None:
    rng_path = os.path.join(path, f"rng-rank{rank}.pt")
    return _torch_load(rng_path, f"rank {rank}'s random state") if os.path.isfile(rng_path) else None


def readable_checkpoints(run_dir: str):
    """``(path, None)`` for each checkpoint whose small files read back, newest first, after ``(None, error)``
    for each newer one that does not (the caller warns). The tensors are read when the checkpoint is loaded."""
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            read_state(path)
            from safetensors import safe_open

            with safe_open(os.path.join(path, TRAINABLE_FILE), "pt") as f:
                f.metadata()
        except Exception as exc:
            yield None, exc if isinstance(exc, CheckpointError) else CheckpointError(path, f"cannot be read ({exc})")
            continue
        yield path, None


def check_fits(model, state: dict[str, torch.Tensor], meta: dict, path: str, llm_fingerprint: str | None = None) -> None:
    """The trainable tensors ``state`` belong to ``model``: same frozen LLM, same keys and shapes."""
    trained_with = meta.get("llm_fingerprint")
    if trained_with is not None:
        if llm_fingerprint is None:
            from .vision import fingerprint

            llm_fingerprint = fingerprint(model.llm)
        if llm_fingerprint != trained_with:
            # A frozen LLM built from a config is re-created from its seed: another seed, config or
            # torch version would silently pair the trained M-Hub with a different LLM.
            raise ValueError(
                f"checkpoint file {path} was trained with another frozen LLM (fingerprint {trained_with}, this model's "
                f"{llm_fingerprint}); use the run's config.yaml, init_seed and LLM checkpoint"
            )
    expected = model.trainable_state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint file {path} does not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    bad = [k for k in state if tuple(state[k].shape) != tuple(expected[k].shape)]
    if bad:
        raise ValueError(f"checkpoint file {path}: shapes differ from the model for {bad[:8]}")


def load_trainable(model, path: str, llm_fingerprint: str | None = None) -> None:
    """Load ``trainable.safetensors`` (or a checkpoint folder holding it) into ``model``; strict."""
    state, meta = read_trainable(path)
    check_fits(model, state, meta, path, llm_fingerprint)
    model.load_state_dict(state, strict=False)


# ---------------------------------------------------------------------------------------
# Sharded (FSDP) state through torch.distributed.checkpoint
# ---------------------------------------------------------------------------------------
def _sharded_state(model, optimizer) -> dict:
    """The trainable parameters by their own names (FusedMHub's fused q/k/v stay fused: no resharding)
    and the optimizer state, each process holding its shards (or a replicated copy)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("llm.")}
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": params, "optimizer": optimizer_state}


def save_sharded(model, optimizer, folder: str) -> None:
    """Each process writes its shards of the trainable parts and the optimizer state (collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_sharded_state(model, optimizer), checkpoint_id=folder)


def load_sharded(model, optimizer, folder: str) -> None:
    """Read :func:`save_sharded`'s folder into ``model`` and ``optimizer`` in place (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not os.path.isfile(os.path.join(folder, ".metadata")):
        raise CheckpointError(folder, "the sharded state is missing (.metadata)")
    state = _sharded_state(model, optimizer)  # the parameters' own storage: loaded in place
    try:
        dcp.load(state, checkpoint_id=folder)
    except Exception as exc:
        raise CheckpointError(folder, f"the sharded state cannot be read ({type(exc).__name__}: {exc})") from exc
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(ignore_frozen_params=True))


# ---------------------------------------------------------------------------------------
# The best checkpoint
# ---------------------------------------------------------------------------------------
def read_best(run_dir: str) -> dict | None:
    """``{"step", "metric", "value", "checkpoint"}`` of the run's best checkpoint, or None."""
    path = os.path.join(run_dir, BEST_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(path, f"the best-checkpoint record cannot be read ({exc})") from exc


def write_best(run_dir: str, best: dict | None) -> None:
    path = os.path.join(run_dir, BEST_FILE)
    if best is None:
        if os.path.exists(path):
            os.remove(path)
        return
    atomic_write_json({**best, "checkpoint": os.path.join("checkpoints", f"step-{best['step']}")}, path)
