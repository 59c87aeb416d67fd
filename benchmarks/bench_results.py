"""Rows, the summary table and the CSV files of bench_hub.py (see README.md for the columns)."""

from __future__ import annotations

import csv
import dataclasses
import os
import re

CSV_COLUMNS = [
    "op", "provider", "mode", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "tflops", "gbps",
    "floor_bw_ms", "floor_flops_ms", "gpu", "torch", "triton", "cuda", "commit", "date", "peak_mem_mb",
]  # fmt: skip
# Providers that are mmict_kernels' own (everything else in a results file is a peer).
OURS = frozenset(
    {"reference", "triton", "cuda", "fused-mhub-torch", "fused-mhub-triton", "fused-mhub-cuda", "fused-mhub-auto", "mmict-fused"}
)
UNAVAILABLE_COLUMNS = ["op", "provider", "shape", "dtype", "reason", "gpu", "torch", "commit", "date"]


@dataclasses.dataclass
class Row:
    op: str
    provider: str
    mode: str
    shape: str
    dtype: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    tflops: float
    gbps: float
    floor_bw_ms: float
    floor_flops_ms: float
    peak_mem_mb: float | None
    ours: bool

    @property
    def floor_ms(self) -> float:
        known = [f for f in (self.floor_bw_ms, self.floor_flops_ms) if f == f]  # a NaN floor is unknown
        return max(known) if known else float("nan")


@dataclasses.dataclass
class Skip:
    op: str
    provider: str
    shape: str
    dtype: str
    reason: str


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def fmt(x, spec=".3f") -> str:
    return "-" if x is None or x != x else format(x, spec)


def make_row(op, provider, mode, shape, dname, timing, peak, flops, bytes_moved, floors, ours) -> Row:
    floor_bw, floor_flops = floors.floor_ms(flops, bytes_moved)
    seconds = timing.median_ms * 1e-3
    return Row(
        op, provider, mode, shape, dname, timing.median_ms, timing.p20_ms, timing.p80_ms,
        flops / seconds / 1e12, bytes_moved / seconds / 1e9, floor_bw, floor_flops, peak, ours,
    )  # fmt: skip


def print_row(row: Row) -> None:
    print(
        f"   {row.provider:<15} {row.mode:<8} {fmt(row.median_ms, '9.4f')} ms  [p20 {fmt(row.p20_ms, '.4f')}, p80 {fmt(row.p80_ms, '.4f')}]"
        f"  {fmt(row.tflops, '7.3g')} TFLOP/s  {fmt(row.gbps, '7.4g')} GB/s  floor {fmt(row.floor_ms, '.4f')} ms"
        f"  peak {fmt(row.peak_mem_mb, '.1f')} MB"
    )


# ---------------------------------------------------------------------------------------
# Summary table and files
# ---------------------------------------------------------------------------------------
def summarize(rows: list[Row]) -> list[str]:
    """Per (op, shape, mode): our best and the best peer, the ratio, and the share of the floor."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.op, r.shape, r.mode), []).append(r)
    lines = [
        f"{'op':<22} {'shape':<64} {'mode':<10} {'our best':<30} {'best peer':<30} {'peer/ours':>9} {'floor/ours':>10}",
    ]
    for (op, shape, mode), group in groups.items():
        ours = min((r for r in group if r.ours), key=lambda r: r.median_ms, default=None)
        peer = min((r for r in group if not r.ours), key=lambda r: r.median_ms, default=None)
        o = f"{ours.provider} {ours.median_ms:.4f} ms" if ours else "-"
        pe = f"{peer.provider} {peer.median_ms:.4f} ms" if peer else "-"
        ratio = f"{peer.median_ms / ours.median_ms:.2f}x" if ours and peer else "-"
        floor = f"{ours.floor_ms / ours.median_ms:.0%}" if ours else "-"
        lines.append(f"{op:<22} {shape[:64]:<64} {mode:<10} {o:<30} {pe:<30} {ratio:>9} {floor:>10}")
    return lines


def _check_header(path: str, columns: list[str]) -> bool:
    """True if ``path`` already holds rows with these columns; exits if it holds other columns."""
    if not (os.path.exists(path) and os.path.getsize(path) > 0):
        return False
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    if header != columns:
        raise SystemExit(f"{path} has other columns ({header}); move it aside or pass another --out")
    return True


def _num(x, digits=6) -> str:
    return "" if x is None or x != x else f"{x:.{digits}g}"


class Results:
    """Collects rows and skips, appending each to its CSV at once (a run cut short keeps what it measured).

    Files: ``bench_hub_<device>.csv`` (timed rows) and ``bench_hub_<device>_unavailable.csv``
    (providers that could not run a case, with the reason), ``<device>`` being "cpu" or the GPU name.
    """

    def __init__(self, out_dir: str, env: dict, device_type: str):
        os.makedirs(out_dir, exist_ok=True)
        tag = "cpu" if device_type == "cpu" else slug(env["gpu"])
        self.rows_path = os.path.join(out_dir, f"bench_hub_{tag}.csv")
        self.skips_path = os.path.join(out_dir, f"bench_hub_{tag}_unavailable.csv")
        self._headers = {
            self.rows_path: _check_header(self.rows_path, CSV_COLUMNS),
            self.skips_path: _check_header(self.skips_path, UNAVAILABLE_COLUMNS),
        }
        self.env = env
        self.rows: list[Row] = []
        self.skips: list[Skip] = []

    def _append(self, path: str, columns: list[str], record: dict) -> None:
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            if not self._headers[path]:
                writer.writeheader()
                self._headers[path] = True
            writer.writerow(record)

    def add_row(self, r: Row) -> None:
        self.rows.append(r)
        env = self.env
        self._append(
            self.rows_path,
            CSV_COLUMNS,
            {
                "op": r.op,
                "provider": r.provider,
                "mode": r.mode,
                "shape": r.shape,
                "dtype": r.dtype,
                "median_ms": _num(r.median_ms),
                "p20_ms": _num(r.p20_ms),
                "p80_ms": _num(r.p80_ms),
                "tflops": _num(r.tflops, 4),
                "gbps": _num(r.gbps, 4),
                "floor_bw_ms": _num(r.floor_bw_ms),
                "floor_flops_ms": _num(r.floor_flops_ms),
                **{k: env[k] for k in ("gpu", "torch", "triton", "cuda", "commit", "date")},
                "peak_mem_mb": _num(r.peak_mem_mb, 5),
            },  # fmt: skip
        )

    def add_skip(self, s: Skip) -> None:
        self.skips.append(s)
        self._append(
            self.skips_path,
            UNAVAILABLE_COLUMNS,
            {**dataclasses.asdict(s), **{k: self.env[k] for k in ("gpu", "torch", "commit", "date")}},
        )


def summary_from_csv(path: str) -> list[str]:
    """The summary table of the latest run of each device in a results CSV."""
    with open(path, newline="") as f:
        records = [r for r in csv.DictReader(f) if r.get("median_ms")]
    last: dict[str, str] = {}
    for r in records:
        last[r["gpu"]] = max(last.get(r["gpu"], ""), r["date"])
    lines = []
    for gpu, date in last.items():
        rows = [
            Row(r["op"], r["provider"], r["mode"], r["shape"], r["dtype"], float(r["median_ms"]), float(r["p20_ms"]), float(r["p80_ms"]),
                float(r["tflops"] or "nan"), float(r["gbps"] or "nan"), float(r["floor_bw_ms"] or 0), float(r["floor_flops_ms"] or 0),
                float(r["peak_mem_mb"]) if r["peak_mem_mb"] else None, r["provider"] in OURS)
            for r in records if r["gpu"] == gpu and r["date"] == date
        ]  # fmt: skip
        lines += [f"{gpu} | run of {date} | commit {next(r['commit'] for r in records if r['date'] == date)}"] + summarize(rows)
    return lines


if __name__ == "__main__":  # python benchmarks/bench_results.py RESULTS.csv: the summary table again
    import sys

    for p in sys.argv[1:]:
        print("\n".join(summary_from_csv(p)))
