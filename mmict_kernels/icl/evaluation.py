"""Evaluation: generate answers with and without demonstrations, score them, print a table, write JSON.

Demonstrations for evaluation queries come from the training set (the pool), drawn with the
run's sampling strategy; ``num_demos=0`` is the query alone (VanillaFine-Tune style input).
"""

from __future__ import annotations

import json
import os
import re
import sys

import torch

from . import metrics
from .batch import batch_builder
from .build import Run
from .config import check_generation_lengths
from .data import task_kind
from .distributed import gather_to_rank0, is_sharded, rank_and_world
from .precision import MixedPrecision
from .sampling import DemoSampler, batches_of, epoch_groups


def generation_lengths_of(example, lengths: dict, default: tuple[int, int]) -> tuple[int, int]:
    """(min_new_tokens, max_new_tokens) of a query: its task's entry, else its kind's, else ``default``."""
    if example.task in lengths:
        return lengths[example.task]
    return lengths.get(task_kind(example.task, example.kind), default)


def evaluation_groups(queries, sampling: str, group_size: int, seed: int, limit: int | None = None) -> list[list[int]]:
    """The evaluation's query groups in order (no shuffling), at most ``limit`` of them.

    One-to-many: same-task groups of ``group_size`` sharing one demonstration set; every query is
    evaluated, so the leftovers that fill no group form groups of their own. Other strategies: one
    query per group. Every method of the comparison answers the queries in this order.
    """
    group = group_size if sampling == "one-to-many" else 1
    order = epoch_groups(queries.tasks(), sampling, group, seed, 0, shuffle=False)
    if sampling == "one-to-many":
        covered = {q for g in order for q in g}
        order += [[q] for q in range(len(queries)) if q not in covered]
    return order if limit is None else order[:limit]


@torch.no_grad()
def predict(
    run: Run,
    num_demos: int,
    sampling: str = "random",
    group_size: int = 4,
    batch_size: int = 32,
    num_beams: int = 1,
    max_new_tokens: int = 10,
    min_new_tokens: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    use_prefix_cache: bool = True,
    limit: int | None = None,
    generation_lengths: dict | None = None,
    builder_cls=None,
    return_context_lengths: bool = False,
):
    """One record per evaluation query: prediction, answers, task.

    ``generation_lengths``: ``{task or kind: [min_new_tokens, max_new_tokens]}`` (``eval.generation_lengths``);
    queries of other tasks use ``min_new_tokens``/``max_new_tokens``. Queries with different lengths
    are generated in separate batches; the records keep the query order either way.
    ``builder_cls``: the batch layout (default the MMICT ``BatchBuilder``; e.g. a baseline's subclass).
    ``return_context_lengths``: also return, per record, the LLM context tokens that query attends
    to (demonstrations, separators, query features, prompt; a shared prefix counted for every row),
    and the LLM context positions computed (a shared prefix once): ``(records, lengths, computed)``.
    """
    cfg, model = run.cfg, run.model
    m = cfg.model
    queries, pool = run.eval_set, run.train_set
    lengths = check_generation_lengths(generation_lengths or {})
    sampler = DemoSampler(pool, queries, num_demos, sampling, cfg.demos.same_task, seed=seed)
    rank, world = rank_and_world()
    # FSDP: every process must run the same forwards (each gathers the LLM's shards), so the
    # shared-prefix generation (its own early stop) is not used and transformers' generate runs
    # in lockstep (synced_gpus) until every process has finished.
    sharded = world > 1 and is_sharded(model)
    use_prefix_cache = use_prefix_cache and not sharded
    shared = sampling == "one-to-many" and num_demos > 0 and m.llm_family == "decoder" and use_prefix_cache and num_beams == 1
    builder = batch_builder(run, "generate", shared, builder_cls)
    order = evaluation_groups(queries, sampling, group_size, seed, limit)
    # One generation setting per group (a one-to-many group holds one task); settings in order of first use.
    by_setting: dict[tuple[int, int], list] = {}
    for g in order:
        by_setting.setdefault(generation_lengths_of(queries[g[0]], lengths, (min_new_tokens, max_new_tokens)), []).append(g)
    model.eval()
    tok = run.llm_tokenizer
    precision = MixedPrecision(cfg.train.precision, torch.device(device))
    # The batches of a one-process run, in order; with several processes each takes every world-th
    # one (the same batches, so the same predictions) and rank 0 gathers them back in order.
    jobs = [(setting, groups) for setting, setting_order in by_setting.items()
            for groups in batches_of(setting_order, batch_size, drop_last=False)]  # fmt: skip
    mine = list(range(rank, len(jobs), world))
    # Lockstep (FSDP): every process runs as many batches; one that has none left repeats a batch and discards it.
    turns = -(-len(jobs) // world) if sharded else len(mine)
    done = []  # (job index, records, context lengths, positions computed)
    for turn in range(turns):
        job = mine[turn] if turn < len(mine) else None
        (lo, hi), groups = jobs[job if job is not None else 0]
        batch = builder(sampler.groups(groups, 0), queries, pool).to(device)
        with precision.autocast():
            out = model.generate(
                batch,
                max_new_tokens=hi,
                min_new_tokens=lo,
                num_beams=num_beams,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                synced_gpus=sharded,
            )
        if job is None:
            continue
        rows, n = batch.context_lengths()
        texts = []
        for q, answers, task, ids in zip(batch.queries, batch.answers, batch.tasks, out.tolist()):
            if tok.eos_token_id in ids:
                ids = ids[: ids.index(tok.eos_token_id)]
            text = tok.decode(ids, skip_special_tokens=True).strip()
            texts.append({"query": q, "task": task, "prediction": text, "answers": list(answers)})
        done.append((job, texts, rows, n))
    gathered = gather_to_rank0(done)
    if gathered is None:  # not rank 0: rank 0 holds every record
        return ([], [], 0) if return_context_lengths else []
    records, ctx, computed = [], [], 0
    for _, texts, rows, n in sorted(gathered, key=lambda d: d[0]):
        records += texts
        ctx += rows
        computed += n
    if len(by_setting) > 1:  # back to the query order of a single-setting run
        rank = {q: i for i, q in enumerate(q for g in order for q in g)}
        perm = sorted(range(len(records)), key=lambda i: rank[records[i]["query"]])
        records, ctx = [records[i] for i in perm], [ctx[i] for i in perm]
    for r in records:  # the data set's ids (for the saved predictions), the kind and the headline metric
        r.update(record_fields(queries[r["query"]]))
    return (records, ctx, computed) if return_context_lengths else records


def record_fields(example) -> dict:
    """What a prediction record carries from its example: ``kind``, ``metric`` (the headline), ``image_id``, ``question_id``."""
    kind = task_kind(example.task, example.kind)
    return {
        "kind": kind,
        "metric": example.metric or HEADLINE_OF_KIND[kind],
        "image_id": example.image_id,
        "question_id": example.question_id,
    }


# The metric each task kind is judged by (papers' tables): CIDEr for captions, VQA accuracy for questions;
# the embedded shapes data sets "exact_match" on its examples (``Example.metric``).
HEADLINE_OF_KIND = {"caption": "CIDEr", "vqa": "vqa_accuracy"}


def score(records: list[dict]) -> dict:
    """Per task and overall: n, exact match and VQA accuracy (in %), the task's ``kind`` and ``headline``.

    A caption task (``kind`` "caption") whose headline is CIDEr also gets ``captions``: its
    :func:`metrics.caption_metrics` (pycocoevalcap's BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE, on their
    own scale). ``headline``: ``{"metric": "CIDEr" | "vqa_accuracy" | "exact_match", "value": ...}`` in the
    papers' units (CIDEr x 100, accuracies in %); "all" has one when every task shares its metric.
    Records without ``kind``/``metric`` (e.g. from other generation loops) get them from the task name.
    """
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    out = {}
    for task, rs in sorted(by_task.items()) + [("all", records)]:
        kinds = {r.get("kind") or task_kind(r["task"]) for r in rs}
        names = {r.get("metric") or HEADLINE_OF_KIND[r.get("kind") or task_kind(r["task"])] for r in rs}
        s = out[task] = {
            "n": len(rs),
            "kind": kinds.pop() if len(kinds) == 1 else "mixed",
            "exact_match": 100 * sum(metrics.exact_match(r["prediction"], r["answers"]) for r in rs) / max(len(rs), 1),
            "vqa_accuracy": 100 * sum(metrics.vqa_accuracy(r["prediction"], r["answers"]) for r in rs) / max(len(rs), 1),
        }
        name = names.pop() if len(names) == 1 else None
        if name == "CIDEr" and (task != "all" or len(by_task) > 1):
            s["captions"] = metrics.caption_metrics(
                {i: r["prediction"] for i, r in enumerate(rs)}, {i: r["answers"] for i, r in enumerate(rs)}
            )
        elif name == "CIDEr":  # one task: "all" is that task
            s["captions"] = out[rs[0]["task"]]["captions"]
        if name is not None:
            value = s[name] if name != "CIDEr" else s["captions"]["CIDEr"]
            s["headline"] = {"metric": name, "value": None if value is None else (100 * value if name == "CIDEr" else value)}
    return out


def save_predictions(records: list[dict], output: str, num_demos: int) -> dict[str, str]:
    """Each task's predictions next to ``output`` (``<stem>.<k>demos.<task>.json``), in the layout the
    evaluation tools read: ``[{"image_id", "caption"}]`` for a caption task (COCO caption results),
    ``[{"question_id", "answer"}]`` for a question task (VQA results). Returns ``{task: path}``."""
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    stem = os.path.splitext(output)[0]
    paths = {}
    for task, rs in sorted(by_task.items()):
        kind = rs[0].get("kind") or task_kind(task)
        if kind == "caption":
            rows = [{"image_id": r.get("image_id", r["query"]), "caption": r["prediction"]} for r in rs]
        else:
            rows = [{"question_id": r.get("question_id", r["query"]), "answer": r["prediction"]} for r in rs]
        path = f"{stem}.{num_demos}demos.{re.sub(r'[^A-Za-z0-9_.-]', '_', task)}.json"
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(rows, f)
        os.replace(tmp, path)
        paths[task] = path
    return paths


def evaluate(
    run: Run, demo_counts=(0, 2), sampling: str = "random", output: str | None = None, print_table: bool = True, **kwargs
) -> dict:
    """Scores for each number of demonstrations; prints a table and writes JSON when ``output`` is set.

    Each count's results are written as soon as they are scored, so a failure at a later count
    keeps the finished ones: they are printed, the JSON records which count failed and why
    (``"failed"``), and the error is raised. Under torchrun every process generates its share of
    the queries and rank 0 scores, prints and writes (the other processes return ``{}``).
    """
    rank, _ = rank_and_world()
    results = {"sampling": sampling, "by_num_demos": {}}
    for k in demo_counts:
        try:
            records = predict(run, k, sampling=sampling, **kwargs)
            if rank == 0:
                results["by_num_demos"][str(k)] = {"scores": score(records), "examples": records[:20]}
                if output:  # every prediction, in the evaluation tools' layout, so the run can be re-scored
                    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
                    results["by_num_demos"][str(k)]["predictions"] = save_predictions(records, output, k)
        except Exception as exc:
            if rank == 0:
                results["failed"] = {"num_demos": k, "error": f"{type(exc).__name__}: {exc}"}
                _write_results(results, output)
                if print_table and results["by_num_demos"]:
                    print(format_table(results))
                done = ", ".join(results["by_num_demos"]) or "none"
                kept = f"; kept in {output}" if output else ""
                print(f"evaluation with {k} demonstrations failed; finished demo counts: {done}{kept}", file=sys.stderr)
            raise
        if rank == 0:
            _write_results(results, output)
    if rank != 0:
        return {}
    if print_table:
        print(format_table(results))
    return results


def _write_results(results: dict, output: str | None) -> None:
    if not output:
        return
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, output)


def headline(scores: dict) -> tuple[str, float | None]:
    """(name, value) of the number a run is judged by (its best checkpoint during training): the mean over
    the tasks of each task's headline (:func:`score`'s ``headline``: CIDEr x 100 for captions, VQA accuracy
    for questions, exact match on the embedded data). ``("none", None)`` when no task has one."""
    heads = [s.get("headline") or _headline_of(s) for task, s in scores.items() if task != "all"]
    heads = [h for h in heads if h.get("value") is not None]
    if not heads:
        return "none", None
    names = sorted({h["metric"] for h in heads})
    name = names[0] if len(names) == 1 else "mean(" + ", ".join(names) + ")"
    return name, sum(h["value"] for h in heads) / len(heads)


def _headline_of(s: dict) -> dict:
    """A task's headline from scores that carry none: CIDEr x 100 when captions were scored, else VQA accuracy."""
    cider = (s.get("captions") or {}).get("CIDEr")
    if "captions" in s:
        return {"metric": "CIDEr", "value": None if cider is None else 100 * cider}
    return {"metric": "vqa_accuracy", "value": s.get("vqa_accuracy")}


def format_table(results: dict) -> str:
    """One line per demonstration count and task: its headline metric first (CIDEr x 100 for captions, VQA accuracy
    for questions, exact match on the embedded data), then exact match, VQA accuracy and CIDEr ("-": not computed)."""
    lines = [
        f"sampling: {results['sampling']}",
        f"{'demos':>5}  {'task':<14} {'n':>5}  {'headline':<12} {'value':>6} {'exact':>7} {'vqa_acc':>8} {'CIDEr':>7}",
    ]
    approximate = False
    for k, res in results["by_num_demos"].items():
        for task, s in res["scores"].items():
            captions = s.get("captions") or {}
            cider = f"{100 * captions['CIDEr']:7.1f}" if captions.get("CIDEr") is not None else f"{'-':>7}"
            approximate |= captions.get("tokenizer", metrics.TOKENIZER_PTB) != metrics.TOKENIZER_PTB
            head = s.get("headline") or {}
            value = head.get("value")
            shown = f"{head.get('metric', '-'):<12} " + (f"{value:6.1f}" if value is not None else f"{'-':>6}")
            lines.append(f"{k:>5}  {task:<14} {s['n']:>5}  {shown} {s['exact_match']:7.1f} {s['vqa_accuracy']:8.1f} {cider}")
    if approximate:
        lines.append(f"caption tokens: {metrics.TOKENIZER_PYTHON}")
    return "\n".join(lines)
