"""The comparison's rows on screen (plain and Markdown) and on disk (``<prefix>.json``, ``<prefix>.csv``)."""

from __future__ import annotations

import csv
import json
import os

COLUMNS = [
    "method",
    "sampling",
    "train_demos",
    "eval_demos",
    "exact_match",
    "em_what",
    "caption_bleu",
    "ctx_tokens",
    "llm_tokens_computed",
    "step_ms",
    "step_cpu_ms",
    "mem_mb",
    "trainable_params",
    "final_loss",
    "n",
    "mem_kind",
    "train_s",
]
_HEADER = (
    f"{'method':<16} {'sampling':<11} {'train k':>7} {'eval k':>6} {'EM %':>6} {'EM what_* %':>11} {'BLEU':>6} "
    f"{'ctx tok/q':>9} {'LLM tok/q':>9} {'step ms':>8} {'cpu ms':>8} {'mem MB':>8}"
)


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def format_row(r: dict) -> str:
    return (
        f"{r['method']:<16} {r['sampling']:<11} {r['train_demos']:>7} {r['eval_demos']:>6} {_fmt(r['exact_match'], '6.1f')} "
        f"{_fmt(r['em_what'], '11.1f')} {_fmt(r['caption_bleu'], '6.1f')} {r['ctx_tokens']:9.1f} "
        f"{r['llm_tokens_computed']:9.1f} {r['step_ms']:8.1f} {r['step_cpu_ms']:8.1f} {r['mem_mb']:8.2f}"
    )


def format_table(result: dict) -> str:
    m = result["machine"]
    kinds = sorted({r["mem_kind"] for r in result["rows"]})
    lines = [
        f"{m['date_utc']} UTC, {m['device']}, {m['cpu_threads']} threads, torch {m['torch']}, commit {m['git_commit']}",
        _HEADER,
    ] + [format_row(r) for r in result["rows"]]
    lines.append(
        f"BLEU: caption {result['caption_metric']}. mem MB: {', '.join(kinds)}. "
        "LLM tok/q: LLM positions computed per query (a shared one-to-many prefix counted once)."
    )
    return "\n".join(lines)


def format_markdown(result: dict) -> str:
    """The table as Markdown (for the README)."""
    head = f"| method | sampling | train k | eval k | EM % | EM what_* % | caption {result['caption_metric']} | ctx tok/query | LLM tok/query | step ms | step CPU ms | mem MB |"
    lines = [head, "|" + "---|" * 12]
    for r in result["rows"]:
        lines.append(
            "| "
            + " | ".join(
                [
                    r["method"],
                    r["sampling"],
                    str(r["train_demos"]),
                    str(r["eval_demos"]),
                    _fmt(r["exact_match"], ".1f"),
                    _fmt(r["em_what"], ".1f"),
                    _fmt(r["caption_bleu"], ".1f"),
                    f"{r['ctx_tokens']:.1f}",
                    f"{r['llm_tokens_computed']:.1f}",
                    f"{r['step_ms']:.1f}",
                    f"{r['step_cpu_ms']:.1f}",
                    f"{r['mem_mb']:.2f}",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def write_results(result: dict, prefix: str) -> list[str]:
    folder = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(folder, exist_ok=True)
    paths = []
    for ext in (".json", ".csv"):
        path, tmp = prefix + ext, prefix + ext + ".tmp"
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            if ext == ".json":
                json.dump(result, f, indent=1)
            else:
                w = csv.DictWriter(f, fieldnames=COLUMNS + list(result["machine"]), extrasaction="ignore")
                w.writeheader()
                for r in result["rows"]:
                    w.writerow({**r, **result["machine"]})
        os.replace(tmp, path)
        paths.append(path)
    return paths
