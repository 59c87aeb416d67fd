"""Where a training run's numbers go: ``metrics.jsonl``, TensorBoard and (optionally) Weights & Biases.

Rank 0 only. Each logged step is one JSON row ``{"step", "loss", "lr", "grad_norm", "samples_per_s",
"tokens_per_s"}``, each evaluation one row ``{"step", "eval": {...}}``; TensorBoard gets the same
numbers as scalars (``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/samples_per_s``,
``train/tokens_per_s``, ``eval/<metric>``) under ``<output_dir>/tensorboard``. W&B is used when
``train.wandb`` is set and the ``wandb`` package is installed (a warning otherwise), as one W&B
run per run folder: its id is kept in ``<output_dir>/wandb_run_id``, so a resumed run logs on into
the same W&B run. (Steps re-run after a kill are logged again with the values of the exact resume;
W&B keeps the first values it got for a step.)
"""

from __future__ import annotations

import json
import os
import uuid
import warnings

WANDB_ID_FILE = "wandb_run_id"


def wandb_run_id(out: str) -> str:
    """The W&B run id of run folder ``out``: made once (``wandb_run_id`` in the folder), read again on resume."""
    path = os.path.join(out, WANDB_ID_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    run_id = uuid.uuid4().hex[:12]  # W&B ids: letters and digits
    with open(path, "w", encoding="utf-8") as f:
        f.write(run_id + "\n")
    return run_id


class RunLogger:
    """``log_step(step, row)`` / ``log_eval(step, scores)`` / ``close()``; ``resumed_at``: drop TensorBoard events past it."""

    def __init__(self, out: str, *, tensorboard: bool = True, wandb: bool | str = False, config: dict | None = None,
                 resumed_at: int | None = None):  # fmt: skip
        self.path = os.path.join(out, "metrics.jsonl")
        self.tb = None
        self.wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # the tensorboard package is missing
                warnings.warn(f"train.tensorboard: TensorBoard logging is off ({exc}); pip install tensorboard", stacklevel=2)
            else:
                # purge_step: events an interrupted run wrote after its last checkpoint are hidden.
                self.tb = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=resumed_at)
        if wandb:
            try:
                import wandb as wandb_mod
            except ImportError:
                warnings.warn("train.wandb is set but the wandb package is not installed (pip install wandb); "
                              "logging to metrics.jsonl and TensorBoard only", stacklevel=2)  # fmt: skip
            else:
                project = wandb if isinstance(wandb, str) else "mmict"
                name = os.path.basename(os.path.abspath(out))
                # One W&B run per run folder: a resumed run continues it (its steps go on from the checkpoint)
                self.wandb = wandb_mod.init(project=project, name=name, id=wandb_run_id(out), dir=out,
                                            config=config or {}, resume="allow")  # fmt: skip

    def _append(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def log_step(self, step: int, row: dict) -> None:
        """``row``: loss, lr, grad_norm, samples_per_s, tokens_per_s (host floats)."""
        self._append({"step": step, **row})
        if self.tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in row.items()}, step=step)

    def log_eval(self, step: int, values: dict) -> None:
        """``values``: the headline metric and the per-task numbers (flat ``{name: float}``)."""
        self._append({"step": step, "eval": values})
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f"eval/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"eval/{k}": v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def log_event(self, step: int, event: str, **details) -> None:
        """A row for something that happened to the run (resumed, config changed, ...)."""
        self._append({"step": step, "event": event, **details})

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
