"""AIM end to end: backbone, data, demonstration sampling, training, evaluation, efficiency.

``python -m mmict_kernels.aim --config configs/aim_shapes.yaml`` runs it on the embedded shapes
data on a CPU in minutes (see docs/AIM.md). The backbone is a transformers LLaVA, LLaVA-NeXT,
Qwen2-VL or Qwen2.5-VL model: a local checkpoint folder (``checkpoint``), or a tiny one built
from a config (``backbone``). A random-weight MLLM cannot read images, so a tiny one first gets a
short *backbone warm-up* on the run's training data (the embedded data's explicit questions
"what color is the shape ?", "what shape is it ?", or the user's own JSONL data); it stands in for
a pretrained MLLM and is then frozen. AIM then trains only its projection; on the embedded data
the tasks are ambiguous ("what is this ?"): only the demonstrations say whether a colour or a
shape is asked for.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
import torch

from ..metrics import exact_match
from ..schedule import lr_at
from .backbones import Backbone, backbone_for, default_processor
from .bank import DemonstrationBank
from .config import AIMConfig
from .data import AIMData, build_batch, jsonl_data, make_batch, make_tokenizer, shapes_data
from .model import AIMModel
from .tiny import TinyShape, tiny_model

# A checkpoint's config.model_type -> (backbone family, transformers model class).
CHECKPOINT_MODELS = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}


def load_checkpoint(folder: str, backbone: str = "auto") -> Backbone:
    """A local checkpoint folder (model + its image processor) as an AIM backbone."""
    import transformers

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint: backbone checkpoint folder not found: {folder}")
    model_type = transformers.AutoConfig.from_pretrained(folder).model_type
    if model_type not in CHECKPOINT_MODELS:
        raise ValueError(f"checkpoint: {folder} holds a {model_type!r} model; AIM reads {sorted(CHECKPOINT_MODELS)}")
    if backbone not in ("auto", model_type):
        raise ValueError(f"backbone: {backbone!r} was asked for, but checkpoint {folder} is a {model_type!r} model")
    model = getattr(transformers, CHECKPOINT_MODELS[model_type]).from_pretrained(folder)
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(folder)
    except (OSError, ValueError):
        if model_type != "llava":  # LLaVA 1.5 can resize by itself; tiling and patching need the processor
            raise FileNotFoundError(f"checkpoint: no image processor in {folder} (preprocessor_config.json)") from None
        processor = None
    return backbone_for(model.eval(), processor)


def build_backbone(cfg: AIMConfig, vocab_size: int) -> Backbone:
    """The checkpoint's backbone, or a tiny random-weight one of ``cfg.backbone`` (LLaVA for "auto")."""
    if cfg.checkpoint:
        return load_checkpoint(cfg.checkpoint, cfg.backbone)
    shape = TinyShape(
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        vision_hidden=cfg.vision_hidden,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
    )
    model = tiny_model("llava" if cfg.backbone == "auto" else cfg.backbone, vocab_size, shape, seed=cfg.seed)
    return backbone_for(model, default_processor(model, cfg.image_size))


def warm_up_backbone(
    backbone: Backbone, explicit: AIMData, in_context: AIMData, cfg: AIMConfig, eos_id: int, log=print
) -> list[float]:
    """Fine-tune the WHOLE tiny backbone; it stands in for the pretrained MLLM AIM assumes.

    Each step mixes zero-shot questions (``explicit``: it learns to read images) and
    ``cfg.shots``-shot rows of the in-context tasks (``in_context``), whose demonstrations reach it
    as its own identity-projected states (it learns to use in-context examples, as pretrained
    MLLMs do). The warm-up's demonstrations never enter the AIM run's bank or projection.
    """
    model = AIMModel(backbone, layer=cfg.layer, eos_id=eos_id, backend=cfg.backend)  # identity projection, kept fixed here
    model.proj.requires_grad_(False)
    backbone.requires_grad_(True).train()
    opt = torch.optim.AdamW(backbone.parameters(), lr=cfg.warmup_backbone_lr)
    rng = np.random.default_rng(cfg.seed + 1)
    losses = []
    for step in range(cfg.warmup_backbone_steps):
        idx = rng.choice(len(explicit), size=min(16, len(explicit)), replace=False)
        loss, n = model(build_batch(explicit, explicit, [[int(i)] for i in idx], [[] for _ in idx]))
        if cfg.shots and len(in_context):
            q = rng.choice(len(in_context), size=min(16, len(in_context)), replace=False).tolist()
            loss_icl, n_icl = model(
                make_batch(in_context, in_context, q, cfg.shots, cfg.group_size, rng, "one-to-many", same_pool=True)
            )
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
# Train and evaluate
# ------------------------------------------------------------------------------------------
def aim_lr(step: int, cfg: AIMConfig) -> float:
    """The driver's schedule (to 0, per step) with AIM's warm-up, which reaches ``lr`` one step earlier."""
    return lr_at(step, cfg.steps, cfg, warmup_offset=1)


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
            g["lr"] = aim_lr(step, cfg)
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
            log(f"AIM step {step:4d}  loss {loss.item():.3f}  lr {aim_lr(step, cfg):.2e}  {rate:.0f} queries/s{hit}")
    model.eval()
    return losses


@torch.no_grad()
def evaluate_aim(model: AIMModel, queries: AIMData, pool: AIMData, shots: int, cfg: AIMConfig, tok) -> dict:
    """Exact-match accuracy of greedy answers; demonstrations fixed per group of same-task queries.

    Up to the longest reference answer (+ its eos) is generated (``max_new_tokens``, when set, instead).
    """
    rng = np.random.default_rng(cfg.seed + 3)
    new_tokens = cfg.max_new_tokens or max(len(a) for a in queries.answers) + 1
    correct, total, per_task = 0, 0, {}
    order = list(range(len(queries)))
    for start in range(0, len(order), 64):
        idx = order[start : start + 64]
        batch = make_batch(queries, pool, idx, shots, cfg.group_size, rng, "one-to-many", same_pool=False)
        answers = model.generate(batch, max_new_tokens=new_tokens)
        for q, ids in zip(batch.query_ids, answers):
            ok = exact_match(tok.decode(ids, skip_special_tokens=True), [queries.answer_text[q]]) == 1.0
            correct += ok
            total += 1
            t = per_task.setdefault(queries.tasks[q], [0, 0])
            t[0] += ok
            t[1] += 1
    return {
        "shots": shots,
        "accuracy": correct / max(total, 1),
        "n": total,
        "per_task": {k: v[0] / v[1] for k, v in per_task.items()},
    }


def run(cfg: AIMConfig, log=print) -> dict:
    """Warm-up (tiny backbone only), train AIM, evaluate at ``eval_shots``; writes ``<out>/results.json``."""
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)
    tok = make_tokenizer(cfg)
    eos = tok.eos_token_id
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    backbone = build_backbone(cfg, len(tok)).to(device)

    def data(source, num, tasks, seed):
        if source == "shapes":
            d = shapes_data(num, tasks, seed, cfg.image_size, tok, backbone)
        else:
            d = jsonl_data(source, cfg.image_root, tok, backbone, tasks, cfg.video_fps, cfg.video_frames)
        return d.to(device)

    train = data(cfg.train_data, cfg.train_examples, cfg.tasks, cfg.seed)
    evals = data(cfg.eval_data, cfg.eval_examples, cfg.tasks, cfg.seed + 100)
    warmup_source = None
    if not cfg.checkpoint and cfg.warmup_backbone_steps:
        if cfg.train_data == "shapes":
            # its own images (other seeds): the warm-up never sees the AIM run's training or eval data
            warmup_source = "shapes (own seeds)"
            explicit = data("shapes", cfg.train_examples, cfg.backbone_tasks, cfg.seed + 10)
            in_context = data("shapes", cfg.train_examples, cfg.tasks, cfg.seed + 20)
        else:
            # the user's own training data: zero-shot rows teach reading its images, few-shot rows using context
            warmup_source = cfg.train_data
            explicit = in_context = train
        warm_up_backbone(backbone, explicit, in_context, cfg, eos, log)
    bank = DemonstrationBank(cfg.bank_dir or os.path.join(cfg.out, "bank"), max_bytes=cfg.bank_max_bytes)
    model = AIMModel(
        backbone,
        layer=cfg.layer,
        projection=cfg.projection,
        bank=bank,
        backend=cfg.backend,
        pad_id=tok.pad_token_id,
        eos_id=eos,
        visual_cache_bytes=cfg.visual_cache_bytes,
    )
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    results = {
        "config": dataclasses.asdict(cfg),
        "backbone": backbone.family,
        "warmup_data": warmup_source,
        "eval_before": [evaluate_aim(model, evals, train, s, cfg, tok) for s in cfg.eval_shots],
    }
    losses = train_aim(model, train, cfg, log)
    results["train_losses"] = losses
    results["eval"] = [evaluate_aim(model, evals, train, s, cfg, tok) for s in cfg.eval_shots]
    results["bank"] = {"hit_rate": bank.hit_rate, "entries": len(bank), "bytes": bank.stored_bytes()}
    if model.visual_cache is not None:
        cache = model.visual_cache
        results["visual_cache"] = {"hits": cache.hits, "misses": cache.misses, "entries": len(cache), "bytes": cache.nbytes}
    results["backbone_unchanged"] = all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in model.trainable_state_dict().items()}, os.path.join(cfg.out, "aim_projection.safetensors")
    )
    with open(os.path.join(cfg.out, "results.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    log(format_table(results))
    return results


def format_table(results: dict) -> str:
    lines = ["shots | accuracy before training | accuracy after AIM training | per task (after)", "---|---|---|---"]
    for before, after in zip(results["eval_before"], results["eval"]):
        per = ", ".join(f"{k} {v:.2f}" for k, v in after["per_task"].items())
        lines.append(f"{after['shots']} | {before['accuracy']:.3f} | {after['accuracy']:.3f} | {per}")
    lines.append(
        f"demonstration bank: hit rate {results['bank']['hit_rate']:.2f}, {results['bank']['entries']} entries; "
        f"backbone unchanged: {results['backbone_unchanged']}"
    )
    return "\n".join(lines)
