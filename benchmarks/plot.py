#!/usr/bin/env python3
"""Draw PNG plots from a bench_hub CSV: one figure per op (the Q-Former flavors share one), one panel per (shape, mode).

    python benchmarks/plot.py benchmarks/results/bench_hub_nvidia-h100-80gb-hbm3.csv [--out DIR]

Each panel is a horizontal bar per provider: median time, a whisker from p20 to p80, our
backends in one colour and the peers in another, and a dashed line at the row's floor
(max of bytes / measured bandwidth and FLOPs / measured matmul rate). Only the latest run
in the file (its last date) is drawn for each device. The device name is in every title.
Needs matplotlib; without it, says so and draws nothing (the CSV is the result).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys

from bench_results import OURS  # noqa: E402  (benchmarks/ is on sys.path: script dir, or bench_hub's)

MODE_ORDER = ("fwd", "bwd", "fwd+bwd", "train_step", "eval_step")


def family(op: str) -> str:
    """One figure per op; the Q-Former flavors share one (few files come back from a GPU session)."""
    return "qformer" if op.startswith("qformer") else op


def read_rows(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("median_ms")]


def latest_run(rows: list[dict]) -> list[dict]:
    """Rows of the last run (latest date) of each device in the file."""
    last: dict[str, str] = {}
    for r in rows:
        last[r["gpu"]] = max(last.get(r["gpu"], ""), r["date"])
    return [r for r in rows if r["date"] == last[r["gpu"]]]


def plot_csv(csv_path: str, out_dir: str | None = None) -> list[str]:
    """Draw the figures for ``csv_path`` into ``out_dir`` (default: next to the CSV); return their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib is not installed, so no PNG was drawn (pip install matplotlib); the CSV holds every number")
        return []
    rows = latest_run(read_rows(csv_path))
    if not rows:
        print(f"plot: no timed rows in {csv_path}")
        return []
    out_dir = out_dir or os.path.dirname(os.path.abspath(csv_path))
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(csv_path))[0]
    written = []
    for gpu in sorted({r["gpu"] for r in rows}):
        for op in dict.fromkeys(family(r["op"]) for r in rows if r["gpu"] == gpu):
            sel = [r for r in rows if r["gpu"] == gpu and family(r["op"]) == op]
            shapes = list(dict.fromkeys((r["op"], r["shape"]) for r in sel))
            modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in sel)]
            providers = list(dict.fromkeys(r["provider"] for r in sel))
            fig, axes = plt.subplots(
                len(shapes),
                len(modes),
                figsize=(5.2 * len(modes), 0.35 * len(providers) * len(shapes) + 1.6 * len(shapes)),
                squeeze=False,
            )
            for i, shape in enumerate(shapes):
                for j, mode in enumerate(modes):
                    panel_rows = [r for r in sel if (r["op"], r["shape"]) == shape and r["mode"] == mode]
                    _panel(axes[i][j], panel_rows, f"{shape[0]} | {shape[1]}\n{mode}")
            cpu = gpu.startswith("CPU")
            info = sel[0]
            fig.suptitle(
                f"{op} on {gpu}{' (CPU NUMBERS, not GPU speed)' if cpu else ''}\n"
                f"torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, commit {info['commit']}, {info['date']}\n"
                "orange: mmict_kernels, blue: peers, dashed line: floor",
                fontsize=10,
            )
            fig.tight_layout()
            name = f"{stem}_{re.sub(r'[^A-Za-z0-9]+', '-', op).strip('-')}.png"
            path = os.path.join(out_dir, name)
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    print("plot: wrote " + ", ".join(written))
    return written


def _panel(ax, rows: list[dict], title: str) -> None:
    rows = sorted(rows, key=lambda r: float(r["median_ms"]), reverse=True)
    names = [r["provider"] for r in rows]
    med = [float(r["median_ms"]) for r in rows]
    lo = [m - float(r["p20_ms"]) for m, r in zip(med, rows)]
    hi = [float(r["p80_ms"]) - m for m, r in zip(med, rows)]
    colors = ["tab:orange" if n in OURS else "tab:blue" for n in names]
    ax.barh(names, med, xerr=[lo, hi], color=colors, capsize=2)
    floors = [max(float(r["floor_bw_ms"] or 0), float(r["floor_flops_ms"] or 0)) for r in rows]
    if floors and max(floors) > 0:
        ax.axvline(max(floors), color="black", linestyle="--", linewidth=1, label="floor")
        ax.legend(loc="lower right", fontsize=7)
    log = min(med) > 0 and max(med) / min(med) > 50  # e.g. the Triton interpreter next to compiled kernels
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(f"median ms{' (log scale)' if log else ''}, whiskers p20-p80", fontsize=8)
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=7)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", nargs="+", help="bench_hub CSV file(s)")
    p.add_argument("--out", default=None, help="directory for the PNGs (default: next to each CSV)")
    args = p.parse_args(argv)
    for path in args.csv:
        plot_csv(path, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
