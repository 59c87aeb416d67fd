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

Design choices of ours (the paper's details are not known here; see README "AIM"): the top
layer by default, a linear projection initialised to the identity (an MLP as option), no
separator between demonstrations, and the text of a demonstration is the caller's (the driver's
``demo_text``: the caption alone for captioning, question + answer for VQA).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...modules.prefix_cache import DemoPrefixCache, forward_with_prefix, generate_with_prefix
from .backbones import Backbone
from .bank import DemonstrationBank, demonstration_key, module_fingerprint

IGNORE = -100


@dataclasses.dataclass
class AIMBatch:
    """A step's inputs. Demonstrations are listed once (``demo_*``); groups index into them.

    demo_images: (M, ...) images of the M distinct demonstrations, in the backbone's format.
    demo_text: M token-id lists (each demonstration's text: question + answer, or a caption).
    group_demos: per group, the demonstration indices in context order (may be empty: zero-shot).
    query_images: (B, ...) query images; query_group: (B,) the group of each query.
    query_prompt: B token-id lists; query_answer: B token-id lists (training targets, may be empty at evaluation).
    """

    demo_images: torch.Tensor | None
    demo_text: list[list[int]]
    group_demos: list[list[int]]
    query_images: torch.Tensor
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
        backbone: an :class:`~mmict_kernels.icl.aim.backbones.Backbone` (frozen here).
        layer: which hidden state to read (index into transformers' ``hidden_states`` tuple:
            0 = embeddings, -1 = the top after the final norm).
        projection: "linear" (identity-initialised) or "mlp" (Linear-GELU-Linear, residual).
        bank: optional persistent demonstration bank (aggregations are computed once).
        backend: ``ops.prefix_attention`` backend for the LLM ("auto": cuda/triton on GPU, torch on CPU).
        pad_id, eos_id: token ids of the LLM's vocabulary.
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        layer: int = -1,
        projection: str = "linear",
        bank: DemonstrationBank | None = None,
        backend: str = "auto",
        pad_id: int = 0,
        eos_id: int | None = None,
    ):
        super().__init__()
        if projection not in ("linear", "mlp"):
            raise ValueError(f"projection: expected 'linear' or 'mlp', got {projection!r}")
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
        self._fingerprint: str | None = None

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: never dropout
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"proj.{k}": v for k, v in self.proj.state_dict().items()}

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:  # the backbone is frozen, so once is enough
            self._fingerprint = module_fingerprint(self.backbone)
        return self._fingerprint

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def aggregate(self, images: torch.Tensor, texts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """The frozen aggregation of each demonstration: (T_i, hidden) states at its text positions."""
        if images is None or len(texts) == 0:
            return []
        if images.shape[0] != len(texts):
            raise ValueError(f"images: expected one image per demonstration text ({len(texts)}), got {images.shape[0]}")

        def compute(idx: list[int]) -> list[torch.Tensor]:
            return self._aggregate_now(images[idx], [texts[i] for i in idx])

        if self.bank is None:
            return compute(list(range(len(texts))))
        keys = [demonstration_key(images[i], texts[i], self.fingerprint, self.layer) for i in range(len(texts))]
        device = self.proj_device
        return [t.to(device) for t in self.bank.get_or_compute(keys, compute)]

    def _aggregate_now(self, images: torch.Tensor, texts: list[Sequence[int]]) -> list[torch.Tensor]:
        img = self.backbone.image_tokens(images)  # (M, n, d)
        n = img.shape[1]
        ids, _valid = _right_pad(texts, self.pad_id, img.device)
        embeds = torch.cat([img, self.backbone.embed(ids).to(img.dtype)], dim=1)
        # Right padding and a causal LM: the valid text positions never see the padding, and their
        # positions are 0..n+len-1 either way; so no mask, which also spares transformers' host-side
        # check of the mask (a GPU sync).
        states = self.backbone.hidden_states(embeds, None)[self.layer]
        return [states[i, n : n + len(t)].float().clone() for i, t in enumerate(texts)]

    @property
    def proj_device(self) -> torch.device:
        return next(self.proj.parameters()).device

    def fused_prefixes(self, batch: AIMBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, Lp, d) right-padded fused tokens of each group's demonstrations, and (G,) lengths."""
        aggs = self.aggregate(batch.demo_images, batch.demo_text)
        dtype = self.backbone.embed_tokens.weight.dtype
        fused = [self.proj(a.to(self.proj_device)).to(dtype) for a in aggs]
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
        """Own tokens of each row: [query image tokens][prompt]([answer][eos]); embeddings, mask, labels (padded)."""
        img = self.backbone.image_tokens(batch.query_images, batch.query_image_text)  # (B, n, d), frozen
        n, device = img.shape[1], img.device
        rows, labels = [], []
        for b, (prompt, answer) in enumerate(zip(batch.query_prompt, batch.query_answer)):
            tail = (list(answer) + ([self.eos_id] if self.eos_id is not None else [])) if with_answer else []
            ids = torch.tensor(list(prompt) + tail, dtype=torch.long, device=device)
            rows.append(torch.cat([img[b], self.backbone.embed(ids).to(img.dtype)]))
            labels.append(torch.tensor([IGNORE] * (n + len(prompt)) + tail, dtype=torch.long, device=device))
        width = max(r.shape[0] for r in rows)
        embeds = img.new_zeros(len(rows), width, img.shape[-1])
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        lab = torch.full((len(rows), width), IGNORE, dtype=torch.long, device=device)
        for b, (r, target) in enumerate(zip(rows, labels)):
            sl = slice(width - r.shape[0], width) if left_pad else slice(0, r.shape[0])  # generation pads on the left
            embeds[b, sl], mask[b, sl], lab[b, sl] = r, 1, target
        return embeds, mask, lab

    # ------------------------------------------------------------------------------------------
    def forward(self, batch: AIMBatch) -> tuple[torch.Tensor, int]:
        """(sum of the answer tokens' NLL, number of answer tokens)."""
        cache = self._cache(batch)
        embeds, mask, labels = self._query_rows(batch, with_answer=True, left_pad=False)
        logits = forward_with_prefix(
            self.backbone.lm, cache, inputs_embeds=embeds, attention_mask=mask, prefix_ids=batch.query_group.to(embeds.device)
        ).logits
        # logits at t predict token t + 1 of the row's own sequence
        target = labels[:, 1:]
        loss = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
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
        cache = self._cache(batch)
        embeds, mask, _ = self._query_rows(batch, with_answer=False, left_pad=True)
        new = generate_with_prefix(
            self.backbone.lm,
            cache,
            inputs_embeds=embeds,
            attention_mask=mask,
            prefix_ids=batch.query_group.to(embeds.device),
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
