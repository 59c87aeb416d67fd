"""Evaluate MMICT: ``python -m mmict_kernels.evaluate --run runs/tiny``.

Generates answers for the evaluation set with each number of demonstrations (``--demos 0 2 4``),
prints exact match / VQA accuracy / BLEU-4 per task, and writes JSON (default ``<run>/eval.json``).
"""

from __future__ import annotations

import argparse
import os
import sys

from .cli import USER_ERRORS, add_override_arguments, config_overrides, user_error
from .icl.sampling import STRATEGIES


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m mmict_kernels.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--run", help="a training output folder (its config.yaml, tokenizer and newest checkpoint are used)")
    p.add_argument("--config", help="config YAML (default: <run>/config.yaml)")
    p.add_argument(
        "--checkpoint", help="trainable.safetensors or a checkpoint folder (default: newest in <run>); 'none': untrained"
    )
    add_override_arguments(p)
    p.add_argument("--demos", type=int, nargs="+", help="numbers of demonstrations to evaluate with (eval.demo_counts)")
    p.add_argument("--sampling", choices=STRATEGIES, help="demos.sampling")
    p.add_argument("--output", help="JSON results path (default <run>/eval.json)")
    p.add_argument("--limit", type=int, help="evaluate only the first N query groups")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from .icl import checkpoint as ckpt
    from .icl.build import build_run
    from .icl.config import load_config
    from .icl.evaluation import evaluate

    overrides = config_overrides(args, {"demos.sampling": args.sampling or None})
    config_path = args.config or (os.path.join(args.run, "config.yaml") if args.run else None)
    try:
        if args.run and not os.path.isdir(args.run):
            raise FileNotFoundError(f"run folder not found: {args.run}")
        cfg = load_config(config_path, overrides)
        device = (
            torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else torch.device(args.device)
        )
        tokenizer_dir = os.path.join(args.run, "tokenizer") if args.run else None
        run = build_run(cfg, device=device, tokenizer_dir=tokenizer_dir)
        path = args.checkpoint or (ckpt.latest_checkpoint(args.run) if args.run else None)
        if path and path != "none":
            ckpt.load_trainable(run.model, path)
            print(f"loaded {path}")
        else:
            print("no checkpoint: evaluating the untrained model")
        e = cfg.eval
        output = args.output or e.output or (os.path.join(args.run, "eval.json") if args.run else None)
        evaluate(
            run,
            demo_counts=tuple(args.demos if args.demos is not None else e.demo_counts),
            sampling=cfg.demos.sampling,
            output=output,
            group_size=cfg.demos.group_size,
            batch_size=e.batch_size,
            num_beams=e.num_beams,
            max_new_tokens=e.max_new_tokens,
            min_new_tokens=e.min_new_tokens,
            generation_lengths=e.generation_lengths,
            seed=cfg.data.seed,
            device=device,
            use_prefix_cache=cfg.model.use_prefix_cache,
            limit=args.limit,
        )
    except USER_ERRORS as exc:
        return user_error(exc)
    if output:
        print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
