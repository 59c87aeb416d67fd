"""AIM on the command line: ``python -m mmict_kernels.aim [--config configs/aim_shapes.yaml] [--set key=value ...]``.

Builds (or loads) the frozen backbone (LLaVA, LLaVA-NeXT, Qwen2-VL or Qwen2.5-VL), trains AIM's
projection on the embedded shapes data or the user's own JSONL data (images and videos) with a
demonstration bank, evaluates with and without demonstrations, prints a table and writes
``<out>/results.json`` and ``<out>/aim_projection.safetensors``. See docs/AIM.md.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from .icl.aim.config import AIMConfig
from .icl.aim.run import run


def parse_value(text: str):
    return yaml.safe_load(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmict_kernels.aim", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML file of AIMConfig fields (default: the built-in tiny setup)")
    p.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config fields, e.g. --set steps=50 shots=4"
    )
    args = p.parse_args(argv)
    values = {}
    if args.config:
        try:
            with open(args.config) as fh:
                values = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            p.error(f"--config: file not found: {args.config}")
        except yaml.YAMLError as exc:
            p.error(f"--config: {args.config} is not valid YAML: {exc}")
    for item in args.set:
        if "=" not in item:
            p.error(f"--set: expected KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        values[key] = parse_value(value)
    try:
        cfg = AIMConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        p.error(str(exc))
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
