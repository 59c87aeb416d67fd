"""MMICTModel: trainable ln_vision + M-Hub (+ query tokens) + FC, in front of a frozen LLM.

The frozen image encoder is not inside: its features are computed once per image and cached by
the data loader (``data.py``), so a training step starts from the encoder's output.

One step: (1) ``ln_vision`` on the batch's distinct images; (2) ONE batched M-Hub call over every
demonstration and query turn of the batch (the image K/V projected once per distinct image and
gathered per turn); (3) the FC on exactly the M-Hub positions the LLM reads; (4) the LLM
embeddings of the token positions; (5) the frozen LLM and the NLL of the target tokens. With
one-to-many groups on a decoder-only LLM, each group's demonstration prefix runs through the
LLM once (``modules.prefix_cache``) and every row of the group attends to it.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from .batch import IGNORE, MMICTBatch, Packed


class MMICTModel(nn.Module):
    def __init__(
        self,
        mhub: nn.Module,
        llm: nn.Module,
        vision_width: int,
        llm_family: str,
        num_query_tokens: int,
        ln_vision: nn.LayerNorm | None = None,
        prefix_backend: str = "auto",
    ):
        super().__init__()
        self.ln_vision = ln_vision if ln_vision is not None else nn.LayerNorm(vision_width)
        self.mhub = mhub
        self.proj = nn.Linear(mhub.config.hidden_size, llm.get_input_embeddings().embedding_dim)
        self.llm = llm
        self.llm_family = llm_family
        self.num_query_tokens = num_query_tokens
        self.prefix_backend = prefix_backend
        self.llm.requires_grad_(False)
        self._keep_logits = "logits_to_keep" in inspect.signature(llm.forward).parameters

    # ------------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything that trains (ln_vision, M-Hub with its query tokens, FC); never the LLM."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("llm.")}

    def trainable_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("llm.") and p.requires_grad]

    def train(self, mode: bool = True):
        super().train(mode)
        self.llm.eval()  # frozen: no dropout in the LLM, ever
        return self

    def enable_gradient_checkpointing(self, llm: bool = True) -> None:
        """Recompute the M-Hub's layers (and, with ``llm``, the frozen LLM's blocks) in the backward.

        Saves the activations of every layer for the cost of a second forward; the gradients are
        unchanged. The training forward never uses the LLM's KV cache, so the recompute is exact.
        """
        from .llm import checkpoint_blocks

        if hasattr(self.mhub, "qformer"):  # transformers' Q-Former (the baseline implementation)
            qformer = self.mhub.qformer
            enable = getattr(qformer, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:  # transformers before the rename
                qformer.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.mhub.gradient_checkpointing_enable()
        if llm:
            checkpoint_blocks(self.llm)

    # ------------------------------------------------------------------------------------
    def mhub_outputs(self, batch: MMICTBatch) -> torch.Tensor:
        """(U, Nq + T, hidden): the M-Hub over every turn of the batch in one call."""
        images = self.ln_vision(batch.images)
        qmask = batch.turn_mask.new_ones(batch.turn_mask.shape[0], self.num_query_tokens)
        attention_mask = torch.cat([qmask, batch.turn_mask], dim=1)
        if hasattr(self.mhub, "encode_image") and not self._image_tokens_per_turn(batch, images):
            # Project each distinct image's K/V once, then gather them for the turns that show it. The
            # valid tokens were packed on the host (index, offsets, count), so nothing waits on the GPU.
            if batch.image_token_index is not None:
                tokens = images.flatten(0, 1).index_select(0, batch.image_token_index)
                cache = self.mhub.encode_image(tokens, cu_seqlens=batch.image_cu_seqlens)
                cache = cache.select(batch.turn_image, total_tokens=batch.turn_image_tokens)
            else:
                cache = self.mhub.encode_image(images, batch.image_mask).select(batch.turn_image)
            out = self.mhub(input_ids=batch.turn_ids, attention_mask=attention_mask, image_kv=cache)
        else:
            out = self.mhub(
                input_ids=batch.turn_ids,
                attention_mask=attention_mask,
                encoder_hidden_states=images[batch.turn_image],
                encoder_attention_mask=batch.image_mask[batch.turn_image],
            )
        return out.last_hidden_state

    def _image_tokens_per_turn(self, batch: MMICTBatch, images: torch.Tensor) -> bool:
        """Whether FusedMHub gets each turn's image tokens, and attends without forming K and V
        (``modules/mhub/absorbed.py``), rather than each distinct image's K/V computed once: the hub's
        own choice for the batch's turns and images (few queries on a CPU: even with images shared)."""
        num_images, tokens = images.shape[:2]
        turns = batch.turn_image.shape[0]
        return self.mhub.attends_image_tokens(images, self.num_query_tokens, tokens, images.requires_grad, turns, num_images)

    def embed(self, packed: Packed, mhub_flat: torch.Tensor) -> torch.Tensor:
        """(B, L, llm width): FC(M-Hub output) at feature positions, LLM token embeddings elsewhere."""
        embeds = self.llm.get_input_embeddings()(packed.token_ids)
        feats = self.proj(mhub_flat[packed.feat_sources])  # the positions were found on the host: no GPU sync
        flat = embeds.flatten(0, 1).index_put((packed.feat_positions,), feats.to(embeds.dtype))
        return flat.view_as(embeds)

    # ------------------------------------------------------------------------------------
    def forward(self, batch: MMICTBatch) -> tuple[torch.Tensor, int]:
        """(sum of the target tokens' NLL, number of target tokens); the caller normalises.

        No host sync: the target count and span were computed when the batch was built.
        """
        flat = self.mhub_outputs(batch).flatten(0, 1)
        if self.llm_family == "encoder-decoder":
            labels = batch.decoder.labels
            logits = self.llm(
                inputs_embeds=self.embed(batch.llm, flat), attention_mask=batch.llm.attention_mask, labels=labels, use_cache=False
            ).logits
            nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")
            return nll, batch.num_label_tokens
        labels = batch.llm.labels
        # Logits are only needed where a target token is predicted (one position earlier).
        if batch.llm.target_span is None:  # no target tokens at all: nothing to learn from this batch
            return flat.sum() * 0.0, 0
        first, last = batch.llm.target_span
        embeds = self.embed(batch.llm, flat)
        kwargs = {"logits_to_keep": torch.arange(first, last, device=embeds.device)} if self._keep_logits else {}
        if batch.prefix is not None:
            logits = self._rows_with_prefix(batch, flat, embeds, **kwargs)
        else:
            logits = self.llm(inputs_embeds=embeds, attention_mask=batch.llm.attention_mask, use_cache=False, **kwargs).logits
        if not self._keep_logits:
            logits = logits[:, first:last]
        targets = labels[:, first + 1 : last + 1]
        nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        return nll, batch.num_label_tokens

    def _prefix_cache(self, batch: MMICTBatch, flat: torch.Tensor):
        from ..modules.prefix_cache import DemoPrefixCache

        prefix_embeds = self.embed(batch.prefix, flat)
        lengths = batch.prefix.attention_mask.sum(1)
        return DemoPrefixCache.build(self.llm, prefix_embeds, lengths, backend=self.prefix_backend)

    def _rows_with_prefix(self, batch, flat, embeds, **kwargs):
        from ..modules.prefix_cache import forward_with_prefix

        cache = self._prefix_cache(batch, flat)
        out = forward_with_prefix(
            self.llm, cache, inputs_embeds=embeds, attention_mask=batch.llm.attention_mask, prefix_ids=batch.prefix_ids, **kwargs
        )
        return out.logits

    # ------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        batch: MMICTBatch,
        max_new_tokens: int = 10,
        min_new_tokens: int = 1,
        num_beams: int = 1,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        synced_gpus: bool = False,
    ) -> torch.Tensor:
        """(B, T) new tokens after each row's context (left-padded batch from a "generate" BatchBuilder).

        ``synced_gpus``: keep stepping until every process has finished (an FSDP-sharded LLM needs
        the same forwards on every process); not for the shared-prefix path."""
        flat = self.mhub_outputs(batch).flatten(0, 1)
        common = dict(  # what both generation paths take alike
            inputs_embeds=self.embed(batch.llm, flat),
            attention_mask=batch.llm.attention_mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
        if batch.prefix is not None:
            from ..modules.prefix_cache import generate_with_prefix

            if num_beams != 1:
                raise ValueError("num_beams: the shared-prefix generation is greedy (num_beams=1)")
            return generate_with_prefix(self.llm, self._prefix_cache(batch, flat), prefix_ids=batch.prefix_ids, **common)
        out = self.llm.generate(
            **common,
            min_new_tokens=min_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            **({"synced_gpus": True} if synced_gpus else {}),
        )
        if self.llm_family == "encoder-decoder":
            out = out[:, 1:]  # drop the decoder start token
        return out
