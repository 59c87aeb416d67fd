"""Train MMICT: ``python -m mmict_kernels.train --config configs/tiny.yaml``.

Multi-process: ``torchrun --nproc_per_node=N -m mmict_kernels.train --config ...`` (NCCL on GPUs,
gloo on CPU). A run resumes from its newest checkpoint in ``train.output_dir`` unless ``--no-resume``.
"""

from __future__ import annotations

import argparse
import sys

from . import backends


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m mmict_kernels.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="run config YAML (default: the built-in tiny embedded run, configs/tiny.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--backend", choices=backends.BACKEND_CHOICES, help="kernels for the M-Hub and the prefix cache")
    p.add_argument("--output-dir", help="where checkpoints and logs go (train.output_dir)")
    p.add_argument("--max-steps", type=int, help="train.max_steps")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if the output folder has checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from .icl.config import load_config
    from .icl.training import Trainer

    overrides = list(args.set)
    if args.backend:
        overrides.append(f"model.backend={args.backend}")
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.no_progress:
        overrides.append("train.progress=false")
    try:
        cfg = load_config(args.config, overrides)
        trainer = Trainer(cfg)
        losses = trainer.fit(resume=not args.no_resume)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if trainer.rank == 0:
        last = f", last loss {losses[-1]:.4f}" if losses else " (nothing left to do: already at the last step)"
        print(f"trained to step {trainer.step}/{trainer.total_steps}{last}; checkpoints in {cfg.train.output_dir}/checkpoints")
    return 0


if __name__ == "__main__":
    sys.exit(main())
