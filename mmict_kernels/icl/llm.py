"""The frozen LLM: a transformers decoder-only causal LM (OPT, Llama-family) or an encoder-decoder (T5).

Built from a config (random weights, seeded: the same in every process and every run, so an
evaluation rebuilds exactly the LLM the training saw) or loaded from a local checkpoint folder.
The MMICT separator ``<|endofchunk|>`` is added to the tokenizer when missing, with one more
(frozen) embedding row.
"""

from __future__ import annotations

import os

import torch

# Tiny LLMs for the embedded data (the paper's: FlanT5-XL, OPT-2.7b/6.7b).
# Llama and Qwen2 share their config keys (grouped-query attention, 2 K/V heads for 4 query heads).
_TINY_LLAMA_LIKE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "initializer_range": 0.2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
TINY_LLM = {
    "llama": _TINY_LLAMA_LIKE,
    "opt": {
        "hidden_size": 64,
        "ffn_dim": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "word_embed_proj_dim": 64,
        "init_std": 0.2,
        "max_position_embeddings": 512,
    },
    "qwen2": _TINY_LLAMA_LIKE,
    # Untied output head: T5's tied head rescales by d_model ** -0.5, too flat for a frozen random model.
    "t5": {
        "d_model": 64,
        "d_kv": 16,
        "d_ff": 128,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "num_heads": 4,
        "dropout_rate": 0.0,
        "tie_word_embeddings": False,
    },
}


def build_llm(family: str, llm_type: str, checkpoint: str | None, llm_config: dict, tokenizer, separator: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForCausalLM if family == "decoder" else AutoModelForSeq2SeqLM
    if separator not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [separator]})
    if checkpoint:
        if not os.path.isdir(checkpoint):
            raise FileNotFoundError(f"model.llm_checkpoint: folder not found: {checkpoint}")
        llm = auto.from_pretrained(checkpoint)
    else:
        special = {
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
        }
        if family == "encoder-decoder":
            special["decoder_start_token_id"] = tokenizer.pad_token_id
        values = {**TINY_LLM.get(llm_type, {}), **llm_config, "vocab_size": len(tokenizer), **special}
        config = AutoConfig.for_model(llm_type, **values)
        if bool(getattr(config, "is_encoder_decoder", False)) != (family == "encoder-decoder"):
            raise ValueError(f"model.llm_type {llm_type!r} does not match model.llm_family {family!r}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            llm = auto.from_config(config)
    if llm.get_input_embeddings().num_embeddings < len(tokenizer):
        # The new rows (the separator) are random: seed them, so that training and evaluation
        # (separate processes) build the same frozen LLM.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 7919)
            llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    llm.eval().requires_grad_(False)
    return llm


def llm_blocks(llm: torch.nn.Module) -> list[torch.nn.Module]:
    """The LLM's repeated blocks (transformers' ``_no_split_modules``: T5Block, LlamaDecoderLayer, ...), outermost only.

    The unit of FSDP sharding and of gradient checkpointing.
    """
    names = set(getattr(llm, "_no_split_modules", None) or ())
    found = [m for m in llm.modules() if type(m).__name__ in names]
    inner = {id(c) for m in found for c in m.modules() if c is not m}
    blocks = [m for m in found if id(m) not in inner]
    if not blocks:
        raise ValueError(f"{type(llm).__name__} names no repeated block (_no_split_modules)")
    return blocks


def checkpoint_blocks(llm: torch.nn.Module) -> None:
    """Recompute each block of the frozen LLM in the backward instead of keeping its activations.

    transformers' own switch only acts in training mode, and the frozen LLM always runs in eval
    mode (no dropout), so each block's ``forward`` is wrapped here (non-reentrant
    ``torch.utils.checkpoint``; module hooks, e.g. FSDP's, stay outside). The caller must not use a
    KV cache in such a forward (the recompute would append to it again).
    """
    import torch.utils.checkpoint

    for block in llm_blocks(llm):
        if "forward" in vars(block):  # already wrapped
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        block.forward = forward
