"""Module-level rows: FusedMHub against transformers' Q-Former, and the whole MMICT step.

Q-Former cases (GPU: transformers' default config, BERT-base width 768, 12 layers, 12 x 64
heads, cross-attention every 2nd layer from 1408-wide ViT-g features; CPU: a tiny config):
- ``qformer_blip2``: ``Blip2QFormerModel``, 32 learned queries x 257 image tokens.
- ``qformer_instructblip``: ``InstructBlipQFormerModel``, 32 queries + 32 ragged text tokens.
Providers: transformers eager (``hf-eager``), SDPA (``hf-sdpa``), ``torch.compile`` of the SDPA
model (``hf-sdpa-compiled``), and ``FusedMHub.from_hf(hf, backend=b)`` for each of our
backends (``fused-mhub-<b>``), all from the same weights, in eval mode (dropout off so
every provider computes the same function), forward with autograd recording.

FLOPs come from torch's FLOP formulas (``bench_timing.count_flops``, FlopCounterMode's) over one eager forward (and
forward + backward) of the transformers model: it counts every matmul from its shapes
(2 FLOPs per multiply-add). Bytes are a loose lower bound: the weights, the inputs and the
output cross HBM once (backward: weights read + gradients written, output gradient read).
"""

from __future__ import annotations

import copy

import torch
from bench_measure import measure, timing_config
from bench_results import Skip, make_row, print_row
from bench_timing import count_flops, rotation_count

GPU_QFORMER = dict(batch=64, num_query=32, text=32, image_tokens=257, config={})
CPU_QFORMER = dict(
    batch=2, num_query=8, text=8, image_tokens=17,
    config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, encoder_hidden_size=48, vocab_size=100),
)  # fmt: skip


def qformer_shape(device, quick: bool) -> dict:
    if device.type == "cuda":
        return GPU_QFORMER
    # One layer (self + cross attention) in --quick: the Triton interpreter takes ~1 s per kernel launch.
    return {**CPU_QFORMER, "config": {**CPU_QFORMER["config"], "num_hidden_layers": 1 if quick else 2}}


def _build_hf(flavor: str, shape: dict, device, dtype):
    from transformers import Blip2QFormerConfig, Blip2QFormerModel, InstructBlipQFormerConfig, InstructBlipQFormerModel

    torch.manual_seed(0)
    if flavor == "blip2":
        config = Blip2QFormerConfig(**{k: v for k, v in shape["config"].items() if k != "vocab_size"})
        model = Blip2QFormerModel(config)
    else:
        model = InstructBlipQFormerModel(InstructBlipQFormerConfig(**shape["config"]))
    return model.to(device=device, dtype=dtype).eval()


def _inputs(flavor: str, model, shape: dict, device, dtype, seed: int) -> dict:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    b, nq, t = shape["batch"], shape["num_query"], shape["text"]
    x = {
        "query_embeds": torch.randn(b, nq, cfg.hidden_size, generator=g).to(device, dtype),
        "encoder_hidden_states": torch.randn(b, shape["image_tokens"], cfg.encoder_hidden_size, generator=g).to(device, dtype),
    }
    if flavor == "instructblip":
        lengths = torch.randint(1, t + 1, (b,), generator=torch.Generator().manual_seed(1234))
        mask = torch.ones(b, nq + t, dtype=torch.long)
        mask[:, nq:] = (torch.arange(t)[None, :] < lengths[:, None]).long()  # right-padded text; queries always valid
        x["input_ids"] = torch.randint(0, cfg.vocab_size, (b, t), generator=g).to(device)
        x["attention_mask"] = mask.to(device)
    return x


def _count_flops(model, x: dict) -> tuple[float, float]:
    def fwd_bwd():
        out = model(**x).last_hidden_state
        out.backward(torch.ones_like(out))

    fwd = count_flops(lambda: model(**x))
    both = count_flops(fwd_bwd)
    model.zero_grad(set_to_none=True)
    return fwd, both


def _providers(flavor, hf, device, options):
    """(name, ours, build, compiled) where build() returns the module or raises with the reason."""
    from mmict_kernels import backends

    def hf_with(impl):
        def build():
            m = copy.deepcopy(hf)
            m.set_attn_implementation(impl)
            return m

        return build

    def compiled():
        if options.no_compile:
            raise RuntimeError("skipped: --no-compile (torch.compile of the Q-Former takes minutes)")
        if device.type == "cpu" and options.quick:
            raise RuntimeError("skipped in --quick on CPU: torch.compile of the Q-Former takes minutes here")
        m = hf_with("sdpa")()
        return torch.compile(m)

    def fused(backend):
        def build():
            try:
                from mmict_kernels import FusedMHub
            except Exception as exc:
                raise RuntimeError(f"FusedMHub is not importable ({type(exc).__name__}: {exc})") from None
            head_dim = hf.config.hidden_size // hf.config.num_attention_heads
            for op in ("hub_self_attention", "hub_cross_attention") if backend != "auto" else ():
                why = backends.explain(op, device_type=device.type, dtype=next(hf.parameters()).dtype, head_dim=head_dim)[backend]
                if why is not None:
                    raise RuntimeError(f"{op}: {why}")
            return FusedMHub.from_hf(copy.deepcopy(hf), backend=backend)

        return build

    result = [
        ("hf-eager", False, hf_with("eager"), False),
        ("hf-sdpa", False, hf_with("sdpa"), False),
        ("hf-sdpa-compiled", False, compiled, True),
    ]
    # "auto" picks per op (on a GPU: cuda where it has a kernel, else triton): the user's default.
    ours = ("torch", "triton", "cuda") + (("auto",) if device.type == "cuda" else ())
    result += [(f"fused-mhub-{b}", True, fused(b), False) for b in ours]
    return result


def run_qformer(device, dtype, modes, options, floors, results) -> None:
    quick = options.quick
    shape = qformer_shape(device, quick)
    dname = str(dtype).replace("torch.", "")
    cfg = timing_config(device, quick)
    for flavor in ("blip2", "instructblip"):
        op = f"qformer_{flavor}"
        try:
            hf = _build_hf(flavor, shape, device, dtype)
        except Exception as exc:
            results.add_skip(
                Skip(op, "all", "-", dname, f"transformers' Q-Former could not be built: {type(exc).__name__}: {exc}")
            )
            print(f"\n== {op}: transformers' Q-Former could not be built ({exc})")
            continue
        c = hf.config
        label = (
            f"B={shape['batch']} Nq={shape['num_query']}" + (f"+{shape['text']} text" if flavor == "instructblip" else "")
            + f" image={shape['image_tokens']} hidden={c.hidden_size} layers={c.num_hidden_layers} heads={c.num_attention_heads}"
        )  # fmt: skip
        x0 = _inputs(flavor, hf, shape, device, dtype, 0)
        hf.set_attn_implementation("eager")
        flops_fwd, flops_both = _count_flops(hf, x0)
        flops = {"fwd": flops_fwd, "bwd": flops_both - flops_fwd, "fwd+bwd": flops_both}
        p_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
        io_bytes = sum(t.numel() * t.element_size() for t in x0.values())
        out_bytes = (
            shape["batch"]
            * (shape["num_query"] + (shape["text"] if flavor == "instructblip" else 0))
            * c.hidden_size
            * hf.dtype.itemsize
        )
        fwd_bytes = p_bytes + io_bytes + out_bytes
        nbytes = {"fwd": fwd_bytes, "bwd": 2 * p_bytes + out_bytes, "fwd+bwd": fwd_bytes + 2 * p_bytes + out_bytes}
        n_sets = rotation_count(io_bytes + 3 * out_bytes, device, cap=8)
        input_sets = [x0] + [_inputs(flavor, hf, shape, device, dtype, s) for s in range(1, n_sets)]
        with torch.no_grad():
            ref32 = (
                copy.deepcopy(hf)
                .float()(**{k: (t.float() if t.is_floating_point() else t) for k, t in x0.items()})
                .last_hidden_state
            )
            ref_err = (hf(**x0).last_hidden_state.float() - ref32).abs().max().item()
        tol = 4 * ref_err + (1e-4 if dtype == torch.float32 else 2e-3)
        # compared at the token positions: FusedMHub gives zeros at padded text slots (transformers computes them)
        tokens = x0["attention_mask"][..., None].float() if "attention_mask" in x0 else 1.0
        print(f"\n== {op} | {label} | {dname} | {n_sets} input set(s) rotated | {flops_fwd / 1e9:.2f} GFLOP fwd")
        for name, ours, build, is_compiled in _providers(flavor, hf, device, options):
            if not options.in_phase(is_compiled):
                continue
            try:
                model = build()
                out = model(**x0).last_hidden_state.detach()  # with autograd, as timed: a compiled model compiles once
                err = ((out.float() - ref32) * tokens).abs().max().item()
                if not err <= tol:
                    raise RuntimeError(
                        f"output differs from transformers: max abs error {err:.3g} > tolerance {tol:.3g}; not timed"
                    )
            except Exception as exc:
                reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
                results.add_skip(Skip(op, name, label, dname, reason))
                print(f"   {name:<18} unavailable: {reason}")
                continue
            params = [p for p in model.parameters() if p.requires_grad]
            fn = lambda x, m=model: m(**x).last_hidden_state  # noqa: E731
            for mode in modes:
                try:
                    timing, peak = measure(fn, input_sets, lambda x, ps=params: ps, mode, device, cfg)
                except Exception as exc:
                    reason = f"{mode} failed: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
                    results.add_skip(Skip(op, name, label, dname, reason))
                    print(f"   {name:<18} {mode:<8} {reason}")
                    continue
                row = make_row(op, name, mode, label, dname, timing, peak, flops[mode], nbytes[mode], floors, ours)
                results.add_row(row)
                print_row(row)
            del model
        del input_sets, hf
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------
# The MMICT step (driver: mmict_kernels/icl/)
# ---------------------------------------------------------------------------------------
# 8 queries x 4 demonstrations, one-to-many: 2 groups of 4 queries, each group sharing one
# 4-demonstration set (so one shared LLM prefix per group).
STEP_QUERIES, STEP_DEMOS, STEP_GROUP = 8, 4, 4
# GPU: the real M-Hub (BERT-base Q-Former) on 257 tokens x 1408 features (a 1-layer ViT-g-wide
# encoder: it is frozen and its features are cached, only their shape matters), a 4-layer
# Llama-style LLM of width 2048 (16 x 128 heads). CPU: the driver's tiny defaults.
GPU_STEP_MODEL = dict(
    image_size=224,
    vision_config=dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=1, num_attention_heads=16, patch_size=14),
    mhub_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     cross_attention_frequency=2, max_position_embeddings=512),
    llm_type="llama",
    llm_config=dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=4, num_attention_heads=16,
                    num_key_value_heads=16, max_position_embeddings=2048),
)  # fmt: skip
# The CPU rows of benchmarks/cpu_speed.py and memory.py: the same M-Hub on the same features, a
# 4-layer Llama-style LLM of width 1024 (8 x 128 heads).
CPU_STEP_MODEL = {**GPU_STEP_MODEL, "llm_config": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                                       num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048)}  # fmt: skip
# Three ways of running the same step (name, ours, model config, official):
# - mmict-fused: ours (FusedMHub, image K/V once per image, every turn in one batched call, the
#   shared-prefix cache: each group's demonstrations run through the LLM once);
# - mmict-baseline: the driver with transformers' Q-Former (still one batched call over the
#   de-duplicated turns) and every row with its own copy of the demonstrations in the LLM;
# - mmict-official: what the authors' code (KDEGroup/MMICT, blip2_t5.py / blip2_opt.py forward)
#   runs: transformers' Q-Former once per turn at batch 1 in a Python loop, every demonstration
#   recomputed for every row (dialog) it appears in, each row's LLM context its own copy.
STEP_PROVIDERS = (
    ("mmict-fused", True, dict(mhub_impl="fused", use_prefix_cache=True), False),
    ("mmict-baseline", False, dict(mhub_impl="transformers", use_prefix_cache=False), False),
    ("mmict-official", False, dict(mhub_impl="transformers", use_prefix_cache=False), True),
)


def official_forward(model, batch):
    """The official code's forward on the driver's batch: (sum of the target NLL, target count).

    The authors' ``forward`` loops over the dialogs (one LLM row each: its demonstrations, then its
    query) and calls ``Qformer.bert`` once per turn with batch 1; a demonstration shared by several
    rows is computed again for each. Here: the same loop over (row, turn) pairs on the driver's
    batch (its turns, images and LLM layout), transformers' Q-Former at batch 1, ``ln_vision`` per
    call (the official code normalises every turn's image features), then the FC, the LLM with each
    row's own context, and the driver's loss. The frozen image encoder is skipped, as in every
    provider (its features are cached).
    """
    import torch.nn.functional as F

    from mmict_kernels.icl.batch import IGNORE

    nq = model.num_query_tokens
    span = nq + batch.turn_ids.shape[1]
    llm = batch.llm
    width = llm.token_ids.shape[1]
    rows = (llm.feat_positions // width).tolist()
    turns = (llm.feat_sources // span).tolist()
    pairs = list(dict.fromkeys(zip(rows, turns)))  # (row, turn) in the rows' order: one M-Hub call each
    slot = {pair: i for i, pair in enumerate(pairs)}
    outputs = []
    for _, u in pairs:
        image = batch.turn_image[u : u + 1]
        mask = torch.cat([batch.turn_mask.new_ones(1, nq), batch.turn_mask[u : u + 1]], dim=1)
        out = model.mhub(
            input_ids=batch.turn_ids[u : u + 1],
            attention_mask=mask,
            encoder_hidden_states=model.ln_vision(batch.images[image]),
            encoder_attention_mask=batch.image_mask[image],
        )
        outputs.append(out.last_hidden_state)
    flat = torch.cat(outputs).flatten(0, 1)
    index = torch.tensor([slot[p] * span for p in zip(rows, turns)], device=flat.device) + llm.feat_sources % span
    embeds = model.llm.get_input_embeddings()(llm.token_ids)
    feats = model.proj(flat[index])
    embeds = embeds.flatten(0, 1).index_put((llm.feat_positions,), feats.to(embeds.dtype)).view_as(embeds)
    first, last = llm.target_span
    logits = model.llm(inputs_embeds=embeds, attention_mask=llm.attention_mask, use_cache=False).logits[:, first:last]
    targets = llm.labels[:, first + 1 : last + 1]
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return nll, batch.num_label_tokens


def make_step_trainer(device, provider: str, out_dir: str, model_config: dict | None = None):
    """The driver's Trainer for one of STEP_PROVIDERS (``model_config``: default GPU_STEP_MODEL on a GPU, tiny on CPU)."""
    import types

    from mmict_kernels.icl.training import Trainer

    _, _, provider_model, official = next(p for p in STEP_PROVIDERS if p[0] == provider)
    trainer = Trainer(_step_config(device, provider_model, out_dir, model_config))
    if official:
        if trainer.run.model.llm_family != "decoder":
            raise RuntimeError("mmict-official is written for a decoder-only LLM here (the step's LLM is Llama-style)")
        trainer.model.forward = types.MethodType(official_forward, trainer.model)
    return trainer


def _step_config(device, provider_model: dict, out_dir: str, model_config: dict | None = None):
    from mmict_kernels.icl.config import config_from_dict

    base = model_config if model_config is not None else (GPU_STEP_MODEL if device.type == "cuda" else {})
    model = {**base, **provider_model}
    return config_from_dict(
        {
            "model": model,
            "data": {"shapes_train_size": 64, "shapes_eval_size": 16},
            "demos": {"num_demos": STEP_DEMOS, "sampling": "one-to-many", "group_size": STEP_GROUP},
            "train": {"batch_size": STEP_QUERIES, "max_steps": 10_000, "device": device.type, "progress": False,
                      "output_dir": out_dir, "log_every": 10_000, "precision": "bf16"},
            "eval": {"batch_size": STEP_QUERIES, "max_new_tokens": 4},
        }
    )  # fmt: skip


def _step_flops(fn) -> float:
    """FLOPs of one step (``bench_timing.count_flops``: torch's formulas, on the no-grad generate path too)."""
    return count_flops(lambda: fn(0))


def run_mmict_step(device, dtype, modes, options, floors, results) -> None:
    """A whole MMICT training step and evaluation step, ours against the batched baseline and the official code's step.

    ``train_step``: ``Trainer.train_step`` (batch building, forward, backward, clipping, AdamW),
    the batch rotated with the step index. ``eval_step``: ``evaluation.predict`` on one batch of
    8 queries (2 groups x 4 demonstrations; greedy, 4 new tokens). Autocast bf16 on GPU (the
    driver's setting), fp32 on CPU; ``--dtype`` does not apply. FLOPs: ``count_flops`` over one
    step; bytes: every weight read once plus the trainable weights' gradient and AdamW state
    traffic (a loose lower bound).
    """
    import tempfile

    op, dname = "mmict_step", "bf16-autocast" if device.type == "cuda" else "float32"
    label = f"{STEP_QUERIES} queries x {STEP_DEMOS} demos ({STEP_QUERIES // STEP_GROUP} groups of {STEP_GROUP})"
    try:
        from mmict_kernels.icl import evaluation
    except Exception as exc:
        reason = f"not available yet: the MMICT driver (mmict_kernels/icl/) is not importable ({type(exc).__name__}: {exc})"
        results.add_skip(Skip(op, "all", label, dname, reason))
        print(f"\n== {op}: {reason}")
        return
    cfg = timing_config(device, options.quick)
    print(
        f"\n== {op} | {label} | {'GPU model: M-Hub 768x12, LLM 2048x4 (llama)' if device.type == 'cuda' else 'tiny driver model'} | {dname}"
    )
    from bench_timing import bench, peak_extra_memory_mb

    for name, ours, provider_model, official in STEP_PROVIDERS:
        try:
            with tempfile.TemporaryDirectory() as out_dir:
                trainer = make_step_trainer(device, name, out_dir)
                run = trainer.run
                shape = f"{label}; {run.model.mhub.config.hidden_size}-wide M-Hub, LLM {run.model.llm.config.hidden_size}"
                params = list(run.model.parameters())
                trainable = trainer.params
                weight_bytes = sum(p.numel() * p.element_size() for p in params)
                train_bytes = weight_bytes + 5 * sum(
                    p.numel() * p.element_size() for p in trainable
                )  # grad w, then grad r + Adam m, v r/w
                steps = iter(range(10**9))

                def train(i):
                    trainer.train_step(next(steps))

                def evaluate(i):
                    evaluation.predict(run, STEP_DEMOS, "one-to-many", STEP_GROUP, STEP_QUERIES, max_new_tokens=4,
                                       device=trainer.device, use_prefix_cache=provider_model["use_prefix_cache"], limit=STEP_QUERIES // STEP_GROUP)  # fmt: skip

                for mode, fn in (("train_step", train), ("eval_step", evaluate)):
                    if mode == "train_step" and not any(m in modes for m in ("bwd", "fwd+bwd")):
                        continue
                    if mode == "eval_step" and "fwd" not in modes:
                        continue
                    if mode == "eval_step" and official:
                        reason = "eval_step: the official code generates without demonstrations (nothing comparable to time)"
                        results.add_skip(Skip(op, name, label, dname, reason))
                        print(f"   {name:<18} {reason}")
                        continue
                    fn(0)  # build, warm, and check it runs
                    flops = _step_flops(fn)
                    timing = bench(fn, 1, device, warmup_ms=cfg.warmup_ms, rep_ms=cfg.rep_ms, min_reps=cfg.min_reps,
                                   max_reps=min(cfg.max_reps, 50), untimed_first=cfg.untimed_first)  # fmt: skip
                    peak = peak_extra_memory_mb(lambda: fn(0), device)
                    nbytes = train_bytes if mode == "train_step" else weight_bytes
                    row = make_row(op, name, mode, shape, dname, timing, peak, flops, nbytes, floors, ours)
                    results.add_row(row)
                    print_row(row)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
            results.add_skip(Skip(op, name, label, dname, reason))
            print(f"   {name:<18} unavailable: {reason}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
