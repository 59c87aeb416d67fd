"""The comparison itself: which models to train, train each once, measure and evaluate it at every count."""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
import time

import torch

from ..baselines import LABELS
from ..build import build_run
from ..config import load_config
from ..training import pick_device
from .answers import predict, summarize
from .config import CompareConfig
from .measure import machine, measure_step
from .methods import Stepper, build_aim, fresh_model, make_trainer, train
from .report import format_row


def _plan(cc: CompareConfig, llm_family: str, log) -> list[tuple[str, str, int, list[int]]]:
    """(method, sampling, training demonstrations, evaluation counts) of every model to train."""
    plan = []
    for method in cc.methods:
        if method == "aim" and llm_family != "decoder":
            log(
                "AIM skipped: its fused demonstration tokens are a causal prefix of a decoder-only LLM; "
                f"this run's LLM is {llm_family!r} (docs/COMPARE.md)"
            )
            continue
        if method == "finetune":  # the query alone: no demonstrations, so no sampling strategy
            plan.append((method, "-", 0, [0]))
            continue
        for sampling in cc.samplings:
            if cc.train_per_count:
                plan += [(method, sampling, k, [k]) for k in cc.eval_demos]
            else:
                plan.append((method, sampling, cc.train_demos, list(cc.eval_demos)))
    return plan


_PRINT = functools.partial(print, flush=True)


def run_comparison(cc: CompareConfig, log=_PRINT) -> dict:
    """Train, time and evaluate every planned model; the result holds the rows, the machine and both configs."""
    device = pick_device(cc.device, 0)
    if cc.threads:
        torch.set_num_threads(cc.threads)
    base_cfg = load_config(cc.run_config, list(cc.run_overrides) + ["train.progress=false", f"train.device={device}"])
    t_start = time.perf_counter()
    base_run = build_run(base_cfg, device=device)
    init_model = base_run.model
    plan = _plan(cc, base_cfg.model.llm_family, log)
    backbone = None  # AIM's frozen backbone: the VanillaFine-Tune model (trained on single queries)
    rows, timing_cache = [], {}
    with tempfile.TemporaryDirectory(prefix="aim-bank-") as bank_root:
        for method, sampling, train_k, eval_ks in plan:
            sampling_run = "random" if sampling == "-" else sampling
            if method == "aim" and backbone is None:  # only when VanillaFine-Tune is not in the comparison
                backbone = _trained(base_run, "finetune", "random", 0, cc.steps, init_model, None)[0]
            t0 = time.perf_counter()
            if method == "aim":
                bank = os.path.join(bank_root, f"{sampling}-{train_k}")
                model, losses = _trained(base_run, method, sampling_run, train_k, cc.steps, backbone, bank)
            else:
                model, losses = _trained(base_run, method, sampling_run, train_k, cc.steps, init_model, None)
                if method == "finetune":
                    backbone = model
            train_s = time.perf_counter() - t0
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            for k in eval_ks:
                key = (method, sampling_run, k)
                if key not in timing_cache:
                    src = backbone if method == "aim" else init_model
                    bank = os.path.join(bank_root, f"timing-{sampling}-{k}") if method == "aim" else None
                    stepper = _stepper(base_run, method, sampling_run, k, cc.timing_steps, src, bank)
                    timing_cache[key] = measure_step(stepper, cc.timing_steps)
                records, ctx = predict(base_run, method, model, k, sampling_run, device, cc.max_new_tokens, cc.eval_limit)
                row = {
                    "method": LABELS[method],
                    "sampling": sampling,
                    "train_demos": train_k,
                    "eval_demos": k,
                    **summarize(records, cc.caption_bleu_n),
                    **ctx,
                    **timing_cache[key],
                    "trainable_params": trainable,
                    "final_loss": sum(losses[-10:]) / len(losses[-10:]),
                    "train_s": train_s,
                }
                rows.append(row)
                log(format_row(row))
    return {
        "machine": machine(device),
        "config": dataclasses.asdict(cc),
        "run_config": base_cfg.to_dict(),
        "rows": rows,
        "wall_s": time.perf_counter() - t_start,
        "caption_metric": f"BLEU-{cc.caption_bleu_n}",
    }


def _stepper(base_run, method, sampling, k, steps, src_model, bank_dir):
    if method == "aim":
        trainer = make_trainer(base_run, "mmict", sampling, k, steps, fresh_model(src_model))
        return Stepper(trainer, build_aim(src_model, base_run, bank_dir))
    return Stepper(make_trainer(base_run, method, sampling, k, steps, fresh_model(src_model)))


def _trained(base_run, method, sampling, k, steps, src_model, bank_dir):
    stepper = _stepper(base_run, method, sampling, k, steps, src_model, bank_dir)
    losses = train(stepper, steps)
    return stepper.model, losses
