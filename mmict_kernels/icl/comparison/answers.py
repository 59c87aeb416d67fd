"""Every method's answers to the same evaluation queries with the same demonstrations, and their scores."""

from __future__ import annotations

import dataclasses

import torch

from ..baselines import aim_batch, builder_class
from ..batch import batch_builder
from ..evaluation import evaluation_groups, score
from ..evaluation import predict as driver_predict
from ..metrics import corpus_bleu
from ..sampling import DemoSampler, batches_of
from .methods import aim_batch_to


def _aim_context_lengths(batch, num_query_tokens: int) -> tuple[list[int], int]:
    demo = [sum(len(batch.demo_text[d]) for d in g) for g in batch.group_demos]
    own = [num_query_tokens + len(p) for p in batch.query_prompt]
    rows = [demo[int(g)] + o for g, o in zip(batch.query_group, own)]
    return rows, sum(demo) + sum(own)


@torch.no_grad()
def predict(
    base_run,
    method: str,
    model,
    num_demos: int,
    sampling: str,
    device,
    max_new_tokens: int,
    limit: int | None,
    batch_size: int = 64,
    seed: int = 0,
):
    """Records (as ``evaluation.predict`` gives them) and context sizes for every evaluation query.

    The query order, groups and demonstrations are ``evaluation.predict``'s (same seed), so every
    method answers the same queries with the same demonstrations. The driver-trained methods go
    through ``evaluation.predict`` itself (with their batch layout); AIM has its own batch and
    generation, so it takes the driver's query order (``evaluation_groups``) and sampling here.
    """
    cfg, m = base_run.cfg, base_run.cfg.model
    if method != "aim":
        records, ctx, computed = driver_predict(
            dataclasses.replace(base_run, model=model),
            num_demos,
            sampling=sampling,
            group_size=cfg.demos.group_size,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            seed=seed,
            device=device,
            use_prefix_cache=m.use_prefix_cache,
            limit=limit,
            builder_cls=builder_class(method),
            return_context_lengths=True,
        )
        return records, _mean_context(ctx, computed)

    queries, pool, tok = base_run.eval_set, base_run.train_set, base_run.llm_tokenizer
    sampler = DemoSampler(pool, queries, num_demos, sampling, cfg.demos.same_task, seed=seed)
    # Only its tokenisation is used (aim_batch): the layout options do not matter.
    builder = batch_builder(base_run, "generate")
    order = evaluation_groups(queries, sampling, cfg.demos.group_size, seed, limit)  # the driver's queries, in its order
    model.eval()
    records, ctx, computed = [], [], 0
    for groups in batches_of(order, batch_size, drop_last=False):
        batch = aim_batch_to(aim_batch(sampler.groups(groups, 0), queries, pool, builder, with_answer=False), device)
        outs = model.generate(batch, max_new_tokens=max_new_tokens)  # token ids, cut at the first eos
        rows, n = _aim_context_lengths(batch, m.num_query_tokens)
        ctx += rows
        computed += n
        for q, ids in zip(batch.query_ids, outs):
            ex = queries[q]
            records.append(
                {
                    "query": q,
                    "task": ex.task,
                    "prediction": tok.decode(ids, skip_special_tokens=True).strip(),
                    "answers": list(ex.answers or (ex.answer,)),
                }
            )
    return records, _mean_context(ctx, computed)


def _mean_context(ctx: list[int], computed: int) -> dict:
    return {"ctx_tokens": sum(ctx) / len(ctx), "llm_tokens_computed": computed / len(ctx)}


def summarize(records: list[dict], bleu_n: int = 4) -> dict:
    """EM over all queries, EM on the demonstration-dependent tasks, corpus BLEU-n on captions (in %)."""
    s = score(records)
    ambiguous = [r for r in records if r["task"] in ("what_color", "what_shape")]
    captions = [r for r in records if r["task"] == "caption"]
    bleu = corpus_bleu([r["prediction"] for r in captions], [r["answers"] for r in captions], max_n=bleu_n) if captions else None
    return {
        "exact_match": s["all"]["exact_match"],
        "em_what": score(ambiguous)["all"]["exact_match"] if ambiguous else None,
        "caption_bleu": None if bleu is None else 100 * bleu,
        "n": s["all"]["n"],
    }
