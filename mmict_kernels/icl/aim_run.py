"""AIM end to end: backbone, data, demonstration sampling, training, evaluation, efficiency.

``python -m mmict_kernels.aim --config configs/aim_shapes.yaml`` runs it on the embedded shapes
data on a CPU in minutes (see docs/AIM.md). The backbone is a transformers LLaVA model: a local
checkpoint folder (``backbone.checkpoint``), or a tiny one built from a config. A random-weight
MLLM cannot read images, so for the tiny one a short *backbone warm-up* first fine-tunes it on
the explicit questions ("what color is the shape ?", "what shape is it ?"); it stands in for a
pretrained MLLM and is then frozen. AIM then trains only its projection on the ambiguous tasks
("what is this ?"): only the demonstrations say whether a colour or a shape is asked for.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import numpy as np
import torch
from torch import nn

from . import shapes as shapes_mod
from .aim import AIMBatch, AIMModel
from .aim_backbones import LlavaBackbone
from .data import load_image, read_jsonl
from .demo_bank import DemonstrationBank
from .metrics import exact_match
from .tokenizer import build_word_tokenizer

PIXEL_MEAN, PIXEL_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@dataclasses.dataclass
class AIMConfig:
    out: str = "runs/aim"
    seed: int = 0
    device: str = "auto"
    # backbone
    checkpoint: str | None = None  # a local LlavaForConditionalGeneration folder; else the tiny config below
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_hidden: int = 32
    image_size: int = 32
    patch_size: int = 8
    warmup_backbone_steps: int = 300  # tiny backbone only: fine-tune on the explicit tasks, then freeze
    warmup_backbone_lr: float = 3e-3
    # data: "shapes" (embedded) or a JSONL file (docs/DRIVER.md format: image, prompt, answer, task)
    train_data: str = "shapes"
    eval_data: str = "shapes"
    image_root: str | None = None  # image paths in the JSONL are relative to it (default: the file's folder)
    train_examples: int = 800
    eval_examples: int = 200
    tasks: tuple = ("what_color", "what_shape")
    backbone_tasks: tuple = ("color", "shape")  # the warm-up's zero-shot questions
    # AIM
    shots: int = 2
    sampling: str = "one_to_many"  # or "random" (one demonstration set per query)
    group_size: int = 4
    layer: int = -1
    projection: str = "linear"
    bank_dir: str | None = None  # default: <out>/bank
    bank_max_bytes: int | None = None
    # optimisation (only the projection trains)
    steps: int = 150
    batch_queries: int = 16
    lr: float = 2e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    backend: str = "auto"
    eval_shots: tuple = (0, 2)

    @classmethod
    def from_dict(cls, values: dict) -> "AIMConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"AIM config: unknown keys {unknown}; known: {sorted(names)}")
        cfg = cls(**values)
        if cfg.sampling not in ("one_to_many", "random"):
            raise ValueError(f"sampling: expected 'one_to_many' or 'random', got {cfg.sampling!r}")
        if cfg.shots < 0 or cfg.group_size < 1 or cfg.batch_queries < 1:
            raise ValueError("shots >= 0, group_size >= 1 and batch_queries >= 1 are required")
        return cfg


# ------------------------------------------------------------------------------------------
# Data: pixels + token ids
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class AIMData:
    pixels: torch.Tensor  # (N, 3, S, S)
    tasks: list[str]
    prompts: list[list[int]]
    answers: list[list[int]]
    answer_text: list[str]

    def __len__(self):
        return len(self.tasks)

    def by_task(self) -> dict[str, np.ndarray]:
        t = np.array(self.tasks)
        return {task: np.flatnonzero(t == task) for task in sorted(set(self.tasks))}


def make_tokenizer(cfg: "AIMConfig"):
    """The checkpoint's own tokenizer, or a word tokenizer over the run's texts (tiny backbone)."""
    if cfg.checkpoint:
        from .tokenizer import load_tokenizer

        return load_tokenizer(cfg.checkpoint)
    texts = list(shapes_mod.shapes_vocabulary())
    for path in {cfg.train_data, cfg.eval_data} - {"shapes"}:
        texts += [r["prompt"] + " " + r["answer"] for _, r in read_jsonl(path)]
    return build_word_tokenizer(texts)


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _pixels(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(255).permute(0, 3, 1, 2)
    return (x - torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)) / torch.tensor(PIXEL_STD).view(1, 3, 1, 1)


def shapes_data(num: int, tasks, seed: int, image_size: int, tok) -> AIMData:
    records, images = shapes_mod.make_shapes(num, tuple(tasks), seed=seed, image_size=image_size)
    return AIMData(_pixels(images), [r["task"] for r in records], [encode(tok, r["prompt"]) for r in records],
                   [encode(tok, r["answer"]) for r in records], [r["answer"] for r in records])


def jsonl_data(path: str, image_root: str | None, image_size: int, tok) -> AIMData:
    """Own data: one JSON object per line with ``image``, ``prompt``, ``answer`` (optional ``task``)."""
    root = image_root or os.path.dirname(os.path.abspath(path))
    records = read_jsonl(path)
    images = []
    for lineno, r in records:
        if "frames" in r:
            raise ValueError(f"data file {path}, line {lineno}: AIM takes single images ('image'), not 'frames'")
        images.append(load_image(os.path.join(root, r["image"]), image_size, f"{path}, line {lineno}"))
    recs = [r for _, r in records]
    return AIMData(_pixels(np.stack(images)), [r.get("task", "default") for r in recs], [encode(tok, r["prompt"]) for r in recs],
                   [encode(tok, r["answer"]) for r in recs], [r["answer"] for r in recs])


# ------------------------------------------------------------------------------------------
# Backbone
# ------------------------------------------------------------------------------------------
def build_llava(cfg: AIMConfig, vocab_size: int) -> nn.Module:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if cfg.checkpoint:
        if not os.path.isdir(cfg.checkpoint):
            raise FileNotFoundError(f"backbone checkpoint folder not found: {cfg.checkpoint}")
        return LlavaForConditionalGeneration.from_pretrained(cfg.checkpoint)
    vision = CLIPVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=2 * cfg.vision_hidden, num_hidden_layers=2,
                              num_attention_heads=4, image_size=cfg.image_size, patch_size=cfg.patch_size)
    text = LlamaConfig(hidden_size=cfg.hidden_size, intermediate_size=2 * cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                       num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, vocab_size=vocab_size + 1,
                       max_position_embeddings=1024, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=vocab_size, vision_feature_layer=-1,
                         vision_feature_select_strategy="full")
    torch.manual_seed(cfg.seed)
    return LlavaForConditionalGeneration(config)


def warm_up_backbone(llava: nn.Module, explicit: AIMData, in_context: AIMData, cfg: AIMConfig, eos_id: int, log=print) -> list[float]:
    """Fine-tune the WHOLE tiny backbone; it stands in for the pretrained MLLM AIM assumes.

    Each step mixes zero-shot explicit questions (``explicit``: it learns to read images) and
    ``cfg.shots``-shot rows of the in-context tasks (``in_context``), whose demonstrations reach it
    as its own identity-projected states (it learns to use in-context examples, as pretrained
    MLLMs do). The warm-up's demonstrations never enter the AIM run's bank or projection.
    """
    backbone = LlavaBackbone(llava)
    model = AIMModel(backbone, layer=cfg.layer, eos_id=eos_id, backend=cfg.backend)  # identity projection, kept fixed here
    model.proj.requires_grad_(False)
    backbone.requires_grad_(True).train()
    opt = torch.optim.AdamW(backbone.parameters(), lr=cfg.warmup_backbone_lr)
    rng = np.random.default_rng(cfg.seed + 1)
    losses = []
    for step in range(cfg.warmup_backbone_steps):
        idx = rng.choice(len(explicit), size=min(16, len(explicit)), replace=False)
        loss, n = model(_batch(explicit, explicit, [[int(i)] for i in idx], [[] for _ in idx]))
        if cfg.shots and len(in_context):
            q = rng.choice(len(in_context), size=min(16, len(in_context)), replace=False).tolist()
            loss_icl, n_icl = model(make_batch(in_context, in_context, q, cfg.shots, cfg.group_size, rng, "one_to_many", same_pool=True))
            loss, n = loss + loss_icl, n + n_icl
        loss = loss / max(n, 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == cfg.warmup_backbone_steps - 1:
            log(f"backbone warm-up step {step:4d}  loss {loss.item():.3f}")
    backbone.requires_grad_(False).eval()
    return losses


# ------------------------------------------------------------------------------------------
# Sampling and batching
# ------------------------------------------------------------------------------------------
def sample_groups(queries: AIMData, pool: AIMData, query_idx: list[int], shots: int, group_size: int, rng, same_pool: bool):
    """Groups of same-task queries and their demonstrations (from ``pool``, same task, never a query of the group)."""
    by_task_pool = pool.by_task()
    groups, demos = [], []
    by_task = {}
    for i in query_idx:
        by_task.setdefault(queries.tasks[i], []).append(i)
    for task, members in by_task.items():
        for start in range(0, len(members), group_size):
            group = members[start : start + group_size]
            cands = by_task_pool[task]
            if same_pool:
                cands = cands[~np.isin(cands, group)]
            if len(cands) < shots:
                raise ValueError(f"only {len(cands)} demonstration candidates for task {task!r}, need shots={shots}")
            groups.append(group)
            demos.append([int(d) for d in rng.choice(cands, shots, replace=False)] if shots else [])
    return groups, demos


def _batch(queries: AIMData, pool: AIMData, groups: list[list[int]], group_demos: list[list[int]]) -> AIMBatch:
    distinct = sorted({d for g in group_demos for d in g})
    where = {d: i for i, d in enumerate(distinct)}
    q_idx = [q for g in groups for q in g]
    q_group = [gi for gi, g in enumerate(groups) for _ in g]
    return AIMBatch(
        demo_images=pool.pixels[distinct] if distinct else None,
        demo_text=[pool.prompts[d] + pool.answers[d] for d in distinct],
        group_demos=[[where[d] for d in g] for g in group_demos],
        query_images=queries.pixels[q_idx],
        query_group=torch.tensor(q_group, dtype=torch.long),
        query_prompt=[queries.prompts[q] for q in q_idx],
        query_answer=[queries.answers[q] for q in q_idx],
        query_ids=q_idx,
    )


def make_batch(queries, pool, query_idx, shots, group_size, rng, sampling: str, same_pool: bool) -> AIMBatch:
    gs = group_size if sampling == "one_to_many" else 1
    groups, demos = sample_groups(queries, pool, query_idx, shots, gs, rng, same_pool)
    return _batch(queries, pool, groups, demos)


# ------------------------------------------------------------------------------------------
# Train and evaluate
# ------------------------------------------------------------------------------------------
def lr_at(step: int, cfg: AIMConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_aim(model: AIMModel, train: AIMData, cfg: AIMConfig, log=print) -> list[float]:
    """Train the projection only; returns the per-step losses."""
    params = [p for p in model.proj.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed + 2)
    losses = []
    model.train()
    t0, seen = time.perf_counter(), 0
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        q = rng.choice(len(train), size=min(cfg.batch_queries, len(train)), replace=False).tolist()
        batch = make_batch(train, train, q, cfg.shots, cfg.group_size, rng, cfg.sampling, same_pool=True)
        loss, n = model(batch)
        loss = loss / max(n, 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        seen += len(q)
        if step % 25 == 0 or step == cfg.steps - 1:
            rate = seen / (time.perf_counter() - t0)
            hit = f"  bank hit {model.bank.hit_rate:.2f}" if model.bank is not None else ""
            log(f"AIM step {step:4d}  loss {loss.item():.3f}  lr {lr_at(step, cfg):.2e}  {rate:.0f} queries/s{hit}")
    model.eval()
    return losses


@torch.no_grad()
def evaluate_aim(model: AIMModel, queries: AIMData, pool: AIMData, shots: int, cfg: AIMConfig, tok) -> dict:
    """Exact-match accuracy of greedy answers; demonstrations fixed per group of same-task queries."""
    rng = np.random.default_rng(cfg.seed + 3)
    correct, total, per_task = 0, 0, {}
    order = list(range(len(queries)))
    for start in range(0, len(order), 64):
        idx = order[start : start + 64]
        batch = make_batch(queries, pool, idx, shots, cfg.group_size, rng, "one_to_many", same_pool=False)
        answers = model.generate(batch, max_new_tokens=3)
        for q, ids in zip(batch.query_ids, answers):
            ok = exact_match(tok.decode(ids, skip_special_tokens=True), [queries.answer_text[q]]) == 1.0
            correct += ok
            total += 1
            t = per_task.setdefault(queries.tasks[q], [0, 0])
            t[0] += ok
            t[1] += 1
    return {"shots": shots, "accuracy": correct / max(total, 1), "n": total, "per_task": {k: v[0] / v[1] for k, v in per_task.items()}}


def run(cfg: AIMConfig, log=print) -> dict:
    """Warm-up (tiny backbone only), train AIM, evaluate at ``eval_shots``; writes ``<out>/results.json``."""
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)
    tok = make_tokenizer(cfg)
    eos = tok.eos_token_id
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    llava = build_llava(cfg, len(tok)).to(device)

    def data(source, num, tasks, seed):
        d = shapes_data(num, tasks, seed, cfg.image_size, tok) if source == "shapes" else jsonl_data(source, cfg.image_root, cfg.image_size, tok)
        d.pixels = d.pixels.to(device)
        return d

    if not cfg.checkpoint and cfg.warmup_backbone_steps:
        # its own images (another seed): the warm-up never sees the AIM run's training or eval data
        warm_up_backbone(llava, data("shapes", cfg.train_examples, cfg.backbone_tasks, cfg.seed + 10),
                         data("shapes", cfg.train_examples, cfg.tasks, cfg.seed + 20), cfg, eos, log)
    train = data(cfg.train_data, cfg.train_examples, cfg.tasks, cfg.seed)
    evals = data(cfg.eval_data, cfg.eval_examples, cfg.tasks, cfg.seed + 100)
    bank = DemonstrationBank(cfg.bank_dir or os.path.join(cfg.out, "bank"), max_bytes=cfg.bank_max_bytes)
    model = AIMModel(LlavaBackbone(llava), layer=cfg.layer, projection=cfg.projection, bank=bank, backend=cfg.backend,
                     pad_id=tok.pad_token_id, eos_id=eos)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    results = {"config": dataclasses.asdict(cfg), "eval_before": [evaluate_aim(model, evals, train, s, cfg, tok) for s in cfg.eval_shots]}
    losses = train_aim(model, train, cfg, log)
    results["train_losses"] = losses
    results["eval"] = [evaluate_aim(model, evals, train, s, cfg, tok) for s in cfg.eval_shots]
    results["bank"] = {"hit_rate": bank.hit_rate, "entries": len(bank), "bytes": bank.stored_bytes()}
    results["backbone_unchanged"] = all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.trainable_state_dict().items()}, os.path.join(cfg.out, "aim_projection.safetensors"))
    with open(os.path.join(cfg.out, "results.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    log(format_table(results))
    return results


def format_table(results: dict) -> str:
    lines = ["shots | accuracy before training | accuracy after AIM training | per task (after)", "---|---|---|---"]
    for before, after in zip(results["eval_before"], results["eval"]):
        per = ", ".join(f"{k} {v:.2f}" for k, v in after["per_task"].items())
        lines.append(f"{after['shots']} | {before['accuracy']:.3f} | {after['accuracy']:.3f} | {per}")
    lines.append(f"demonstration bank: hit rate {results['bank']['hit_rate']:.2f}, {results['bank']['entries']} entries; "
                 f"backbone unchanged: {results['backbone_unchanged']}")
    return "\n".join(lines)
