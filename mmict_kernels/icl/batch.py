"""Turn groups of (queries, demonstrations) into one model batch: the MMICT layout.

Every demonstration and query of a batch is one *turn* of a single batched M-Hub call:
``[query tokens ; text]`` cross-attending to the turn's image (frames packed). A demonstration
turn's text is its caption alone (captioning) or its question and answer (VQA), as in the
official code (:meth:`BatchBuilder.demo_text`), and its features are the M-Hub outputs at the TEXT
positions (visual-guided textual features); a query turn's text is its prompt only, and its
features are the outputs at the QUERY positions (textual-guided visual features). A turn that
several groups share and an image that several turns share are computed once.

The LLM sequence of one query (the published layout, as the authors' code KDEGroup/MMICT builds it)::

    [demo 1 text feats][SEP] ... [demo N text feats][SEP][query feats][prompt tokens][target tokens]

with SEP the ``<|endofchunk|>`` token and the loss on the target tokens only. Unlike the
official code, a demonstration contributes only its valid (non-padded) text positions.

Each LLM position is either an M-Hub feature (``feat_index``: flat index into the M-Hub output
(U * (Nq + T), hidden)) or a token (``token_ids``); the model gathers both in one pass.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from .data import task_kind
from .sampling import Group
from .tokenizer import TruncationCount

IGNORE = -100


@dataclasses.dataclass
class Packed:
    """Padded LLM sequences: position (b, i) is M-Hub feature ``feat_index[b, i]`` if >= 0, else token ``token_ids[b, i]``."""

    feat_index: torch.Tensor  # (B, L) int64, -1 at token positions
    token_ids: torch.Tensor  # (B, L) int64, pad id at feature and padding positions
    attention_mask: torch.Tensor  # (B, L) int64
    labels: torch.Tensor | None = None  # (B, L) int64 target token at target positions, IGNORE elsewhere
    # Found on the host when the batch is built, so the model never asks the GPU where they are
    # (boolean indexing and nonzero would each stop the GPU):
    feat_positions: torch.Tensor | None = None  # (N,) int64 flat positions (b * L + i) of the feature slots
    feat_sources: torch.Tensor | None = None  # (N,) int64 their M-Hub output rows (feat_index at those positions)
    target_span: tuple[int, int] | None = None  # [first, last) columns whose next token is a target; None: no target

    def to(self, device, non_blocking: bool = True) -> Packed:
        # (not dataclasses.astuple: it deep-copies every tensor)
        fields = (getattr(self, f.name) for f in dataclasses.fields(self))
        return Packed(*(t.to(device, non_blocking=non_blocking) if isinstance(t, torch.Tensor) else t for t in fields))


@dataclasses.dataclass
class MMICTBatch:
    images: torch.Tensor  # (I, Lv, width) frozen features of the batch's distinct images (frames packed, padded)
    image_mask: torch.Tensor  # (I, Lv) int64
    turn_image: torch.Tensor  # (U,) int64: image of each turn
    turn_ids: torch.Tensor  # (U, T) M-Hub token ids (queries' prompts, demonstrations' ``demo_text``)
    turn_mask: torch.Tensor  # (U, T) int64
    llm: Packed  # decoder-only: whole sequences (+ labels); encoder-decoder: the encoder context
    decoder: Packed | None  # encoder-decoder: the target (labels) for the decoder
    prefix: Packed | None  # shared-prefix mode: one demonstration prefix per group (G, Lp); `llm` holds the rows
    prefix_ids: torch.Tensor | None  # (B,) group of each row
    queries: list  # query indices, in row order
    answers: list  # reference answers of each row
    tasks: list
    num_label_tokens: int
    # The images' valid tokens, packed on the host (so no GPU sync finds them): flat indices into
    # images.flatten(0, 1), per-image offsets, and the token count of the turns' gathered images.
    image_token_index: torch.Tensor | None = None  # (total,) int64
    image_cu_seqlens: torch.Tensor | None = None  # (I + 1,) int32
    turn_image_tokens: int | None = None

    def to(self, device) -> MMICTBatch:
        moved = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            moved[f.name] = v.to(device, non_blocking=True) if isinstance(v, (torch.Tensor, Packed)) else v
        return MMICTBatch(**moved)

    def context_lengths(self) -> tuple[list[int], int]:
        """(LLM context tokens each row attends to, LLM context positions computed for the whole batch).

        Targets excluded in a decoder-only training batch; a shared demonstration prefix counts for
        every row that reads it but is computed once per group.
        """
        own = self.llm.attention_mask.sum(1)
        if self.llm.labels is not None:
            own = own - (self.llm.labels != IGNORE).sum(1)
        if self.prefix is None:
            return own.tolist(), int(own.sum())
        prefix = self.prefix.attention_mask.sum(1)
        return (own + prefix[self.prefix_ids]).tolist(), int(own.sum() + prefix.sum())


def pack(seqs: list[tuple[list, list, list]], pad_id: int, pad_left: bool, with_labels: bool) -> Packed:
    """``seqs``: per row (feat positions, token ids, is-target flags), -1 marking non-features."""
    length = max((len(f) for f, _, _ in seqs), default=0)
    b = len(seqs)
    feat = np.full((b, length), -1, np.int64)
    toks = np.full((b, length), pad_id, np.int64)
    mask = np.zeros((b, length), np.int64)
    labels = np.full((b, length), IGNORE, np.int64)
    for i, (f, t, lab) in enumerate(seqs):
        n = len(f)
        sl = slice(length - n, length) if pad_left else slice(0, n)
        feat[i, sl], toks[i, sl], mask[i, sl] = f, t, 1
        if with_labels:
            labels[i, sl] = np.where(np.asarray(lab, bool), np.asarray(t), IGNORE)
    lab_t = torch.from_numpy(labels) if with_labels else None
    positions = np.flatnonzero(feat.reshape(-1) >= 0)
    span = None
    if with_labels:
        predicts = np.flatnonzero((labels[:, 1:] != IGNORE).any(0))  # column i predicts the target at i + 1
        span = (int(predicts[0]), int(predicts[-1]) + 1) if predicts.size else None
    return Packed(
        torch.from_numpy(feat), torch.from_numpy(toks), torch.from_numpy(mask), lab_t,
        torch.from_numpy(positions), torch.from_numpy(feat.reshape(-1)[positions]), span,
    )  # fmt: skip


class BatchBuilder:
    """Builds :class:`MMICTBatch` from groups. ``mode``: "train" (targets, right padding) or "generate".

    ``llm_family``: "decoder" puts the target after the context in one sequence; "encoder-decoder"
    keeps the context for the encoder and the target for the decoder. ``shared_prefix`` (decoder
    only) returns each group's demonstrations once as a prefix instead of repeating them per row.
    """

    def __init__(
        self,
        mhub_tokenizer,
        llm_tokenizer,
        num_query_tokens: int,
        separator: str,
        llm_family: str,
        max_text_tokens: int = 32,
        mode: str = "train",
        shared_prefix: bool = False,
    ):
        if mode not in ("train", "generate"):
            raise ValueError(f"mode: expected 'train' or 'generate', got {mode!r}")
        if shared_prefix and llm_family != "decoder":
            raise ValueError(
                "shared_prefix: only a decoder-only LLM can share a demonstration prefix (a T5 encoder is bidirectional)"
            )
        self.mtok, self.ltok, self.nq = mhub_tokenizer, llm_tokenizer, num_query_tokens
        self.sep_id = llm_tokenizer.convert_tokens_to_ids(separator)
        if self.sep_id is None or self.sep_id == llm_tokenizer.unk_token_id:
            raise ValueError(f"separator {separator!r} is not a token of the LLM tokenizer (add it as a special token)")
        self.family, self.max_text, self.mode, self.shared_prefix = llm_family, max_text_tokens, mode, shared_prefix
        self.pad_id = llm_tokenizer.pad_token_id
        self.eos_id = llm_tokenizer.eos_token_id
        # ``mhub_ids(text)`` / ``llm_ids(text)``: the M-Hub / LLM tokenizer's ids of ``text`` (capped, cached;
        # the LLM's without special tokens); public for subclasses and baselines. ``_ltok`` is the older
        # name of ``llm_ids``, kept as an alias.
        self.mhub_ids = functools.lru_cache(maxsize=1 << 16)(self._mhub_ids)
        self.llm_ids = functools.lru_cache(maxsize=1 << 16)(self._llm_ids)
        self._target_llm_ids = functools.lru_cache(maxsize=1 << 16)(functools.partial(self._llm_ids, part="LLM target"))
        self._ltok = self.llm_ids
        # Texts cut at max_text_tokens (each distinct text once: the ids are cached); the run reports it once.
        self.truncation = TruncationCount(max_text_tokens)

    def _capped(self, tokenizer, text: str, part: str, **kwargs) -> tuple:
        ids = tokenizer(text, truncation=True, max_length=self.max_text, **kwargs)["input_ids"]
        if len(ids) >= self.max_text:  # maybe cut: only such texts are tokenised again, whole, to know
            whole = len(tokenizer(text, truncation=False, **kwargs)["input_ids"])
            if whole > self.max_text:
                self.truncation.add(part, whole)
        return tuple(ids)

    def _mhub_ids(self, text: str) -> tuple:
        return self._capped(self.mtok, text, "M-Hub text")

    def _llm_ids(self, text: str, part: str = "LLM text") -> tuple:
        return self._capped(self.ltok, text, part, add_special_tokens=False)

    @staticmethod
    def demo_text(example) -> str:
        """A demonstration's text: its caption alone (captioning; the caption prompt goes only to
        queries, as in the official code) or its question and answer (VQA)."""
        if task_kind(example.task, example.kind) == "caption":
            return example.answer
        return f"{example.prompt} {example.answer}"

    def target_ids(self, answer: str) -> list[int]:
        return list(self._target_llm_ids(" " + answer)) + ([self.eos_id] if self.eos_id is not None else [])

    # --- how a demonstration enters the batch: the two hooks a baseline layout overrides ---
    def demo_mhub_ids(self, example) -> tuple:
        """M-Hub text of a demonstration's turn (MMICT: its demonstration text)."""
        return self.mhub_ids(self.demo_text(example))

    def demo_llm_part(self, turn: int, span: int, n_mhub_text: int, example) -> tuple[list[int], list[int]]:
        """(feature positions, token ids) of one demonstration in the LLM sequence; -1 marks a token.

        MMICT: the M-Hub outputs at the turn's text positions, then the separator.
        """
        return [turn * span + self.nq + j for j in range(n_mhub_text)] + [-1], [self.pad_id] * n_mhub_text + [self.sep_id]

    def __call__(self, groups: list[Group], query_ds, pool_ds) -> MMICTBatch:
        # --- turns (demonstrations deduplicated across groups) and their images ---
        turn_of: dict = {}
        turn_text, turn_img_key, image_of, image_src = [], [], {}, []

        def add_turn(key, ds, idx, text_ids):
            if key not in turn_of:
                ex = ds[idx]
                img_key = ex.images
                if img_key not in image_of:
                    image_of[img_key] = len(image_src)
                    image_src.append((ds, idx))
                turn_of[key] = len(turn_text)
                turn_text.append(text_ids)
                turn_img_key.append(image_of[img_key])
            return turn_of[key]

        group_demo_turns, row_query_turn, rows = [], [], []
        for gi, g in enumerate(groups):
            demos = [(add_turn(("demo", d), pool_ds, d, self.demo_mhub_ids(pool_ds[d])), d) for d in g.demos]
            group_demo_turns.append(demos)
            for q in g.queries:
                row_query_turn.append(add_turn(("query", q), query_ds, q, self.mhub_ids(query_ds[q].prompt)))
                rows.append((gi, q))

        span = self.nq + max(len(t) for t in turn_text)  # M-Hub positions per turn: queries + text
        mpad = self.mtok.pad_token_id if self.mtok.pad_token_id is not None else 0
        turn_ids = torch.full((len(turn_text), span - self.nq), mpad, dtype=torch.long)
        turn_mask = torch.zeros_like(turn_ids)
        for u, ids in enumerate(turn_text):
            turn_ids[u, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            turn_mask[u, : len(ids)] = 1

        feats = [ds.image_tokens(i) for ds, i in image_src]
        lv = max(f.shape[0] for f in feats)
        images = feats[0].new_zeros(len(feats), lv, feats[0].shape[1])
        image_mask = torch.zeros(len(feats), lv, dtype=torch.long)
        for i, f in enumerate(feats):
            images[i, : f.shape[0]], image_mask[i, : f.shape[0]] = f, 1
        image_lengths = [f.shape[0] for f in feats]
        image_token_index = torch.cat([i * lv + torch.arange(n) for i, n in enumerate(image_lengths)])
        image_cu_seqlens = torch.tensor([0] + image_lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        turn_image_tokens = sum(image_lengths[i] for i in turn_img_key)

        # --- LLM sequences ---
        def demo_part(demo_turns):
            f, t = [], []
            for u, d in demo_turns:
                df, dt = self.demo_llm_part(u, span, len(turn_text[u]), pool_ds[d])
                f += df
                t += dt
            return f, t

        train = self.mode == "train"
        seqs, tgt_seqs, num_labels = [], [], 0
        for (gi, q), uq in zip(rows, row_query_turn):
            f, t = ([], []) if self.shared_prefix else demo_part(group_demo_turns[gi])
            f += [uq * span + j for j in range(self.nq)]
            t += [self.pad_id] * self.nq
            prompt = list(self.llm_ids(query_ds[q].prompt))
            f += [-1] * len(prompt)
            t += prompt
            lab = [False] * len(f)
            if train:
                target = self.target_ids(query_ds[q].answer)
                num_labels += len(target)
                if self.family == "decoder":
                    f, t, lab = f + [-1] * len(target), t + target, lab + [True] * len(target)
                else:
                    tgt_seqs.append(([-1] * len(target), target, [True] * len(target)))
            seqs.append((f, t, lab))
        pad_left = not train  # generation continues every row at the same last column
        llm = pack(seqs, self.pad_id, pad_left, with_labels=train and self.family == "decoder")
        decoder = pack(tgt_seqs, self.pad_id, False, with_labels=True) if tgt_seqs else None
        prefix = prefix_ids = None
        if self.shared_prefix:
            prefix = pack([(*demo_part(d), []) for d in group_demo_turns], self.pad_id, False, with_labels=False)
            prefix_ids = torch.tensor([gi for gi, _ in rows], dtype=torch.long)
        return MMICTBatch(
            images,
            image_mask,
            torch.tensor(turn_img_key, dtype=torch.long),
            turn_ids,
            turn_mask,
            llm,
            decoder,
            prefix,
            prefix_ids,
            [q for _, q in rows],
            [query_ds[q].answers or (query_ds[q].answer,) for _, q in rows],
            [query_ds[q].task for _, q in rows],
            num_labels,
            image_token_index,
            image_cu_seqlens,
            turn_image_tokens,
        )


def batch_builder(run, mode: str, shared_prefix: bool = False, builder_cls=None) -> BatchBuilder:
    """``run``'s batch builder: its M-Hub and LLM tokenizers and its config's layout (query tokens,
    separator, LLM family, text cap). ``builder_cls``: another layout (a :class:`BatchBuilder`
    subclass, e.g. a baseline's, or any callable taking its arguments); default :class:`BatchBuilder`."""
    m = run.cfg.model
    return (builder_cls or BatchBuilder)(
        run.mhub_tokenizer,
        run.llm_tokenizer,
        m.num_query_tokens,
        m.separator,
        m.llm_family,
        run.cfg.data.max_text_tokens,
        mode=mode,
        shared_prefix=shared_prefix,
    )
