"""The training loop: AdamW, warm-up + cosine, clipping, mixed precision, gradient accumulation, DDP or FSDP2,
evaluation during training with a best checkpoint, and exact resume.

Exactness: the batches and demonstrations of step ``s`` are a pure function of (seed, s)
(``sampling.py``), the optimizer, step and RNG states are checkpointed, and the loss is the
NLL summed over the global batch's target tokens divided by their global count, so a resumed
run repeats the uninterrupted run's losses, and a DDP or FSDP run, or one with gradient
accumulation, computes the single-process step (up to float summation order).

The run folder (``train.output_dir``) is managed by ``run_dir.py``: a fresh run never mixes with
or deletes another run's work, a resume with a changed config is refused unless allowed, and a
checkpoint that cannot be read is named and skipped for the previous valid one.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

from .. import backends
from . import checkpoint as ckpt
from . import run_dir
from .batch import BatchBuilder
from .build import Run, build_run
from .config import RunConfig
from .distributed import (
    all_agree,
    all_reduce_gradients,
    barrier,
    broadcast_from_rank0,
    full_state_dict,
    gather_to_rank0,
    init_distributed,
    pick_device,
    shard_model,
)
from .evaluation import headline, predict, score
from .precision import MixedPrecision
from .run_logging import RunLogger
from .run_summary import parameter_counts, summary_lines
from .sampling import DemoSampler, batches_of, epoch_groups
from .schedule import lr_at
from .vision import fingerprint

distributed = init_distributed  # the older name

__all__ = ["Trainer", "train", "make_optimizer", "lr_at", "distributed", "pick_device"]


def make_optimizer(model, cfg) -> torch.optim.AdamW:
    """Weight decay on every trainable tensor of >= 2 dims, none on biases and norm weights.

    LAVIS's rule (``p.ndim < 2`` -> no decay), so the query tokens (1, Nq, hidden) and the FC,
    M-Hub and embedding matrices are decayed, like the official MMICT run.
    """
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith("llm.") and p.requires_grad]
    decay = [p for n, p in named if p.ndim >= 2]
    no_decay = [p for n, p in named if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # On a GPU the fused AdamW: one kernel per step and its step counters on the device (the
    # foreach version reads each parameter's step count on the host).
    fused = bool(named) and backends.on_gpu(named[0][1])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused or None)


class Trainer:
    """The training loop of one run.

    ``builder_cls``: the batch layout; a :class:`BatchBuilder` subclass (or any callable taking
    its arguments), e.g. a baseline's layout; default the MMICT ``BatchBuilder``.
    """

    def __init__(self, cfg: RunConfig, run: Run | None = None, builder_cls=None):
        self.cfg = cfg
        self.rank, self.world, local_rank = init_distributed()
        self.device = pick_device(cfg.train.device, local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        t, d, m = cfg.train, cfg.demos, cfg.model
        group = d.group_size if d.sampling == "one-to-many" else 1
        self.group_size = group
        split = self.world * t.grad_accum_steps
        if t.batch_size % split or (t.batch_size // group) % split:
            raise ValueError(
                f"train.batch_size ({t.batch_size}) must split into whole demonstration groups of {group} for each of "
                f"{self.world} process(es) x {t.grad_accum_steps} micro-batch(es) (train.grad_accum_steps)"
            )
        if run is None and self.world > 1 and cfg.data.feature_cache:
            # Every rank extracts its share of the missing image features into the shared cache.
            run = build_run(cfg, device=self.device, extract_on_all_ranks=True)
        elif run is None:
            # Without a shared cache, rank 0 builds first; the others then build the same run.
            if self.world > 1 and self.rank != 0:
                dist.barrier()
            run = build_run(cfg, device=self.device)
            if self.world > 1 and self.rank == 0:
                dist.barrier()
        self.run = run
        self.model = self.run.model.to(self.device)
        ds = self.run.train_set
        self.sampler = DemoSampler(ds, ds, d.num_demos, d.sampling, d.same_task, seed=t.seed)
        self.steps_per_epoch = len(batches_of(epoch_groups(ds.tasks(), d.sampling, group, t.seed, 0), t.batch_size, True))
        if self.steps_per_epoch == 0:
            raise ValueError(f"train.batch_size ({t.batch_size}) exceeds the {len(ds)} training examples")
        self.total_steps = t.max_steps if t.max_steps is not None else max(1, int(t.epochs * self.steps_per_epoch))
        shared = d.sampling == "one-to-many" and d.num_demos > 0 and m.llm_family == "decoder" and m.use_prefix_cache
        self.builder = (builder_cls or BatchBuilder)(
            self.run.mhub_tokenizer,
            self.run.llm_tokenizer,
            m.num_query_tokens,
            m.separator,
            m.llm_family,
            cfg.data.max_text_tokens,
            mode="train",
            shared_prefix=shared,
        )
        self.precision = MixedPrecision(t.precision, self.device)
        # Before sharding: the fingerprint and the counts read whole tensors.
        self.llm_fingerprint = fingerprint(self.model.llm)
        self.parameter_counts = parameter_counts(self.model)
        self.checkpointing = None  # what gradient checkpointing recomputes, for the summary
        if t.gradient_checkpointing:
            # The shared-prefix rows run the LLM inside a context that swaps its attention for the
            # prefix kernel; a recompute in the backward would run outside it, so those LLM blocks
            # keep their activations (the M-Hub is still recomputed).
            self.model.enable_gradient_checkpointing(llm=not shared)
            self.checkpointing = "M-Hub layers (not the LLM: shared demonstration prefix)" if shared else "M-Hub and LLM layers"
        self.fsdp = bool(t.fsdp) and self.world > 1
        self.ddp = None
        if self.fsdp:
            shard_model(self.model, shard_trainable=t.fsdp_shard_trainable, param_dtype=self.precision.dtype)
        elif self.world > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=None)
        self.optimizer = make_optimizer(self.model, t)  # after sharding: FSDP replaces the parameters
        self.params = self.model.trainable_parameters()
        self.step = 0
        self.best: dict | None = None  # {"step", "metric", "value"} of the best evaluated checkpoint
        self.last_lr, self.last_grad_norm, self.last_samples = None, None, 0
        self._epoch_batches = (-1, [])
        self._truncation_reported = False
        self.prefetch = self.device.type == "cuda"  # build the next batch on a CPU thread during the step

    # ------------------------------------------------------------------------------------
    @property
    def strategy(self) -> str:
        return "fsdp" if self.fsdp else ("ddp" if self.world > 1 else "single")

    def strategy_description(self) -> str:
        t = self.cfg.train
        if self.fsdp:
            trainable = "sharded" if t.fsdp_shard_trainable else "replicated"
            return f"FSDP2 over {self.world} processes (frozen LLM sharded, trainable parts {trainable})"
        if self.world > 1:
            return f"DDP over {self.world} processes"
        return "one process" + (" (train.fsdp needs torchrun with 2+ processes: the whole model is here)" if t.fsdp else "")

    def batch_groups(self, step: int, micro: int = 0):
        """This rank's groups (with demonstrations) of micro-batch ``micro`` of global step ``step``."""
        t = self.cfg.train
        epoch, index = divmod(step, self.steps_per_epoch)
        if self._epoch_batches[0] != epoch:  # the epoch's order, computed once per epoch
            order = epoch_groups(self.run.train_set.tasks(), self.cfg.demos.sampling, self.group_size, t.seed, epoch)
            self._epoch_batches = (epoch, batches_of(order, t.batch_size, True))
        groups = self._epoch_batches[1][index]
        # Contiguous, equal shares per rank, then per micro-batch (groups are never split).
        per_rank = len(groups) // self.world
        mine = groups[self.rank * per_rank : (self.rank + 1) * per_rank]
        per_micro = per_rank // t.grad_accum_steps
        return self.sampler.groups(mine[micro * per_micro : (micro + 1) * per_micro], epoch)

    def make_batch(self, step: int, micro: int = 0):
        """This rank's micro-batch ``micro`` of global step ``step``, on the CPU (pure: any thread may build it)."""
        ds = self.run.train_set
        batch = self.builder(self.batch_groups(step, micro), ds, ds)
        if self.device.type == "cuda":
            batch.images = batch.images.pin_memory()
        return batch

    def make_step_batches(self, step: int) -> list:
        """Every micro-batch of global step ``step`` for this rank (``train.grad_accum_steps`` of them)."""
        return [self.make_batch(step, i) for i in range(self.cfg.train.grad_accum_steps)]

    def lr(self, step: int) -> float:
        """The learning rate of global step ``step`` (the configured schedule and unit)."""
        return lr_at(step, self.total_steps, self.cfg.train, self.steps_per_epoch)

    def _no_sync(self, skip: bool):
        """Within a micro-batch that is not the step's last, gradients are not reduced yet."""
        if skip and self.ddp is not None:
            return self.ddp.no_sync()
        if self.fsdp and self.cfg.train.fsdp_shard_trainable:
            self.model.set_requires_gradient_sync(not skip)
        return contextlib.nullcontext()

    def train_step(self, step: int, batch=None) -> torch.Tensor:
        """One optimizer step; returns the step's mean loss as a device tensor (read it only when logging).

        ``batch``: the step's micro-batches (a list, or one batch when ``train.grad_accum_steps`` is 1)
        if already built (prefetched); default ``make_step_batches(step)``. Nothing here reads the
        GPU: target counts are host ints from the batches, the global count is reduced on the device.
        """
        if batch is None:
            batches = self.make_step_batches(step)
        else:
            batches = list(batch) if isinstance(batch, (list, tuple)) else [batch]
        batches = [b.to(self.device) for b in batches]
        lr = self.lr(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.model.train()
        local_tokens = sum(b.num_label_tokens for b in batches)
        if self.world > 1:
            total = torch.tensor(float(local_tokens), dtype=torch.float64, device=self.device)
            dist.all_reduce(total)
            total = total.clamp_min(1.0)
            # DDP and FSDP average gradients over ranks: world / global count makes the result the
            # gradient of (global NLL sum / global target tokens), as in one process.
            scale = self.world / total
        else:
            total = max(float(local_tokens), 1.0)
            scale = 1.0 / total
        module = self.ddp or self.model
        nll_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, b in enumerate(batches):
            with self._no_sync(i < len(batches) - 1):
                with self.precision.autocast():
                    nll, _ = module(b)
                self.precision.backward(nll * (scale.to(nll.dtype) if isinstance(scale, torch.Tensor) else scale))
            nll_sum += nll.detach().double()
        if self.world > 1:
            dist.all_reduce(nll_sum)
        mean_loss = nll_sum / total
        if self.fsdp and not self.cfg.train.fsdp_shard_trainable:
            all_reduce_gradients(self.params, self.world)  # replicated trainable parts: averaged as DDP does
        self.precision.unscale(self.optimizer)
        if self.cfg.train.grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip)
        else:  # the norm is still logged
            grads = [p.grad for p in self.params if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        self.precision.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.last_lr, self.last_grad_norm = lr, grad_norm.detach()
        self.last_samples = sum(len(b.queries) for b in batches) * self.world
        return mean_loss

    # ------------------------------------------------------------------------------------
    def save(self, step: int) -> None:
        """Checkpoint ``step`` (collective); keeps ``train.keep_checkpoints`` newest and the best one."""
        t = self.cfg.train
        out = t.output_dir
        staging = broadcast_from_rank0(ckpt.staging_dir(out, step) if self.rank == 0 else None)
        rng = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }
        ckpt.atomic_torch_save(rng, os.path.join(staging, f"rng-rank{self.rank}.pt"))
        trainable = self.model.trainable_state_dict()
        if self.fsdp:
            trainable = full_state_dict(trainable)  # every rank takes part in the gathers
            ckpt.save_sharded(self.model, self.optimizer, os.path.join(staging, ckpt.SHARDED_DIR))
        if self.rank == 0:
            meta = {
                "step": str(step),
                "world_size": str(self.world),
                "strategy": self.strategy,
                "llm_fingerprint": self.llm_fingerprint,
            }
            ckpt.atomic_save_file(trainable, os.path.join(staging, ckpt.TRAINABLE_FILE), metadata=meta)
            state = {"step": step, "world_size": self.world, "strategy": self.strategy, "best": self.best,
                     "grad_scaler": self.precision.state_dict()}  # fmt: skip
            if not self.fsdp:
                state["optimizer"] = self.optimizer.state_dict()
            ckpt.atomic_torch_save(state, os.path.join(staging, ckpt.STATE_FILE))
        barrier()
        if self.rank == 0:
            protect = (self.best["step"],) if self.best else ()
            ckpt.publish(out, step, keep=t.keep_checkpoints, protect=protect)
            ckpt.write_best(out, self.best)
        barrier()

    def _load(self, path: str) -> None:
        """Load checkpoint ``path`` (model, optimizer, step, best, this rank's random state); CheckpointError if unreadable."""
        state = ckpt.read_state(path, map_location=self.device)
        saved = state.get("strategy", "ddp" if state.get("world_size", 1) > 1 else "single")
        if (saved == "fsdp") != self.fsdp:
            raise ValueError(
                f"checkpoint {path} was saved with train.fsdp {saved == 'fsdp'} ({state.get('world_size')} processes); "
                f"resume it with the same train.fsdp and torchrun"
            )
        if self.fsdp:
            from safetensors import safe_open

            with safe_open(os.path.join(path, ckpt.TRAINABLE_FILE), "pt") as f:
                meta = f.metadata() or {}
            if meta.get("llm_fingerprint") not in (None, self.llm_fingerprint):
                raise ValueError(f"checkpoint {path} was trained with another frozen LLM; use the run's config.yaml")
            ckpt.load_sharded(self.model, self.optimizer, os.path.join(path, ckpt.SHARDED_DIR))
        else:
            tensors, meta = ckpt.read_trainable(path)
            ckpt.check_fits(self.model, tensors, meta, path, self.llm_fingerprint)
            if "optimizer" not in state:
                raise ckpt.CheckpointError(path, "the training state holds no optimizer state")
            self.model.load_state_dict(tensors, strict=False)
            self.optimizer.load_state_dict(state["optimizer"])
        rng = ckpt.read_rng(path, self.rank) if state.get("world_size", 1) == self.world else None
        self.precision.load_state_dict(state.get("grad_scaler"))
        self.step = int(state["step"])
        self.best = state.get("best")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)

    def resume(self, allow_config_change: bool = False) -> bool:
        """Load the newest checkpoint that can be read; False when there is none.

        A checkpoint that cannot be read (corrupt, truncated) is named in a warning and the previous
        one is used; when none can be read, a CheckpointError lists them. A config that differs from
        the run's ``config.yaml`` is refused (:func:`run_dir.check_config_change`) unless allowed.
        """
        out = self.cfg.train.output_dir
        found = broadcast_from_rank0([p for _, p in reversed(ckpt.list_checkpoints(out))] if self.rank == 0 else None)
        if not found:
            return False
        self._check_config(ckpt.step_of(found[0]), allow_config_change)
        failures = []
        for path in found:
            error = None
            try:
                self._load(path)
            except ckpt.CheckpointError as exc:
                error = exc
            if all_agree(error is None):
                if failures and self.rank == 0:
                    named = "; ".join(f"{p} ({e.reason})" for p, e in failures)
                    warnings.warn(f"checkpoint {named} cannot be read; resumed from the previous valid checkpoint {path}",
                                  RuntimeWarning, stacklevel=2)  # fmt: skip
                return True
            failures.append((path, error or ckpt.CheckpointError(path, "unreadable on another process")))
        named = "; ".join(f"{p}: {e.reason}" for p, e in failures)
        raise ckpt.CheckpointError(out, f"no checkpoint can be read ({named}); start over with --no-resume --overwrite")

    def _check_config(self, step: int, allow: bool) -> None:
        error = None
        if self.rank == 0:
            try:
                changes = run_dir.check_config_change(self.cfg.train.output_dir, self.cfg, step, allow)
                if changes:
                    listed = ", ".join(changes)
                    warnings.warn(f"resuming at step {step} with a changed config ({listed}), as allowed", stacklevel=3)
            except run_dir.RunFolderError as exc:
                error = str(exc)
        error = broadcast_from_rank0(error)
        if error:
            raise run_dir.RunFolderError(error)

    def _prepare_folder(self, resume: bool, overwrite: bool, allow_config_change: bool) -> bool:
        """Apply the run-folder rules (see ``run_dir.py``); returns whether a checkpoint was resumed."""
        out = self.cfg.train.output_dir
        error = None
        if self.rank == 0:
            try:
                if overwrite:
                    removed = run_dir.remove_run(out)
                    if removed:
                        print(f"--overwrite: removed the earlier run in {out} ({', '.join(removed)})", flush=True)
                elif not resume:
                    run_dir.refuse_fresh_run(out)
            except run_dir.RunFolderError as exc:
                error = str(exc)
        error = broadcast_from_rank0(error)
        if error:
            raise run_dir.RunFolderError(error)
        resumed = resume and not overwrite and self.resume(allow_config_change)
        if not resumed and resume and not overwrite and run_dir.holds_run(out):
            # Metrics of an attempt that never saved a checkpoint: the same run starts over (its
            # rows are dropped); another run's are refused like a fresh run's.
            self._check_config(0, allow_config_change)
        if self.rank == 0:
            dropped = run_dir.truncate_metrics(out, self.step if resumed else 0)
            if dropped:
                print(f"{out}/metrics.jsonl: dropped {dropped} rows logged after step {self.step}", flush=True)
            run_dir.write_config(out, self.cfg)
            word = getattr(self.model, "word_tokenizer", None)
            if word is not None and not os.path.isdir(os.path.join(out, "tokenizer")):
                word.save_pretrained(os.path.join(out, "tokenizer"))
        barrier()
        return resumed

    # ------------------------------------------------------------------------------------
    def evaluate_now(self) -> dict | None:
        """Evaluate on ``data.eval`` with ``demos.num_demos`` demonstrations (every process takes part);
        on rank 0 returns ``{"metric", "value", per-task scores...}``, elsewhere None. The random
        streams are left as they were, so training continues exactly as without the evaluation."""
        cfg, e = self.cfg, self.cfg.eval
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            records = predict(
                self.run, cfg.demos.num_demos, sampling=cfg.demos.sampling, group_size=cfg.demos.group_size,
                batch_size=e.batch_size, num_beams=e.num_beams, max_new_tokens=e.max_new_tokens,
                min_new_tokens=e.min_new_tokens, generation_lengths=e.generation_lengths, seed=cfg.data.seed,
                device=self.device, use_prefix_cache=cfg.model.use_prefix_cache, limit=e.limit,
            )  # fmt: skip
        if self.rank != 0:
            return None
        scores = score(records)
        metric, value = headline(scores)
        row = {"metric": metric, "value": value, "n": scores["all"]["n"]}
        for task, s in scores.items():
            row[f"{task}/exact_match"] = s["exact_match"]
            row[f"{task}/vqa_accuracy"] = s["vqa_accuracy"]
            cider = (s.get("captions") or {}).get("CIDEr")
            if cider is not None:
                row[f"{task}/CIDEr"] = 100 * cider
        return row

    def _record_evaluation(self, row: dict | None, logger) -> None:
        if self.rank != 0 or row is None:
            return
        logger.log_eval(self.step, {row["metric"]: row["value"], "n": row["n"], **{k: v for k, v in row.items() if "/" in k}})
        better = row["value"] is not None and (self.best is None or row["value"] > self.best["value"])
        if better:
            self.best = {"step": self.step, "metric": row["metric"], "value": row["value"]}
        best = f"; best {self.best['value']:.2f} at step {self.best['step']}" if self.best else ""
        value = "n/a" if row["value"] is None else f"{row['value']:.2f}"
        print(f"step {self.step}: eval {row['metric']} {value}{best}", flush=True)

    def _report_truncation(self) -> None:
        """Once per run: texts cut at data.max_text_tokens in the first epoch (every process's count)."""
        if self._truncation_reported:
            return
        self._truncation_reported = True
        tr = self.builder.truncation
        parts = gather_to_rank0([(tr.count, tr.longest, dict(tr.by_part))])
        if parts is None:
            return
        total = type(tr)(tr.cap)
        for count, longest, by_part in parts:
            total.count += count
            total.longest = max(total.longest, longest)
            for k, v in by_part.items():
                total.by_part[k] = total.by_part.get(k, 0) + v
        message = total.message()
        if message:
            warnings.warn(f"in the first epoch, {message}", stacklevel=2)

    def fit(
        self, resume: bool = True, stop_after: int | None = None, overwrite: bool = False, allow_config_change: bool = False
    ) -> list[float]:
        """Train to ``total_steps`` (or stop after global step ``stop_after``, checkpointing there); returns the losses.

        ``resume``: continue from the newest readable checkpoint in ``train.output_dir``; with
        ``resume=False`` a folder holding another run is refused unless ``overwrite`` (which removes
        that run first, and always starts fresh). ``allow_config_change``: resume although the
        config differs from the run's.
        """
        t, e = self.cfg.train, self.cfg.eval
        resumed = self._prepare_folder(resume, overwrite, allow_config_change)
        if not resumed:
            self.step, self.best = 0, None
            torch.manual_seed(t.seed + 1000 * self.rank)  # dropout streams; a resume restores them instead
        logger = None
        if self.rank == 0:
            for line in summary_lines(self):
                print(line, flush=True)
            if resumed:
                print(f"resumed from step {self.step}", flush=True)
            logger = RunLogger(t.output_dir, tensorboard=t.tensorboard, wandb=t.wandb, config=self.cfg.to_dict(),
                               resumed_at=self.step + 1 if resumed else None)  # fmt: skip
            if resumed:
                logger.log_event(self.step, "resumed")
        end = self.total_steps if stop_after is None else min(stop_after, self.total_steps)
        bar = None
        if self.rank == 0 and t.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True)
        losses = []
        tick, seen = time.perf_counter(), 0
        # On a GPU the next step's batches are assembled (tokenised, gathered, pinned) on a CPU thread
        # while the current step runs; on a CPU that thread would only compete with the step for cores.
        prefetch = ThreadPoolExecutor(max_workers=1) if self.prefetch else None
        pending = prefetch.submit(self.make_step_batches, self.step) if prefetch and self.step < end else None
        evaluated_at = None
        try:
            while self.step < end:
                batches = pending.result() if pending is not None else None
                pending = prefetch.submit(self.make_step_batches, self.step + 1) if prefetch and self.step + 1 < end else None
                loss_t = self.train_step(self.step, batches)  # a device tensor: read only when logged
                losses.append(loss_t)
                self.step += 1
                seen += self.last_samples
                if self.step % self.steps_per_epoch == 0 or self.step == end:
                    self._report_truncation()
                if self.rank == 0 and (self.step % t.log_every == 0 or self.step == end):
                    loss, norm = float(loss_t), self.last_grad_norm
                    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                    rate = seen / max(time.perf_counter() - tick, 1e-9)
                    row = {
                        "loss": round(loss, 6),
                        "lr": self.last_lr,
                        "grad_norm": round(norm, 6),
                        "samples_per_s": round(rate, 2),
                    }
                    logger.log_step(self.step, row)
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.last_lr:.2e}", samples_s=f"{rate:.1f}")
                    tick, seen = time.perf_counter(), 0
                if bar is not None:
                    bar.update(1)
                if e.every_steps and self.step % e.every_steps == 0:
                    self._record_evaluation(self.evaluate_now(), logger)
                    evaluated_at = self.step
                    if self.step < end:
                        self.save(self.step)  # the evaluated weights: a candidate for the best checkpoint
                elif t.save_every and self.step % t.save_every == 0 and self.step < end:
                    self.save(self.step)
            if e.every_steps and evaluated_at != self.step and self.step == self.total_steps:
                self._record_evaluation(self.evaluate_now(), logger)
            self.save(self.step)
        finally:
            if prefetch is not None:
                prefetch.shutdown(wait=True)
            if bar is not None:
                bar.close()
            if logger is not None:
                logger.close()
        return [float(x) for x in torch.stack(losses).tolist()] if losses else []


def train(cfg: RunConfig, resume: bool = True, stop_after: int | None = None, **kwargs) -> list[float]:
    return Trainer(cfg).fit(resume=resume, stop_after=stop_after, **kwargs)
