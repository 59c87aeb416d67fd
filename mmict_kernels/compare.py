"""The paper's comparison on the embedded data, in one command.

    python -m mmict_kernels.compare --config configs/compare_shapes.yaml

VanillaFine-Tune (the query alone), Vanilla ICT (raw demonstrations), MMICT (the driver's
default) and AIM (frozen MMICT backbone + trained projection) with the same model sizes, data,
optimiser and step budget, for each sampling strategy (random, similar, one-to-many) and number
of demonstrations. One table on screen, the same rows in ``<out>.json`` and ``<out>.csv``.
See docs/COMPARE.md for the protocol and what each column measures.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import yaml

from .icl.baselines import LABELS, METHODS, aim_batch, builder_class

SAMPLINGS = ("random", "similar", "one-to-many")


@dataclasses.dataclass
class CompareConfig:
    run_config: str | None = None  # the driver's run config the methods share (None: its built-in tiny run)
    run_overrides: tuple = ()  # driver "section.key=value" overrides on top of it
    methods: tuple = METHODS
    samplings: tuple = SAMPLINGS
    train_demos: int = 2  # demonstrations per query in training (train_per_count: each count trains its own model)
    eval_demos: tuple = (0, 1, 2, 4, 8)
    train_per_count: bool = False
    steps: int = 150  # optimizer steps per trained model: the same budget for every method
    timing_steps: int = 4  # steps of the separate timing run (the first is a warm-up and not counted)
    eval_limit: int | None = None  # at most this many evaluation groups (None: the whole evaluation set)
    max_new_tokens: int = 4
    caption_bleu_n: int = 4  # BLEU-n of the caption task (the embedded captions are 2 words: BLEU-4 is 0 by definition there)
    device: str = "auto"
    threads: int | None = None  # torch CPU threads (None: torch's default); tiny models gain nothing from more
    output: str = "benchmarks/results/compare_shapes"  # <output>.json and <output>.csv; "" writes nothing

    @classmethod
    def from_dict(cls, values: dict) -> "CompareConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"compare config: unknown keys {unknown}; expected some of {sorted(names)}")
        cfg = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        bad = [m for m in cfg.methods if m not in METHODS]
        if bad or not cfg.methods:
            raise ValueError(f"methods: expected a non-empty subset of {METHODS}, got {list(cfg.methods)}")
        bad = [s for s in cfg.samplings if s not in SAMPLINGS]
        if bad or not cfg.samplings:
            raise ValueError(f"samplings: expected a non-empty subset of {SAMPLINGS}, got {list(cfg.samplings)}")
        if not cfg.eval_demos or any(not isinstance(k, int) or k < 0 for k in cfg.eval_demos):
            raise ValueError(f"eval_demos: expected non-negative integers, got {list(cfg.eval_demos)}")
        if cfg.train_demos < 0 or cfg.steps < 1 or cfg.timing_steps < 2:
            raise ValueError("train_demos >= 0, steps >= 1 and timing_steps >= 2 are required")
        if not 1 <= cfg.caption_bleu_n <= 4:
            raise ValueError(f"caption_bleu_n: expected 1 to 4, got {cfg.caption_bleu_n}")
        if cfg.threads is not None and cfg.threads < 1:
            raise ValueError(f"threads: expected >= 1 or null, got {cfg.threads}")
        return cfg


def load_compare_config(path: str | None, values: dict | None = None) -> CompareConfig:
    merged: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"compare config file not found: {path}")
        with open(path, encoding="utf-8") as f:
            merged = yaml.safe_load(f) or {}
        if not isinstance(merged, dict):
            raise ValueError(f"compare config {path}: expected a mapping at the top level")
    merged.update({k: v for k, v in (values or {}).items() if v is not None})
    return CompareConfig.from_dict(merged)


# ---------------------------------------------------------------------------------------------
# Models: every method starts from the same initial weights; the frozen LLM is shared, not copied
# ---------------------------------------------------------------------------------------------
def fresh_model(init_model):
    """A copy of the initial model; the frozen LLM is the same object (never changed, so safe to share)."""
    return copy.deepcopy(init_model, memo={id(init_model.llm): init_model.llm})


def run_config_for(base_cfg, sampling: str, num_demos: int, steps: int):
    from .icl.config import validate

    cfg = copy.deepcopy(base_cfg)
    cfg.demos.sampling, cfg.demos.num_demos, cfg.train.max_steps = sampling, num_demos, steps
    cfg.train.progress = False
    validate(cfg)
    return cfg


def make_trainer(base_run, method: str, sampling: str, num_demos: int, steps: int, model):
    """The driver's Trainer for ``method``, with the method's batch layout (Vanilla ICT's or MMICT's)."""
    from .icl.training import Trainer

    cfg = run_config_for(base_run.cfg, sampling, num_demos, steps)
    return Trainer(cfg, run=dataclasses.replace(base_run, cfg=cfg, model=model), builder_cls=builder_class(method))


def build_aim(backbone_model, base_run, bank_dir: str | None):
    from .icl.aim import AIMModel, DemonstrationBank, MMICTBackbone

    tok = base_run.llm_tokenizer
    bank = DemonstrationBank(bank_dir) if bank_dir else None
    return AIMModel(MMICTBackbone(fresh_model(backbone_model)), bank=bank, backend=base_run.cfg.model.backend,
                    pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stepper:
    """One optimizer step of a method: the driver's ``Trainer.train_step``, or AIM's projection step."""

    def __init__(self, trainer, aim=None):
        self.trainer, self.aim = trainer, aim
        if aim is not None:
            from .icl.training import make_optimizer

            self.aim = aim.to(trainer.device)
            self.optimizer = make_optimizer(self.aim, trainer.cfg.train)  # only the projection requires grad
            self.params = [p for p in self.aim.parameters() if p.requires_grad]

    @property
    def model(self):
        return self.aim if self.aim is not None else self.trainer.model

    def __call__(self, step: int) -> float:
        if self.aim is None:
            return self.trainer.train_step(step)
        t = self.trainer
        batch = _aim_to(aim_batch(t.batch_groups(step), t.run.train_set, t.run.train_set, t.builder), t.device)
        for g in self.optimizer.param_groups:
            g["lr"] = t.lr(step)  # the run's schedule and unit (per step, or per epoch as LAVIS)
        self.aim.train()
        nll, count = self.aim(batch)
        if not nll.requires_grad:  # zero demonstrations: the projection is not used, nothing to train
            return float(nll) / max(count, 1)
        (nll / max(count, 1)).backward()
        if t.cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, t.cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(nll.detach()) / max(count, 1)


def _aim_to(batch, device):
    for name in ("demo_images", "query_images", "query_group"):
        v = getattr(batch, name)
        if v is not None:
            setattr(batch, name, v.to(device))
    return batch


def train(stepper: Stepper, steps: int) -> list[float]:
    torch.manual_seed(stepper.trainer.cfg.train.seed)  # dropout streams, as Trainer.fit seeds them
    return [stepper(s) for s in range(steps)]


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------
class SavedTensorBytes:
    """Bytes of the distinct tensor storages autograd saves for the backward (the activations).

    On a CPU there is no allocator peak to read, so this is the train step's memory measure
    there: parameters, gradients and optimizer state are left out (they are the same for
    MMICT, Vanilla ICT and VanillaFine-Tune), what grows with the context is counted.
    """

    def __init__(self, model):
        self.exclude = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
        self.seen: dict[int, int] = {}

    def pack(self, t):
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr and ptr not in self.exclude:
                self.seen[ptr] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without storage (e.g. a wrapper subclass)
            pass
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def measure_step(stepper: Stepper, steps: int) -> dict:
    """Median train step time (ms, the first step not counted) and the memory of one step."""
    device = stepper.trainer.device
    torch.manual_seed(stepper.trainer.cfg.train.seed)
    times, cpu_times = [], []
    for s in range(steps - 1):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        stepper(s)
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        stepper(steps - 1)
        mem, kind = torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    else:
        probe = SavedTensorBytes(stepper.model)
        with torch.autograd.graph.saved_tensors_hooks(probe.pack, lambda t: t):
            stepper(steps - 1)
        mem, kind = probe.total, "cpu: tensors saved for backward"
    # Wall time is what a user waits; CPU time (all threads of this process) is what a step costs
    # when other processes share the cores (wall time then mostly measures them).
    return {"step_ms": 1000 * statistics.median(times[1:] or times), "step_cpu_ms": 1000 * statistics.median(cpu_times[1:] or cpu_times),
            "mem_mb": mem / 2**20, "mem_kind": kind}


def _aim_context_lengths(batch, num_query_tokens: int) -> tuple[list[int], int]:
    demo = [sum(len(batch.demo_text[d]) for d in g) for g in batch.group_demos]
    own = [num_query_tokens + len(p) for p in batch.query_prompt]
    rows = [demo[int(g)] + o for g, o in zip(batch.query_group, own)]
    return rows, sum(demo) + sum(own)


@torch.no_grad()
def predict(base_run, method: str, model, num_demos: int, sampling: str, device, max_new_tokens: int, limit: int | None,
            batch_size: int = 64, seed: int = 0):
    """Records (as ``evaluation.predict`` gives them) and context sizes for every evaluation query.

    The query order, groups and demonstrations are ``evaluation.predict``'s (same seed), so every
    method answers the same queries with the same demonstrations. The driver-trained methods go
    through ``evaluation.predict`` itself (with their batch layout); AIM has its own batch and
    generation, so it repeats only the query order and sampling here.
    """
    from .icl.evaluation import predict as driver_predict

    cfg, m = base_run.cfg, base_run.cfg.model
    if method != "aim":
        records, ctx, computed = driver_predict(
            dataclasses.replace(base_run, model=model), num_demos, sampling=sampling, group_size=cfg.demos.group_size,
            batch_size=batch_size, max_new_tokens=max_new_tokens, seed=seed, device=device, use_prefix_cache=m.use_prefix_cache,
            limit=limit, builder_cls=builder_class(method), return_context_lengths=True)
        return records, _mean_context(ctx, computed)

    from .icl.batch import BatchBuilder
    from .icl.sampling import DemoSampler, batches_of, epoch_groups

    queries, pool, tok = base_run.eval_set, base_run.train_set, base_run.llm_tokenizer
    group = cfg.demos.group_size if sampling == "one-to-many" else 1
    sampler = DemoSampler(pool, queries, num_demos, sampling, cfg.demos.same_task, seed=seed)
    # Only its tokenisation is used (aim_batch): the layout options do not matter.
    builder = BatchBuilder(base_run.mhub_tokenizer, tok, m.num_query_tokens, m.separator, m.llm_family, cfg.data.max_text_tokens,
                           mode="generate")
    order = epoch_groups(queries.tasks(), sampling, group, seed, 0, shuffle=False)
    if sampling == "one-to-many":  # every query is evaluated: leftovers form smaller groups (as evaluation.predict)
        covered = {q for g in order for q in g}
        order += [[q] for q in range(len(queries)) if q not in covered]
    if limit is not None:
        order = order[:limit]
    model.eval()
    records, ctx, computed = [], [], 0
    for groups in batches_of(order, batch_size, drop_last=False):
        batch = _aim_to(aim_batch(sampler.groups(groups, 0), queries, pool, builder, with_answer=False), device)
        outs = model.generate(batch, max_new_tokens=max_new_tokens)  # token ids, cut at the first eos
        rows, n = _aim_context_lengths(batch, m.num_query_tokens)
        ctx += rows
        computed += n
        for q, ids in zip(batch.query_ids, outs):
            ex = queries[q]
            records.append({"query": q, "task": ex.task, "prediction": tok.decode(ids, skip_special_tokens=True).strip(),
                            "answers": list(ex.answers or (ex.answer,))})
    return records, _mean_context(ctx, computed)


def _mean_context(ctx: list[int], computed: int) -> dict:
    return {"ctx_tokens": sum(ctx) / len(ctx), "llm_tokens_computed": computed / len(ctx)}


def summarize(records: list[dict], bleu_n: int = 4) -> dict:
    """EM over all queries, EM on the demonstration-dependent tasks, corpus BLEU-n on captions (in %)."""
    from .icl.evaluation import score
    from .icl.metrics import corpus_bleu

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


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------
def _plan(cc: CompareConfig, llm_family: str, log) -> list[tuple[str, str, int, list[int]]]:
    """(method, sampling, training demonstrations, evaluation counts) of every model to train."""
    plan = []
    for method in cc.methods:
        if method == "aim" and llm_family != "decoder":
            log("AIM skipped: its fused demonstration tokens are a causal prefix of a decoder-only LLM; "
                f"this run's LLM is {llm_family!r} (docs/COMPARE.md)")
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


def run_comparison(cc: CompareConfig, log=functools.partial(print, flush=True)) -> dict:
    from .icl.build import build_run
    from .icl.config import load_config
    from .icl.training import pick_device

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
                row = {"method": LABELS[method], "sampling": sampling, "train_demos": train_k, "eval_demos": k,
                       **summarize(records, cc.caption_bleu_n), **ctx, **timing_cache[key], "trainable_params": trainable,
                       "final_loss": sum(losses[-10:]) / len(losses[-10:]), "train_s": train_s}
                rows.append(row)
                log(format_row(row))
    return {"machine": machine(device), "config": dataclasses.asdict(cc), "run_config": base_cfg.to_dict(), "rows": rows,
            "wall_s": time.perf_counter() - t_start, "caption_metric": f"BLEU-{cc.caption_bleu_n}"}


def _stepper(base_run, method, sampling, k, steps, src_model, bank_dir):
    if method == "aim":
        trainer = make_trainer(base_run, "mmict", sampling, k, steps, fresh_model(src_model))
        return Stepper(trainer, build_aim(src_model, base_run, bank_dir))
    return Stepper(make_trainer(base_run, method, sampling, k, steps, fresh_model(src_model)))


def _trained(base_run, method, sampling, k, steps, src_model, bank_dir):
    stepper = _stepper(base_run, method, sampling, k, steps, src_model, bank_dir)
    losses = train(stepper, steps)
    return stepper.model, losses


def machine(device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu})",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": commit,
    }


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
COLUMNS = ["method", "sampling", "train_demos", "eval_demos", "exact_match", "em_what", "caption_bleu", "ctx_tokens",
           "llm_tokens_computed", "step_ms", "step_cpu_ms", "mem_mb", "trainable_params", "final_loss", "n", "mem_kind", "train_s"]
_HEADER = (f"{'method':<16} {'sampling':<11} {'train k':>7} {'eval k':>6} {'EM %':>6} {'EM what_* %':>11} {'BLEU':>6} "
           f"{'ctx tok/q':>9} {'LLM tok/q':>9} {'step ms':>8} {'cpu ms':>8} {'mem MB':>8}")


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def format_row(r: dict) -> str:
    return (f"{r['method']:<16} {r['sampling']:<11} {r['train_demos']:>7} {r['eval_demos']:>6} {_fmt(r['exact_match'], '6.1f')} "
            f"{_fmt(r['em_what'], '11.1f')} {_fmt(r['caption_bleu'], '6.1f')} {r['ctx_tokens']:9.1f} "
            f"{r['llm_tokens_computed']:9.1f} {r['step_ms']:8.1f} {r['step_cpu_ms']:8.1f} {r['mem_mb']:8.2f}")


def format_table(result: dict) -> str:
    m = result["machine"]
    kinds = sorted({r["mem_kind"] for r in result["rows"]})
    lines = [f"{m['date_utc']} UTC, {m['device']}, {m['cpu_threads']} threads, torch {m['torch']}, commit {m['git_commit']}",
             _HEADER] + [format_row(r) for r in result["rows"]]
    lines.append(f"BLEU: caption {result['caption_metric']}. mem MB: {', '.join(kinds)}. "
                 "LLM tok/q: LLM positions computed per query (a shared one-to-many prefix counted once).")
    return "\n".join(lines)


def format_markdown(result: dict) -> str:
    """The table as Markdown (for the README)."""
    head = f"| method | sampling | train k | eval k | EM % | EM what_* % | caption {result['caption_metric']} | ctx tok/query | LLM tok/query | step ms | step CPU ms | mem MB |"
    lines = [head, "|" + "---|" * 12]
    for r in result["rows"]:
        lines.append("| " + " | ".join([r["method"], r["sampling"], str(r["train_demos"]), str(r["eval_demos"]),
                                         _fmt(r["exact_match"], ".1f"), _fmt(r["em_what"], ".1f"), _fmt(r["caption_bleu"], ".1f"),
                                         f"{r['ctx_tokens']:.1f}", f"{r['llm_tokens_computed']:.1f}", f"{r['step_ms']:.1f}", f"{r['step_cpu_ms']:.1f}",
                                         f"{r['mem_mb']:.2f}"]) + " |")
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


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m mmict_kernels.compare", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="comparison YAML (configs/compare_shapes.yaml); flags override it")
    p.add_argument("--run-config", help="the driver run config the methods share (default: the built-in tiny run)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="driver config override (repeatable)")
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
    flags = {"run_config": args.run_config, "methods": args.methods, "samplings": args.sampling, "eval_demos": args.demos,
             "train_demos": args.train_demos, "train_per_count": args.per_count, "steps": args.steps,
             "timing_steps": args.timing_steps, "eval_limit": args.eval_limit, "device": args.device, "threads": args.threads, "output": args.out}
    try:
        cc = load_compare_config(args.config, flags)
        if args.set:
            cc = dataclasses.replace(cc, run_overrides=tuple(cc.run_overrides) + tuple(args.set))
        result = run_comparison(cc)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
