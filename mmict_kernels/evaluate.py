"""Evaluate MMICT: ``python -m mmict_kernels.evaluate --run runs/tiny``.

Generates answers for the evaluation set with each number of demonstrations (``--demos 0 2 4``),
prints exact match / VQA accuracy / CIDEr per task, and writes JSON (default ``<run>/eval.json``)
after each number of demonstrations. ``--run`` loads the run's best checkpoint (by the headline
metric of the evaluations during training), else its newest readable one, unless ``--checkpoint``
names one; it prints which. Under ``torchrun`` every process generates a share of the queries
(``train.fsdp``: the frozen LLM sharded over them) and rank 0 scores and writes.
"""

from __future__ import annotations

import argparse
import os
import sys

from .cli import USER_ERRORS, add_override_arguments, config_overrides, user_error
from .icl.sampling import STRATEGIES


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m mmict_kernels.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--run", help="a training output folder (its config.yaml, tokenizer and best or newest checkpoint)")
    p.add_argument("--config", help="config YAML (default: <run>/config.yaml)")
    p.add_argument(
        "--checkpoint",
        help="trainable.safetensors or a checkpoint folder (default: the run's best, else its newest); 'none': untrained",
    )
    add_override_arguments(p)
    p.add_argument("--demos", type=int, nargs="+", help="numbers of demonstrations to evaluate with (eval.demo_counts)")
    p.add_argument("--sampling", choices=STRATEGIES, help="demos.sampling")
    p.add_argument("--output", help="JSON results path (default <run>/eval.json)")
    p.add_argument("--limit", type=int, help="evaluate only the first N query groups (eval.limit)")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def choose_checkpoint(run_dir: str | None, requested: str | None) -> tuple[str | None, str]:
    """(checkpoint path or None, a line saying which and why)."""
    from .icl import checkpoint as ckpt

    if requested == "none":
        return None, "checkpoint: none (--checkpoint none): evaluating the untrained model"
    if requested:
        return requested, f"checkpoint: {requested} (--checkpoint)"
    if not run_dir:
        return None, "checkpoint: none (no --run or --checkpoint): evaluating the untrained model"
    best = ckpt.read_best(run_dir)
    if best is not None:
        path = os.path.join(run_dir, best["checkpoint"])
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{run_dir}/{ckpt.BEST_FILE} names {path}, which is missing; pass --checkpoint")
        return path, f"checkpoint: {path} (best: {best['metric']} {best['value']:.2f} at step {best['step']})"
    path = ckpt.latest_checkpoint(run_dir)
    if path is None:
        return None, f"checkpoint: none ({run_dir} holds no readable checkpoint): evaluating the untrained model"
    return path, f"checkpoint: {path} (newest; no best recorded: the run did not evaluate during training)"


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from .icl import checkpoint as ckpt
    from .icl.build import build_run
    from .icl.config import load_config
    from .icl.distributed import barrier, init_distributed, pick_device, shard_model
    from .icl.evaluation import evaluate
    from .icl.precision import MixedPrecision

    overrides = config_overrides(args, {"demos.sampling": args.sampling or None, "eval.limit": args.limit})
    config_path = args.config or (os.path.join(args.run, "config.yaml") if args.run else None)
    try:
        if args.run and not os.path.isdir(args.run):
            raise FileNotFoundError(f"run folder not found: {args.run}")
        cfg = load_config(config_path, overrides)
        rank, world, local_rank = init_distributed()
        device = pick_device(args.device, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        tokenizer_dir = os.path.join(args.run, "tokenizer") if args.run else None
        if rank != 0:
            barrier()  # rank 0 builds first (the image-feature cache)
        run = build_run(cfg, device=device, tokenizer_dir=tokenizer_dir)
        if rank == 0:
            barrier()
        path, which = choose_checkpoint(args.run, args.checkpoint)
        if rank == 0:
            print(which, flush=True)
        if path:
            ckpt.load_trainable(run.model, path)
        if cfg.train.fsdp and world > 1:
            shard_model(run.model, param_dtype=MixedPrecision(cfg.train.precision, device).dtype)
        e = cfg.eval
        output = args.output or e.output or (os.path.join(args.run, "eval.json") if args.run else None)
        evaluate(
            run,
            demo_counts=tuple(args.demos if args.demos is not None else e.demo_counts),
            sampling=cfg.demos.sampling,
            output=output,
            print_table=rank == 0,
            group_size=cfg.demos.group_size,
            batch_size=e.batch_size,
            num_beams=e.num_beams,
            max_new_tokens=e.max_new_tokens,
            min_new_tokens=e.min_new_tokens,
            generation_lengths=e.generation_lengths,
            seed=cfg.data.seed,
            device=device,
            use_prefix_cache=cfg.model.use_prefix_cache,
            limit=e.limit,
        )
    except USER_ERRORS as exc:
        return user_error(exc)
    if output and rank == 0:
        print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
