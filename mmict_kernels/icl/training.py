"""The training loop: AdamW, warm-up + cosine, clipping, bf16 autocast on GPU, DDP, exact resume.

Exactness: the batches and demonstrations of step ``s`` are a pure function of (seed, s)
(``sampling.py``), the optimizer, step and RNG states are checkpointed, and the loss is the
NLL summed over the global batch's target tokens divided by their global count, so a resumed
run repeats the uninterrupted run's losses and a DDP run computes the single-process step.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
import yaml

from .. import backends
from . import checkpoint as ckpt
from .batch import BatchBuilder
from .build import Run, build_run
from .config import RunConfig
from .sampling import DemoSampler, batches_of, epoch_groups
from .schedule import lr_at
from .vision import fingerprint


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


def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


class Trainer:
    """The training loop of one run.

    ``builder_cls``: the batch layout; a :class:`BatchBuilder` subclass (or any callable taking
    its arguments), e.g. a baseline's layout; default the MMICT ``BatchBuilder``.
    """

    def __init__(self, cfg: RunConfig, run: Run | None = None, builder_cls=None):
        self.cfg = cfg
        self.rank, self.world, local_rank = distributed()
        self.device = pick_device(cfg.train.device, local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if run is None:
            # Rank 0 builds first (and fills the image-feature cache); the others then read it.
            if self.world > 1 and self.rank != 0:
                dist.barrier()
            run = build_run(cfg, device=self.device)
            if self.world > 1 and self.rank == 0:
                dist.barrier()
        self.run = run
        self.model = self.run.model.to(self.device)
        t, d = cfg.train, cfg.demos
        if t.batch_size % self.world:
            raise ValueError(f"train.batch_size ({t.batch_size}) must be a multiple of the number of processes ({self.world})")
        ds = self.run.train_set
        self.sampler = DemoSampler(ds, ds, d.num_demos, d.sampling, d.same_task, seed=t.seed)
        group = d.group_size if d.sampling == "one-to-many" else 1
        self.group_size = group
        if (t.batch_size // group) % self.world:
            raise ValueError(
                f"train.batch_size ({t.batch_size}) must split into whole demonstration groups of {group} per process "
                f"({self.world} processes)"
            )
        self.steps_per_epoch = len(batches_of(epoch_groups(ds.tasks(), d.sampling, group, t.seed, 0), t.batch_size, True))
        if self.steps_per_epoch == 0:
            raise ValueError(f"train.batch_size ({t.batch_size}) exceeds the {len(ds)} training examples")
        self.total_steps = t.max_steps if t.max_steps is not None else max(1, int(t.epochs * self.steps_per_epoch))
        m = cfg.model
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
        self.optimizer = make_optimizer(self.model, t)
        self.params = self.model.trainable_parameters()
        self.step = 0
        self._epoch_batches = (-1, [])
        self.prefetch = self.device.type == "cuda"  # build the next batch on a CPU thread during the step
        self.ddp = None
        if self.world > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=None)

    # ------------------------------------------------------------------------------------
    def batch_groups(self, step: int):
        """This rank's groups (with demonstrations) of global step ``step``."""
        t = self.cfg.train
        epoch, index = divmod(step, self.steps_per_epoch)
        if self._epoch_batches[0] != epoch:  # the epoch's order, computed once per epoch
            order = epoch_groups(self.run.train_set.tasks(), self.cfg.demos.sampling, self.group_size, t.seed, epoch)
            self._epoch_batches = (epoch, batches_of(order, t.batch_size, True))
        groups = self._epoch_batches[1][index]
        # Contiguous, equal shares per rank (groups are never split between ranks).
        per_rank = len(groups) // self.world
        mine = groups[self.rank * per_rank : (self.rank + 1) * per_rank] if self.world > 1 else groups
        return self.sampler.groups(mine, epoch)

    def _autocast(self):
        # (a simulated GPU, in the compile-only harness, runs the GPU's autocast on CPU tensors)
        if backends.effective_device_type(self.device.type) == "cuda" and self.cfg.train.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def make_batch(self, step: int):
        """This rank's batch of global step ``step``, on the CPU (pure: any thread may build it)."""
        ds = self.run.train_set
        batch = self.builder(self.batch_groups(step), ds, ds)
        if self.device.type == "cuda":
            batch.images = batch.images.pin_memory()
        return batch

    def lr(self, step: int) -> float:
        """The learning rate of global step ``step`` (the configured schedule and unit)."""
        return lr_at(step, self.total_steps, self.cfg.train, self.steps_per_epoch)

    def train_step(self, step: int, batch=None) -> float:
        """One optimizer step; ``batch``: ``make_batch(step)`` if already built (prefetched)."""
        batch = (batch if batch is not None else self.make_batch(step)).to(self.device)
        lr = self.lr(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.model.train()
        with self._autocast():
            nll, count = (self.ddp or self.model)(batch)
        # The target count is a host int from the batch; with DDP the global count is summed on the
        # device. Nothing here reads the GPU: the loss comes back as a device tensor.
        if self.world > 1:
            stats = torch.stack([torch.tensor(float(count), dtype=torch.float64, device=self.device), nll.detach().double()])
            dist.all_reduce(stats)
            total_tokens = stats[0].clamp_min(1.0)
            scale = (self.world / total_tokens).to(nll.dtype)
            mean_loss = stats[1] / total_tokens
        else:
            total_tokens = max(float(count), 1.0)
            scale = 1.0 / total_tokens
            mean_loss = nll.detach().double() / total_tokens
        # DDP averages gradients over ranks: scaling by world / global count makes the result
        # the gradient of (global NLL sum / global target tokens), as in one process.
        (nll * scale).backward()
        if self.cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_lr = lr
        return mean_loss

    # ------------------------------------------------------------------------------------
    def save(self, step: int) -> None:
        out = self.cfg.train.output_dir
        staging = ckpt.staging_dir(out, step) if self.rank == 0 else None
        if self.world > 1:
            holder = [staging]
            dist.broadcast_object_list(holder, src=0)
            staging = holder[0]
        rng = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        }
        ckpt.atomic_torch_save(rng, os.path.join(staging, f"rng-rank{self.rank}.pt"))
        if self.rank == 0:
            meta = {"step": str(step), "world_size": str(self.world), "llm_fingerprint": fingerprint(self.model.llm)}
            ckpt.atomic_save_file(
                self.model.trainable_state_dict(), os.path.join(staging, "trainable.safetensors"), metadata=meta
            )
            ckpt.atomic_torch_save(
                {"step": step, "optimizer": self.optimizer.state_dict(), "world_size": self.world},
                os.path.join(staging, "state.pt"),
            )
        if self.world > 1:
            dist.barrier()
        if self.rank == 0:
            ckpt.publish(out, step)
        if self.world > 1:
            dist.barrier()

    def resume(self) -> bool:
        path = ckpt.latest_checkpoint(self.cfg.train.output_dir)
        if path is None:
            return False
        ckpt.load_trainable(self.model, path)
        state = torch.load(os.path.join(path, "state.pt"), map_location=self.device, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        rng_path = os.path.join(path, f"rng-rank{self.rank}.pt")
        if state.get("world_size", 1) == self.world and os.path.isfile(rng_path):
            rng = torch.load(rng_path, weights_only=False)
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        return True

    def _write_run_files(self) -> None:
        out = self.cfg.train.output_dir
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(self.cfg.to_dict(), f, sort_keys=False)
        word = getattr(self.model, "word_tokenizer", None)
        if word is not None and not os.path.isdir(os.path.join(out, "tokenizer")):
            word.save_pretrained(os.path.join(out, "tokenizer"))

    def fit(self, resume: bool = True, stop_after: int | None = None) -> list[float]:
        """Train to ``total_steps`` (or stop after global step ``stop_after``, checkpointing there); returns the losses."""
        t = self.cfg.train
        if self.rank == 0:
            self._write_run_files()
        if not (resume and self.resume()):
            torch.manual_seed(t.seed + 1000 * self.rank)  # dropout streams; a resume restores them instead
        end = self.total_steps if stop_after is None else min(stop_after, self.total_steps)
        bar = None
        if self.rank == 0 and t.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True)
        losses, log_path = [], os.path.join(t.output_dir, "metrics.jsonl")
        tick, seen = time.perf_counter(), 0
        # On a GPU the next batch is assembled (tokenised, gathered, pinned) on a CPU thread while
        # the current step runs; on a CPU that thread would only compete with the step for cores.
        prefetch = ThreadPoolExecutor(max_workers=1) if self.prefetch else None
        pending = prefetch.submit(self.make_batch, self.step) if prefetch and self.step < end else None
        while self.step < end:
            batch = pending.result() if pending is not None else None
            pending = prefetch.submit(self.make_batch, self.step + 1) if prefetch and self.step + 1 < end else None
            loss_t = self.train_step(self.step, batch)  # a device tensor: read only when logged
            losses.append(loss_t)
            self.step += 1
            seen += t.batch_size
            if self.rank == 0 and (self.step % t.log_every == 0 or self.step == end):
                loss = float(loss_t)
                rate = seen / max(time.perf_counter() - tick, 1e-9)
                row = {"step": self.step, "loss": round(loss, 6), "lr": self.last_lr, "samples_per_s": round(rate, 2)}
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.last_lr:.2e}", samples_s=f"{rate:.1f}")
                tick, seen = time.perf_counter(), 0
            if bar is not None:
                bar.update(1)
            if t.save_every and self.step % t.save_every == 0 and self.step < end:
                self.save(self.step)
        if prefetch is not None:
            prefetch.shutdown(wait=True)
        if bar is not None:
            bar.close()
        self.save(self.step)
        return [float(x) for x in torch.stack(losses).tolist()] if losses else []


def train(cfg: RunConfig, resume: bool = True, stop_after: int | None = None) -> list[float]:
    return Trainer(cfg).fit(resume=resume, stop_after=stop_after)
