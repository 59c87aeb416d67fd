"""The paper's baselines, built on the driver's batch layout and model (``batch.py``, ``model.py``).

- **VanillaFine-Tune**: the query alone. It is the driver's own layout with zero demonstrations
  (``BatchBuilder`` with ``num_demos=0``): ``[query feats][prompt][target]``; nothing here.
- **Vanilla ICT**: every demonstration enters the LLM as its *raw* multimodal content, its visual
  features followed by the word embeddings of its text, instead of M-Hub's fused text features::

      [demo 1 visual feats][demo 1 text tokens][SEP] ... [SEP][query feats][prompt tokens][target tokens]

  A demonstration's visual features are the FC of M-Hub's query outputs for its image with NO
  text (BLIP-2's image-only Q-Former output, ``num_query_tokens`` positions), i.e. the visual
  tokens a BLIP-2/InstructBLIP model feeds its LLM. We chose these over the FC of the
  ``ln_vision`` image tokens because (1) the model stays exactly MMICT's (same trainable modules
  and parameter count: only what the LLM reads for a demonstration differs), so the comparison
  isolates M-Hub's demonstration fusion; (2) it is also what ``aim.MMICTBackbone``
  calls an image's tokens; (3) raw ViT tokens would need a second FC that MMICT does not have and
  cost 257 LLM positions per frame at the published shape (32 here per image).
- **AIM** (``aim/``): :func:`aim_batch` turns the driver's sampled groups into an ``AIMBatch``,
  so AIM sees exactly the demonstrations the other methods see.

Everything M-Hub computes still goes through ONE batched call per step (``MMICTModel.mhub_outputs``):
a Vanilla ICT demonstration is a turn with an empty text, read at its query positions.
"""

from __future__ import annotations

import torch

from .batch import BatchBuilder
from .sampling import Group

METHODS = ("finetune", "vanilla_ict", "mmict", "aim")
LABELS = {"finetune": "VanillaFine-Tune", "vanilla_ict": "Vanilla ICT", "mmict": "MMICT", "aim": "AIM"}


class VanillaICTBuilder(BatchBuilder):
    """``BatchBuilder`` with the Vanilla ICT demonstration layout (same arguments, same batch type)."""

    def demo_mhub_ids(self, example) -> tuple:
        return ()  # the demonstration's image alone: read at the turn's query positions

    def demo_llm_part(self, turn: int, span: int, n_mhub_text: int, example) -> tuple[list[int], list[int]]:
        """Its visual features (the turn's query outputs), its text as LLM tokens, the separator."""
        text = list(self.llm_ids(self.demo_text(example)))  # MMICT's demonstration text
        feats = [turn * span + j for j in range(self.nq)] + [-1] * len(text) + [-1]
        return feats, [self.pad_id] * self.nq + text + [self.sep_id]


def builder_class(method: str) -> type[BatchBuilder]:
    """The batch layout of a method trained through the driver's ``Trainer`` (not AIM)."""
    if method == "vanilla_ict":
        return VanillaICTBuilder
    if method in ("finetune", "mmict"):
        return BatchBuilder
    raise ValueError(f"method: expected 'finetune', 'vanilla_ict' or 'mmict' for a batch layout, got {method!r}")


def aim_batch(groups: list[Group], query_ds, pool_ds, builder: BatchBuilder, with_answer: bool = True):
    """An ``AIMBatch`` for the same groups: images as frozen encoder features, text as LLM token ids.

    A demonstration's text is MMICT's (``BatchBuilder.demo_text``: the caption alone for captioning,
    question + answer for VQA); the answer
    ids are the driver's target ids without the end token (``AIMModel`` appends its ``eos_id``).
    Images must all have the same number of tokens (AIM stacks them): one frame each.
    """
    from .aim import AIMBatch

    distinct = sorted({d for g in groups for d in g.demos})
    where = {d: i for i, d in enumerate(distinct)}
    queries = [q for g in groups for q in g.queries]

    def stack(ds, idx):
        feats = [ds.image_tokens(i) for i in idx]
        if len({f.shape[0] for f in feats}) > 1:
            raise ValueError("AIM: every image must have the same number of tokens (single frames); got ragged videos")
        return torch.stack(feats)

    eos = [builder.eos_id] if builder.eos_id is not None else []

    def answer_ids(ex):
        ids = builder.target_ids(ex.answer)
        return ids[: len(ids) - len(eos)] if eos else ids

    return AIMBatch(
        demo_images=stack(pool_ds, distinct) if distinct else None,
        demo_text=[list(builder.llm_ids(builder.demo_text(pool_ds[d]))) for d in distinct],
        group_demos=[[where[d] for d in g.demos] for g in groups],
        query_images=stack(query_ds, queries),
        query_group=torch.tensor([gi for gi, g in enumerate(groups) for _ in g.queries], dtype=torch.long),
        query_prompt=[list(builder.llm_ids(query_ds[q].prompt)) for q in queries],
        query_answer=[answer_ids(query_ds[q]) if with_answer else [] for q in queries],
        query_ids=queries,
        query_image_text=[list(builder.mhub_ids(query_ds[q].prompt)) for q in queries],  # MMICT's prompt-aware query features
    )
