"""AIM: demonstrations aggregated into fused virtual tokens by a frozen multimodal LLM.

For each (image, text) demonstration the frozen backbone reads ``[image tokens ; text]`` on its
own (all demonstrations of a step batched in one call); the hidden states at the text positions,
from layer ``layer`` (default: the top, after the final norm), are the demonstration's
*aggregation*: frozen, so cached in a :class:`~mmict_kernels.icl.aim.bank.DemonstrationBank`.
A trainable projection turns them into fused virtual tokens, one per text token. The query's LLM
input is ``[fused demo 1] ... [fused demo N][query image tokens][query prompt]``; demonstration
images never enter the query's context, so a demonstration costs only its text tokens.

Queries that share their demonstrations (one-to-many sampling, or fixed shots at evaluation) are
one *group*: the group's fused tokens are a prefix computed once through the frozen LLM
(:class:`~mmict_kernels.modules.prefix_cache.DemoPrefixCache`) and every row attends to it
through ``ops.prefix_attention``; the backward sums the prefix gradients over the group's rows.
With one group per query (random demonstrations) the same path holds one prefix per row, still
without any concatenated copy. Zero-shot rows get an empty prefix (a fully masked slot).

Images and videos are the backbone's own (``backbones/``): a stacked tensor for fixed-size
inputs (LLaVA pixels, MMICT encoder features) or a list of
:class:`~mmict_kernels.icl.aim.visual.VisualInput` (LLaVA-NeXT tiles, Qwen2-VL patches; a video is
one item). Their token counts may differ per item; rows are padded here. For a backbone with 3-D
rotary positions (Qwen2-VL's M-RoPE) every row's own positions come from the backbone and the
prefix cache moves them after the group's fused tokens.

Design choices of ours (the paper's details are not known here; see README "AIM"): the top
layer by default, a linear projection initialised to the identity (an MLP as option), no
separator between demonstrations, and the text of a demonstration is the caller's (the driver's
``demo_text``: the caption alone for captioning, question + answer for VQA).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...modules.prefix_cache import DemoPrefixCache, forward_with_prefix, generate_with_prefix
from .backbones import Backbone, backbone_for
from .bank import DemonstrationBank, demonstration_key, module_fingerprint
from .visual import Segment, VisualInput, VisualTokens, text_segment
from .visual_cache import VisualTokenCache

IGNORE = -100


@dataclasses.dataclass
class AIMBatch:
    """A step's inputs. Demonstrations are listed once (``demo_*``); groups index into them.

    demo_images: the M distinct demonstrations' images or videos in the backbone's format: a
        (M, ...) tensor, or M :class:`~mmict_kernels.icl.aim.visual.VisualInput`.
    demo_text: M token-id lists (each demonstration's text: question + answer, or a caption).
    group_demos: per group, the demonstration indices in context order (may be empty: zero-shot).
    query_images: B query images or videos (a (B, ...) tensor or B VisualInput); query_group: (B,) the group of each query.
    query_prompt: B token-id lists; query_answer: B token-id lists (training targets, may be empty at evaluation).
    """

    demo_images: torch.Tensor | list[VisualInput] | None
    demo_text: list[list[int]]
    group_demos: list[list[int]]
    query_images: torch.Tensor | list[VisualInput]
    query_group: torch.Tensor
    query_prompt: list[list[int]]
    query_answer: list[list[int]]
    query_ids: list[int] | None = None  # the caller's ids of the queries, in row order (bookkeeping only)
    # The query prompt in the backbone's image-side tokenizer, for backbones whose query image tokens
    # read the prompt (MMICT's M-Hub: "textual-guided visual features"). None: prompt-free image tokens.
    query_image_text: list[list[int]] | None = None


class AIMModel(nn.Module):
    """Frozen backbone + trainable projection of demonstration aggregations.

    Args:
        backbone: an :class:`~mmict_kernels.icl.aim.backbones.Backbone` (frozen here), or a model
            :func:`~mmict_kernels.icl.aim.backbones.backbone_for` takes.
        layer: which hidden state to read (index into transformers' ``hidden_states`` tuple:
            0 = embeddings, -1 = the top after the final norm).
        projection: "linear" (identity-initialised) or "mlp" (Linear-GELU-Linear, residual).
        bank: optional persistent demonstration bank (aggregations are computed once).
        backend: ``ops.prefix_attention`` backend for the LLM ("auto": cuda/triton on GPU, torch on CPU).
        pad_id, eos_id: token ids of the LLM's vocabulary.
        visual_cache_bytes: keep up to this many bytes of frozen visual tokens of
            :class:`~mmict_kernels.icl.aim.visual.VisualInput` items in memory (on their device), so
            an image seen again skips the vision tower and its host syncs (0: off). Never used while
            the backbone has trainable parameters.
    """

    def __init__(
        self,
        backbone: Backbone | nn.Module,
        *,
        layer: int = -1,
        projection: str = "linear",
        bank: DemonstrationBank | None = None,
        backend: str = "auto",
        pad_id: int = 0,
        eos_id: int | None = None,
        visual_cache_bytes: int = 0,
    ):
        super().__init__()
        if projection not in ("linear", "mlp"):
            raise ValueError(f"projection: expected 'linear' or 'mlp', got {projection!r}")
        backbone = backbone_for(backbone)
        num_states = backbone.lm.config.get_text_config().num_hidden_layers + 1
        if not -num_states <= layer < num_states:
            raise ValueError(
                f"layer: expected an index into the {num_states} hidden states (-{num_states} .. {num_states - 1}), got {layer}"
            )
        self.backbone = backbone.requires_grad_(False).eval()
        d = backbone.hidden_size
        if projection == "linear":
            self.proj = nn.Linear(d, d)
            with torch.no_grad():
                self.proj.weight.copy_(torch.eye(d))
                self.proj.bias.zero_()
        else:
            self.proj = _ResidualMLP(d)
        self.layer, self.bank, self.backend = layer, bank, backend
        self.pad_id, self.eos_id = pad_id, eos_id
        self.visual_cache = VisualTokenCache(visual_cache_bytes) if visual_cache_bytes else None
        self._fingerprint: str | None = None

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: never dropout
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"proj.{k}": v for k, v in self.proj.state_dict().items()}

    @property
    def fingerprint(self) -> str:
        """The backbone's weights (every byte) and what else changes its aggregations (architecture, processor)."""
        if self._fingerprint is None:  # the backbone is frozen, so once is enough
            both = f"{module_fingerprint(self.backbone)};{self.backbone.describe()}"
            self._fingerprint = hashlib.sha256(both.encode()).hexdigest()[:32]
        return self._fingerprint

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def aggregate(self, images, texts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """The frozen aggregation of each demonstration: (T_i, hidden) states at its text positions.

        ``images``: one image or video per text, in the backbone's format (a tensor or VisualInput list).
        """
        if images is None or len(texts) == 0:
            return []
        if len(images) != len(texts):
            raise ValueError(f"images: expected one image per demonstration text ({len(texts)}), got {len(images)}")

        def compute(idx: list[int]) -> list[torch.Tensor]:
            return self._aggregate_now(_take(images, idx), [texts[i] for i in idx])

        if self.bank is None:
            return compute(list(range(len(texts))))
        keys = [demonstration_key(images[i], texts[i], self.fingerprint, self.layer) for i in range(len(texts))]
        device = self.proj_device
        return [t.to(device) for t in self.bank.get_or_compute(keys, compute)]

    def visual_tokens(self, images, text_ids=None) -> list[VisualTokens]:
        """The backbone's visual tokens of ``images``, through the visual token cache where it applies."""
        frozen = not any(p.requires_grad for p in self.backbone.parameters())
        if self.visual_cache is None or isinstance(images, torch.Tensor) or text_ids is not None or not frozen:
            return self.backbone.visual_tokens(images, text_ids)
        return self.visual_cache.get_or_compute(list(images), self.backbone.visual_tokens)

    def _aggregate_now(self, images, texts: list[Sequence[int]]) -> list[torch.Tensor]:
        visual = self.visual_tokens(images)  # one call for all (M items)
        device = visual[0].embeds.device
        ids, _valid = _right_pad(texts, self.pad_id, device)
        text_embeds = self.backbone.embed(ids)  # (M, T, d): every text in one lookup
        rows = [torch.cat([v.embeds, text_embeds[i, : len(t)].to(v.embeds.dtype)]) for i, (v, t) in enumerate(zip(visual, texts))]
        layouts = [v.segments + (text_segment(len(t)),) for v, t in zip(visual, texts)]
        # Right padding and a causal LM: the valid text positions never see the padding, and their
        # positions are the row's own either way; so no mask, which also spares transformers' host-side
        # check of the mask (a GPU sync).
        embeds, _, positions = self._pad_rows(rows, layouts, left_pad=False)
        states = self.backbone.hidden_states(embeds, positions)[self.layer]
        starts = [v.embeds.shape[0] for v in visual]
        return [states[i, n : n + len(t)].float().clone() for i, (n, t) in enumerate(zip(starts, texts))]

    def _pad_rows(self, rows: list[torch.Tensor], layouts: list[tuple[Segment, ...]], left_pad: bool):
        """Rows of ragged length -> (B, W, d) embeddings, (B, W) mask and the rows' own positions.

        Positions: None for backbones with 1-D positions (the callers count tokens), else (P, B, W)
        int64 from the backbone's layouts (host arrays, one copy to the device; padding holds 0).
        """
        width = max(r.shape[0] for r in rows)
        embeds = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=rows[0].device)
        own = [self.backbone.row_positions(layout) for layout in layouts]
        positions = None if own[0] is None else np.zeros((own[0].shape[0], len(rows), width), dtype=np.int64)
        for b, r in enumerate(rows):
            sl = slice(width - r.shape[0], width) if left_pad else slice(0, r.shape[0])
            embeds[b, sl], mask[b, sl] = r, 1
            if positions is not None:
                positions[:, b, sl] = own[b]
        if positions is not None:
            positions = torch.from_numpy(positions).to(rows[0].device)
        return embeds, mask, positions

    @property
    def proj_device(self) -> torch.device:
        return next(self.proj.parameters()).device

    def fused_prefixes(self, batch: AIMBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, Lp, d) right-padded fused tokens of each group's demonstrations, and (G,) lengths."""
        aggs = self.aggregate(batch.demo_images, batch.demo_text)
        dtype = self.backbone.embed_tokens.weight.dtype
        proj_dtype = next(self.proj.parameters()).dtype  # aggregations are kept in float32 (bank); the projection's own dtype
        fused = [self.proj(a.to(self.proj_device, proj_dtype)).to(dtype) for a in aggs]
        d = self.backbone.hidden_size
        prefixes = [torch.cat([fused[i] for i in g]) if g else fused_empty(d, dtype, self.proj_device) for g in batch.group_demos]
        lengths = torch.tensor([p.shape[0] for p in prefixes], dtype=torch.int32, device=self.proj_device)
        width = max([1] + [p.shape[0] for p in prefixes])  # host ints, no sync; one masked slot when every group is zero-shot
        padded = torch.stack([F.pad(p, (0, 0, 0, width - p.shape[0])) for p in prefixes])
        return padded, lengths

    def _cache(self, batch: AIMBatch) -> DemoPrefixCache:
        prefixes, lengths = self.fused_prefixes(batch)
        return DemoPrefixCache.build(self.backbone.lm, prefixes, lengths, backend=self.backend)

    def _query_rows(self, batch: AIMBatch, with_answer: bool, left_pad: bool):
        """Own tokens of each row: [query image tokens][prompt]([answer][eos]); embeddings, mask, labels, positions (padded)."""
        visual = self.visual_tokens(batch.query_images, batch.query_image_text)  # frozen
        if len(visual) != len(batch.query_prompt):
            raise ValueError(f"query_images: expected one per query prompt ({len(batch.query_prompt)}), got {len(visual)}")
        device = visual[0].embeds.device
        rows, labels, layouts = [], [], []
        for v, prompt, answer in zip(visual, batch.query_prompt, batch.query_answer):
            tail = (list(answer) + ([self.eos_id] if self.eos_id is not None else [])) if with_answer else []
            ids = torch.tensor(list(prompt) + tail, dtype=torch.long, device=device)
            rows.append(torch.cat([v.embeds, self.backbone.embed(ids).to(v.embeds.dtype)]))
            labels.append(torch.tensor([IGNORE] * (v.embeds.shape[0] + len(prompt)) + tail, dtype=torch.long, device=device))
            layouts.append(v.segments + (text_segment(len(prompt) + len(tail)),))
        embeds, mask, positions = self._pad_rows(rows, layouts, left_pad)  # generation pads on the left
        lab = torch.full(mask.shape, IGNORE, dtype=torch.long, device=device)
        for b, target in enumerate(labels):
            sl = slice(mask.shape[1] - target.shape[0], mask.shape[1]) if left_pad else slice(0, target.shape[0])
            lab[b, sl] = target
        return embeds, mask, lab, positions

    # ------------------------------------------------------------------------------------------
    def _prefix_call(self, batch: AIMBatch, training: bool) -> tuple[DemoPrefixCache, torch.Tensor, dict]:
        """(the groups' demonstration cache, the rows' labels, the row arguments of ``forward_with_prefix`` /
        ``generate_with_prefix``): with the answers, right-padded, in training; prompts only, left-padded, to generate."""
        cache = self._cache(batch)
        embeds, mask, labels, positions = self._query_rows(batch, with_answer=training, left_pad=not training)
        rows = dict(
            inputs_embeds=embeds, attention_mask=mask, prefix_ids=batch.query_group.to(embeds.device), row_position_ids=positions
        )
        return cache, labels, rows

    def forward(self, batch: AIMBatch) -> tuple[torch.Tensor, int]:
        """(sum of the answer tokens' NLL, number of answer tokens)."""
        cache, labels, rows = self._prefix_call(batch, training=True)
        logits = forward_with_prefix(self.backbone.lm, cache, **rows).logits
        # logits at t predict token t + 1 of the row's own sequence
        target = labels[:, 1:]
        loss = F.cross_entropy(
            logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)).reshape(-1, logits.shape[-1]),
            target.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        if not any(batch.group_demos) and torch.is_grad_enabled():
            # Zero-shot rows do not depend on the projection; keep the loss differentiable (zero
            # gradient) so a training loop can call backward on any batch.
            loss = loss + 0.0 * sum(p.sum() for p in self.proj.parameters())
        # the target count from the batch's lists (host ints): no sync
        count = sum(len(a) + (self.eos_id is not None) for a in batch.query_answer)
        return loss, count

    @torch.no_grad()
    def generate(self, batch: AIMBatch, max_new_tokens: int = 4) -> list[list[int]]:
        """Greedy answers (token ids, up to the first eos) for every query of ``batch``."""
        cache, _, rows = self._prefix_call(batch, training=False)
        new = generate_with_prefix(
            self.backbone.lm,
            cache,
            **rows,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            backend=self.backend,
        )
        out = []
        for row in new.tolist():
            out.append(row[: row.index(self.eos_id)] if self.eos_id is not None and self.eos_id in row else row)
        return out


class _ResidualMLP(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)  # starts as the identity, like the linear projection

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


def _take(images, idx: list[int]):
    """The images at ``idx`` of a stacked tensor or a list."""
    return images[idx] if isinstance(images, torch.Tensor) else [images[i] for i in idx]


def fused_empty(d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.zeros(0, d, dtype=dtype, device=device)


def _right_pad(seqs: Sequence[Sequence[int]], fill: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max([len(s) for s in seqs] + [0])
    ids = torch.full((len(seqs), width), fill, dtype=torch.long)
    valid = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
            valid[i, : len(s)] = 1
    return ids.to(device), valid.to(device)
