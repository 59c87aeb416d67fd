"""A markdown summary of a kernel resource table (``gpu_scenarios --csv``): per kernel, per target and Triton.

    python -m mmict_kernels.testing.resource_summary benchmarks/results/kernel_resources.csv

For each (Triton version, target): the kernels with their specialisation count, the most
registers, the largest shared memory, the fewest resident blocks per SM (on the target's
reference GPU) and the register spills; then every spilling specialisation with its scenarios.
"""

from __future__ import annotations

import argparse
import collections
import csv
import sys


def _int(value: str) -> int:
    return int(value) if value not in ("", "None") else 0


def summarize(rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = collections.defaultdict(list)
    for r in rows:
        groups[(r["triton"], r["target"])].append(r)
    out = []
    for (triton, target), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1]), reverse=True):
        gpu = group[0].get("occupancy_gpu", "")
        spills = [r for r in group if _int(r["spill_stores"]) or _int(r["spill_loads"])]
        out.append(f"### Triton {triton}, {target} ({len(group)} specialisations, {len(spills)} spilling; blocks/SM on {gpu})\n")
        out.append("| kernel | specialisations | max registers | max shared (KB) | min blocks/SM | spilling |")
        out.append("|---|---:|---:|---:|---:|---:|")
        by_kernel: dict[str, list[dict]] = collections.defaultdict(list)
        for r in group:
            by_kernel[r["kernel"]].append(r)
        for kernel, rs in sorted(by_kernel.items()):
            n_spill = sum(1 for r in rs if _int(r["spill_stores"]) or _int(r["spill_loads"]))
            out.append(
                f"| `{kernel}` | {len(rs)} | {max(_int(r['registers']) for r in rs)} | "
                f"{max(_int(r['shared_bytes']) for r in rs) / 1024:.1f} | {min(_int(r['blocks_per_sm']) for r in rs)} | {n_spill} |"
            )
        if spills:
            out.append("\nSpilling specialisations (spill stores / loads in bytes per thread):\n")
            for r in spills:
                out.append(f"- `{r['kernel']}` {r['constexprs']}, {r['num_warps']} warps: {r['registers']} registers, "
                           f"{r['spill_stores']}/{r['spill_loads']} B; in {r['launched_in'] or r['scenario']}")  # fmt: skip
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv")
    args = p.parse_args(argv)
    with open(args.csv, newline="") as f:
        print(summarize(list(csv.DictReader(f))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
