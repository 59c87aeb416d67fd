"""Train MMICT: ``python -m mmict_kernels.train --config configs/tiny.yaml``.

Multi-process: ``torchrun --nproc_per_node=N -m mmict_kernels.train --config ...`` (NCCL on GPUs,
gloo on CPU; ``--set train.fsdp=true`` shards the frozen LLM over the processes). A run resumes
from its newest readable checkpoint in ``train.output_dir`` unless ``--no-resume``; a fresh run into
a folder that holds another run needs ``--overwrite``.
"""

from __future__ import annotations

import argparse
import sys

from .cli import USER_ERRORS, add_override_arguments, config_overrides, user_error


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m mmict_kernels.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="run config YAML (default: the built-in tiny embedded run, configs/tiny.yaml)")
    add_override_arguments(p)
    p.add_argument("--output-dir", help="where checkpoints and logs go (train.output_dir)")
    p.add_argument("--max-steps", type=int, help="train.max_steps")
    p.add_argument("--no-resume", action="store_true", help="start fresh (refused if the output folder holds another run)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="remove the run already in the output folder (checkpoints, metrics, config, logs) and start fresh",
    )
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume although the config differs from the run's config.yaml (the old one is kept)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from .icl.config import load_config
    from .icl.training import Trainer

    overrides = config_overrides(
        args,
        {
            "train.output_dir": args.output_dir or None,
            "train.max_steps": args.max_steps,
            "train.progress": "false" if args.no_progress else None,
        },
    )
    try:
        cfg = load_config(args.config, overrides)
        trainer = Trainer(cfg)
        losses = trainer.fit(
            resume=not (args.no_resume or args.overwrite),
            overwrite=args.overwrite,
            allow_config_change=args.allow_config_change,
        )
    except USER_ERRORS as exc:
        return user_error(exc)
    if trainer.rank == 0:
        last = f", last loss {losses[-1]:.4f}" if losses else " (nothing left to do: already at the last step)"
        best = (
            f"; best {trainer.best['metric']} {trainer.best['value']:.2f} at step {trainer.best['step']}" if trainer.best else ""
        )
        print(
            f"trained to step {trainer.step}/{trainer.total_steps}{last}{best}; checkpoints in {cfg.train.output_dir}/checkpoints"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
