"""Processes under torchrun: the process group, FSDP2 sharding of the model, and the collectives the driver needs.

Two strategies (``train.fsdp``):

- DDP (default): every process holds the whole model; the trainable gradients are averaged by
  ``DistributedDataParallel``.
- FSDP2: every decoder/encoder block of the frozen LLM, its embeddings and its output head are
  ``fully_shard`` units, so each process stores ``1 / world`` of the LLM and gathers one unit at
  a time in the forward and the backward. The trainable parts (ln_vision, M-Hub, FC) are either
  replicated (their gradients all-reduced here, like DDP) or, with ``train.fsdp_shard_trainable``,
  sharded too (with their optimizer state). The model itself is the FSDP root, so every call of
  ``forward`` and ``generate`` gathers and frees the units in order.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from .llm import llm_blocks


def init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); initialises the process group under torchrun (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------------------
# FSDP2
# ---------------------------------------------------------------------------------------
def shard_model(model: nn.Module, *, shard_trainable: bool = False, param_dtype: torch.dtype | None = None) -> None:
    """Shard ``model`` (an :class:`~mmict_kernels.icl.model.MMICTModel`) in place with FSDP2 over the default process group.

    Units, innermost first: each LLM block; the input embeddings (with the output head when the
    two share their weight); the output head; the LLM's encoder/decoder stacks (their final norms);
    the LLM; the model. ``shard_trainable=False`` leaves the trainable parameters out of FSDP
    (``ignored_params``: replicated, see :func:`all_reduce_gradients`). ``param_dtype``: the dtype the
    gathered parameters compute in (mixed precision; gradients are reduced in float32).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    llm = model.llm
    for unit in llm_blocks(llm):
        fully_shard(unit, mp_policy=policy)
    emb, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    # The model calls the input embeddings itself (and a shared-prefix cache calls the decoder
    # stack itself), so these are units of their own: each call gathers exactly what it reads.
    # Every module holding the embedding matrix (T5's encoder/decoder copies, a tied output head)
    # joins one unit: a parameter belongs to exactly one.
    sharing = [m for m in llm.modules() if any(p is emb.weight for p in m.parameters(recurse=False))]
    fully_shard(sharing, mp_policy=policy)
    if head is not None and head not in sharing:
        fully_shard(head, mp_policy=policy)
    for getter in ("get_encoder", "get_decoder"):
        stack = getattr(llm, getter, lambda: None)()
        if isinstance(stack, nn.Module) and stack is not llm and any(True for _ in stack.parameters()):
            fully_shard(stack, mp_policy=policy)
    fully_shard(llm, mp_policy=policy)
    ignored = None if shard_trainable else set(model.trainable_parameters())
    fully_shard(model, mp_policy=policy, ignored_params=ignored)
    register_fsdp_forward_method(model, "generate")


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


def local_nbytes(tensors) -> int:
    """Bytes this process stores for ``tensors`` (its shards of sharded ones)."""
    return sum(local_tensor(t).nbytes for t in tensors)


def full_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every sharded tensor of ``state`` gathered whole (collective: every process calls it); others as they are."""
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}


# ---------------------------------------------------------------------------------------
# Collectives
# ---------------------------------------------------------------------------------------
def all_reduce_gradients(params, world: int) -> None:
    """Average the gradients of replicated parameters over the processes, in one flat buffer (as DDP does).

    A parameter without a gradient on every process counts as zero. Device-side only: nothing waits on the GPU.
    """
    params = [p for p in params if p.requires_grad]
    if world <= 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
    dist.all_reduce(flat)
    flat.div_(world)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n


def all_agree(flag: bool) -> bool:
    """True when ``flag`` is true on every process (a host-side decision, outside the training step)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def gather_to_rank0(items: list) -> list | None:
    """Every process's list, concatenated in rank order on rank 0 (None elsewhere)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(items)
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(items, out, dst=0)
    return [x for part in out for x in part] if out is not None else None


def broadcast_from_rank0(obj):
    """``obj`` of rank 0 on every process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
