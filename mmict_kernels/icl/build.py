"""Assemble a run from its config: image encoder, data sets, tokenizers, LLM, M-Hub, model."""

from __future__ import annotations

import dataclasses
import os

import torch

from . import data as data_mod
from .config import RunConfig
from .datasets import LoadContext, load_source
from .datasets.shapes import shapes_dataset
from .features import FeatureStore
from .llm import build_llm
from .mhub import build_mhub
from .model import MMICTModel
from .shapes import shapes_vocabulary
from .tokenizer import build_word_tokenizer, load_tokenizer
from .vision import build_vision_encoder, final_norm, fingerprint, vision_width


@dataclasses.dataclass
class Run:
    cfg: RunConfig
    model: MMICTModel
    train_set: data_mod.ICLDataset | None
    eval_set: data_mod.ICLDataset | None
    mhub_tokenizer: object
    llm_tokenizer: object


def load_split(spec, cfg: RunConfig, encoder, split: str, rank: int = 0, world: int = 1) -> data_mod.ICLDataset:
    """The data set of ``data.train`` or ``data.eval`` (``split``: "train" or "eval").

    ``spec``: "shapes", a JSONL path or a ``{format: ...}`` mapping (``datasets/``). Features come from
    the store in ``data.feature_cache`` (extracted first where missing); ``rank``/``world``: this
    process's share of that extraction when every process of a group loads at once.
    """
    d, m = cfg.data, cfg.model
    if spec == "shapes":
        num = d.shapes_train_size if split == "train" else d.shapes_eval_size
        # Different seeds per split: evaluation images are never training images.
        seed = d.seed * 2 + (0 if split == "train" else 1)
        return shapes_dataset(num, d.shapes_tasks, seed, encoder, m.vision_family, m.image_size, f"shapes-{split}")
    store = FeatureStore(d.feature_cache, fingerprint(encoder), d.feature_dtype, d.feature_shard_mb)
    ctx = LoadContext(
        encoder,
        m.vision_family,
        m.image_size,
        store,
        role=split,
        num_frames=d.num_frames,
        batch_size=d.feature_batch_size,
        rank=rank,
        world=world,
        progress=cfg.train.progress,
        image_root=d.image_root,
    )
    return load_source(spec, ctx, f"data.{split}")


def _tokenizers(cfg: RunConfig, texts: list[str], saved: str | None):
    """(M-Hub tokenizer, LLM tokenizer). The word tokenizer is shared by both and saved with the run."""
    m = cfg.model
    llm_tok_path = m.llm_tokenizer or m.llm_checkpoint
    word = None
    if not (m.mhub_tokenizer and llm_tok_path):
        if saved and os.path.isdir(saved):
            word = load_tokenizer(saved)
        else:
            word = build_word_tokenizer(texts + shapes_vocabulary(), [m.separator])
    mtok = load_tokenizer(m.mhub_tokenizer, "model.mhub_tokenizer") if m.mhub_tokenizer else word
    llm_key = "model.llm_tokenizer" if m.llm_tokenizer else "model.llm_checkpoint"
    ltok = load_tokenizer(llm_tok_path, llm_key) if llm_tok_path else word
    return mtok, ltok, word


def build_run(
    cfg: RunConfig,
    *,
    splits=("train", "eval"),
    device: str | torch.device = "cpu",
    tokenizer_dir: str | None = None,
    extract_on_all_ranks: bool = False,
) -> Run:
    """Everything a run needs. ``tokenizer_dir``: a saved word tokenizer to reuse (evaluation).

    The frozen image encoder runs on ``device`` while the features are extracted (once per image,
    into ``data.feature_cache``). ``extract_on_all_ranks``: every process of the ``torch.distributed``
    group calls ``build_run`` at the same time and each extracts its share of the missing features
    (needs ``data.feature_cache``, which they share); otherwise each process extracts what the cache
    lacks (one process first, the others then find everything cached).
    """
    m = cfg.model
    encoder = build_vision_encoder(m, seed=m.init_seed)
    rank, world = 0, 1
    if extract_on_all_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    encoder.to(device)
    train_set = load_split(cfg.data.train, cfg, encoder, "train", rank, world) if "train" in splits else None
    eval_set = load_split(cfg.data.eval, cfg, encoder, "eval", rank, world) if "eval" in splits else None
    encoder.to("cpu")  # only its final norm is used from here on
    texts = [t for ds in (train_set, eval_set) if ds is not None for t in ds.texts()]
    mtok, ltok, word = _tokenizers(cfg, texts, tokenizer_dir)
    llm = build_llm(m.llm_family, m.llm_type, m.llm_checkpoint, m.llm_config, ltok, m.separator, seed=m.init_seed + 1)
    llm.to(getattr(torch, m.llm_dtype))  # frozen: low precision storage is enough
    width = vision_width(encoder)
    mhub = build_mhub(
        m.mhub_config,
        m.mhub_checkpoint,
        m.num_query_tokens,
        len(mtok),
        width,
        seed=m.init_seed + 2,
        impl=m.mhub_impl,
        backend=m.backend,
    )
    ln_vision = torch.nn.LayerNorm(width, eps=getattr(encoder.config, "layer_norm_eps", 1e-5))
    norm = final_norm(encoder)
    if norm is not None:  # BLIP-2's ln_vision starts as the encoder's own final norm
        ln_vision.load_state_dict(norm.state_dict())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(m.init_seed + 3)
        model = MMICTModel(mhub, llm, width, m.llm_family, m.num_query_tokens, ln_vision, prefix_backend=m.backend)
    model.word_tokenizer = word  # saved with checkpoints when the run uses it
    return Run(cfg, model.to(device), train_set, eval_set, mtok, ltok)
