"""The start-up summary a training run prints: data, steps, parameters, device, precision, kernels.

Everything a researcher checks before leaving a run alone: examples per split, steps per epoch
and in all, the batch split (processes x micro-batches), trainable and frozen parameters, the
device and the compute dtype, the parallel strategy, and the backend each op resolved to (and
why the faster ones were refused).
"""

from __future__ import annotations

import torch

from .. import backends

MHUB_OPS = ("hub_cross_attention", "hub_self_attention")
EPILOGUE_OPS = ("bias_gelu", "bias_dropout_add_layernorm")


def _op_line(op: str, backend: str, device_type: str, dtype: torch.dtype, head_dim: int, dropout: bool) -> str:
    facts = dict(device_type=device_type, dtype=dtype, head_dim=head_dim, dropout=dropout)
    try:
        chosen, _ = backends.resolve(op, backends.module_choice(op, backend, **facts), **facts)
    except (backends.BackendUnavailableError, ImportError) as exc:
        return f"{op}: unavailable ({exc})"
    faster = backends.BACKENDS[: backends.BACKENDS.index(chosen)]
    reasons = backends.explain(op, **facts)
    refused = "; ".join(f"{b}: {reasons[b]}" for b in faster if reasons.get(b))
    return f"{op}: {chosen}" + (f" (refused {refused})" if refused else "")


def op_backends(model, backend: str, device: torch.device, dtype: torch.dtype, shared_prefix: bool) -> list[str]:
    """The backend each custom op resolves to for this model on ``device`` in ``dtype``."""
    lines = []
    mhub = model.mhub
    head_dim = getattr(mhub, "head_dim", None)
    if head_dim is None:
        lines.append(f"M-Hub: {type(mhub).__name__} (transformers' attention, no custom ops)")
    else:
        dropout = getattr(mhub, "attention_dropout", 0.0) > 0
        lines += [_op_line(op, backend, device.type, dtype, head_dim, dropout) for op in MHUB_OPS]
        hidden = mhub.config.hidden_size
        gpu = backends.effective_device_type(device.type) == "cuda"
        for op in EPILOGUE_OPS:
            if gpu or backend == "triton":
                lines.append(_op_line(op, "triton" if backend == "triton" else "auto", device.type, dtype, hidden, False))
            else:
                lines.append(f"{op}: torch (unfused: CPU tensors)")
    if shared_prefix:
        cfg = model.llm.config
        llm_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        lines.append(_op_line("prefix_attention", model.prefix_backend, device.type, dtype, llm_head, False))
    return lines


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, frozen) parameter counts of the whole model (global sizes, also when sharded)."""
    trainable = sum(p.numel() for p in model.trainable_parameters())
    total = sum(p.numel() for p in model.parameters())
    return trainable, total - trainable


def summary_lines(trainer) -> list[str]:
    """The lines of :class:`~mmict_kernels.icl.training.Trainer`'s start-up summary."""
    cfg, t = trainer.cfg, trainer.cfg.train
    run = trainer.run
    eval_n = len(run.eval_set) if run.eval_set is not None else 0
    trainable, frozen = trainer.parameter_counts
    per_micro = t.batch_size // (t.grad_accum_steps * trainer.world)
    strategy = trainer.strategy_description()
    lines = [
        f"data: {len(run.train_set)} training examples ({cfg.data.train}), {eval_n} evaluation examples ({cfg.data.eval})",
        f"steps: {trainer.steps_per_epoch} per epoch, {trainer.total_steps} in all; batch {t.batch_size} queries per step = "
        f"{trainer.world} process(es) x {t.grad_accum_steps} micro-batch(es) x {per_micro}",
        f"parameters: {trainable:,} trainable, {frozen:,} frozen (LLM stored as {cfg.model.llm_dtype})",
        f"device: {trainer.device}; compute: {trainer.precision.describe()}; strategy: {strategy}"
        + (f"; gradient checkpointing: {trainer.checkpointing}" if trainer.checkpointing else ""),
        "kernels: "
        + "; ".join(
            op_backends(
                trainer.model, cfg.model.backend, trainer.device, trainer.precision.compute_dtype, trainer.builder.shared_prefix
            )
        ),  # fmt: skip
    ]
    if cfg.eval.every_steps:
        lines.append(
            f"evaluation: every {cfg.eval.every_steps} steps on {cfg.data.eval} with {cfg.demos.num_demos} demonstrations"
        )
    return lines
