"""The learning-rate schedule of every optimiser the driver runs: linear warm-up, then cosine decay.

One definition for the driver's ``Trainer`` (and so the paper's comparison, which trains through
it) and for AIM's own run; they differ only in where the warm-up starts counting (``warmup_offset``).
"""

from __future__ import annotations

import math


def lr_at(step: int, total: int, cfg, steps_per_epoch: int | None = None, *, warmup_offset: int = 0) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``total``.

    ``cfg`` gives ``lr`` and ``warmup_steps`` and, where it has them (the driver's ``TrainConfig``),
    ``warmup_start_lr``, ``min_lr`` and ``lr_schedule_unit``; without them: 0, 0 and "step".

    ``lr_schedule_unit == "step"``: linear warm-up from ``warmup_start_lr`` to ``lr`` over
    ``warmup_steps``, then cosine to ``min_lr`` at ``total``, updated every step.
    ``"epoch"`` (LAVIS's ``LinearWarmupCosineLRScheduler``, which the official config uses): in the
    first epoch the same per-step warm-up, capped at ``lr``; from epoch e >= 1 on, the constant
    ``min_lr + (lr - min_lr) * (1 + cos(pi * e / epochs)) / 2``, with ``epochs`` the run's epochs
    rounded up. Needs ``steps_per_epoch``.

    ``warmup_offset``: the warm-up counts step s as s + warmup_offset. 0 (the driver, as LAVIS):
    step 0 runs at ``warmup_start_lr`` and step ``warmup_steps`` reaches ``lr``. 1 (AIM's run):
    step 0 already runs at ``lr / warmup_steps`` and step ``warmup_steps - 1`` reaches ``lr``.
    """
    lr, warmup_steps = cfg.lr, cfg.warmup_steps
    start_lr, min_lr = getattr(cfg, "warmup_start_lr", 0.0), getattr(cfg, "min_lr", 0.0)
    warm_step = step + warmup_offset
    if getattr(cfg, "lr_schedule_unit", "step") == "epoch":
        if not steps_per_epoch or steps_per_epoch < 1:
            raise ValueError(
                f"steps_per_epoch: lr_schedule_unit 'epoch' needs a positive steps_per_epoch, got {steps_per_epoch!r}"
            )
        epoch = step // steps_per_epoch
        if epoch == 0:
            warm = start_lr + (lr - start_lr) * warm_step / max(warmup_steps, 1)
            return min(lr, warm)
        epochs = max(math.ceil(total / steps_per_epoch), 1)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(epoch / epochs, 1.0)))
    if step < warmup_steps:
        return start_lr + (lr - start_lr) * warm_step / warmup_steps
    span = max(total - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
