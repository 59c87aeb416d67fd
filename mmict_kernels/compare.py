"""The paper's comparison on the embedded data, in one command.

    python -m mmict_kernels.compare --config configs/compare_shapes.yaml

VanillaFine-Tune (the query alone), Vanilla ICT (raw demonstrations), MMICT (the driver's
default) and AIM (frozen MMICT backbone + trained projection) with the same model sizes, data,
optimiser and step budget, for each sampling strategy (random, similar, one-to-many) and number
of demonstrations. One table on screen, the same rows in ``<out>.json`` and ``<out>.csv``.
See docs/COMPARE.md for the protocol and what each column measures; the engine is ``icl/comparison/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .cli import USER_ERRORS, add_override_arguments, user_error
from .icl.baselines import METHODS
from .icl.comparison import SAMPLINGS, format_markdown, format_table, load_compare_config, run_comparison, write_results


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m mmict_kernels.compare", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="comparison YAML (configs/compare_shapes.yaml); flags override it")
    p.add_argument("--run-config", help="the driver run config the methods share (default: the built-in tiny run)")
    add_override_arguments(p, backend=False, set_help="driver config override (repeatable)")
    p.add_argument("--methods", type=_names, help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--sampling", type=_names, help=f"comma-separated subset of {','.join(SAMPLINGS)}")
    p.add_argument("--demos", type=_ints, help="demonstration counts to evaluate, e.g. 0,1,2,4,8")
    p.add_argument("--train-demos", type=int, help="demonstrations per query in training")
    p.add_argument("--per-count", action="store_true", default=None, help="train one model per demonstration count")
    p.add_argument("--steps", type=int, help="optimizer steps per model (the same for every method)")
    p.add_argument("--timing-steps", type=int, help="steps of each timing run (first one not counted)")
    p.add_argument("--eval-limit", type=int, help="evaluate at most this many query groups")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is as fast for the tiny models and immune to busy cores)")
    p.add_argument("--out", help="output prefix: writes <out>.json and <out>.csv ('' writes nothing)")
    p.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    flags = {
        "run_config": args.run_config,
        "methods": args.methods,
        "samplings": args.sampling,
        "eval_demos": args.demos,
        "train_demos": args.train_demos,
        "train_per_count": args.per_count,
        "steps": args.steps,
        "timing_steps": args.timing_steps,
        "eval_limit": args.eval_limit,
        "device": args.device,
        "threads": args.threads,
        "output": args.out,
    }
    try:
        cc = load_compare_config(args.config, flags)
        if args.set:
            cc = dataclasses.replace(cc, run_overrides=tuple(cc.run_overrides) + tuple(args.set))
        result = run_comparison(cc)
    except USER_ERRORS as exc:
        return user_error(exc)
    print()
    print(format_table(result))
    if args.markdown:
        print()
        print(format_markdown(result))
    if cc.output:
        print("wrote " + ", ".join(write_results(result, cc.output)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
