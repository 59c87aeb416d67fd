"""DemoPrefixCache / forward_with_prefix / generate_with_prefix against the stock transformers model.

The stock baseline runs each row as one concatenated sequence [its group's valid prefix ; its
valid tokens], left-padded across rows, with eager attention. Logits and gradients follow the
the oracle rule of CONTRIBUTING.md (float64 stock model as the oracle, float32 stock model as the rounding
yardstick); generated tokens must be identical. Tiny random-weight models from configs:
Llama and Qwen2 with grouped-query attention; GPT-NeoX (partial rotary) and OPT (learned positions)
for logits.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from helpers.devices import requires_gpu
from helpers.oracle import assert_close_by_rule
from mmict_kernels.modules.prefix_cache import (
    ATTENTION_NAME,
    DemoPrefixCache,
    RowKVCache,
    forward_with_prefix,
    generate_with_prefix,
)
from mmict_kernels.modules.prefix_cache.attention import prefix_cache_attention
from mmict_kernels.modules.prefix_cache.generate import _pick_next_token

HIDDEN, VOCAB = 64, 100


def _tiny(family: str, kv_heads: int = 2):
    common = dict(hidden_size=HIDDEN, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, vocab_size=VOCAB)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=kv_heads, attn_implementation="eager", **common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=kv_heads, attn_implementation="eager", **common))
    elif family == "gptneox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(rotary_pct=0.5, attn_implementation="eager", **common))
    else:  # OPT: learned absolute positions (BLIP-2 / MMICT's decoder-only LLM)
        common.pop("intermediate_size")
        model = OPTForCausalLM(OPTConfig(ffn_dim=128, word_embed_proj_dim=HIDDEN, attn_implementation="eager", **common))
    return model.eval().requires_grad_(False)  # frozen LM


_MODELS: dict = {}


def tiny_model(family: str):
    if family not in _MODELS:
        torch.manual_seed(1234)
        _MODELS[family] = _tiny(family)
    return _MODELS[family]


def ragged_demos(lengths, max_len=None):
    """(G, Lp, hidden) right-padded demonstration embeddings; padding holds garbage, not zeros."""
    max_len = max_len or max(lengths)
    return torch.randn(len(lengths), max_len, HIDDEN), torch.tensor(lengths)


def concatenated(demos, demo_lengths, rows, row_mask, prefix_ids):
    """Stock-model inputs: per row [group prefix ; valid row tokens], left-padded to a common length.

    Returns embeds (B, T, hidden), mask (B, T), position_ids (B, T) and, per row, the index in
    the concatenated sequence of each of the row's valid tokens (in order).
    """
    seqs, where = [], []
    for b in range(rows.shape[0]):
        g = int(prefix_ids[b])
        n = int(demo_lengths[g])
        valid = row_mask[b].bool()
        seqs.append(torch.cat([demos[g, :n], rows[b][valid]]))  # indexing keeps the autograd link to demos
        where.append(n + torch.arange(int(valid.sum())))
    total = max(s.shape[0] for s in seqs)
    embeds, mask = [], torch.zeros(len(seqs), total, dtype=torch.long)
    for b, s in enumerate(seqs):
        pad = total - s.shape[0]
        embeds.append(torch.cat([s.new_zeros(pad, HIDDEN), s]))
        mask[b, pad:] = 1
        where[b] = where[b] + pad
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    return torch.stack(embeds), mask, position_ids, where


def stock_row_logits(model, demos, demo_lengths, rows, row_mask, prefix_ids):
    """Each row alone (no padding at all, so no mask can be wrong): [group prefix ; valid row tokens]."""
    out = []
    for b in range(rows.shape[0]):
        g = int(prefix_ids[b])
        n = int(demo_lengths[g])
        seq = torch.cat([demos[g, :n], rows[b][row_mask[b].bool()]])[None]
        out.append(model(inputs_embeds=seq).logits[0, n:])
    return torch.cat(out)


def prefix_row_logits(model, demos, demo_lengths, rows, row_mask, prefix_ids, **kw):
    cache = DemoPrefixCache.build(model, demos, demo_lengths)
    logits = forward_with_prefix(model, cache, inputs_embeds=rows, attention_mask=row_mask, prefix_ids=prefix_ids, **kw).logits
    return torch.cat([logits[b, row_mask[b].bool()] for b in range(rows.shape[0])])


# Rows mix left padding (generation), right padding (training) and none; groups have ragged lengths.
ROW_MASK = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
PREFIX_IDS = torch.tensor([2, 0, 1, 0, 2])
DEMO_LENGTHS = [6, 2, 4]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gptneox", "opt"])
def test_logits_match_concatenated_stock_model(family):
    model = tiny_model(family)
    demos, lengths = ragged_demos(DEMO_LENGTHS, max_len=7)
    rows = torch.randn(5, 5, HIDDEN)
    ours = prefix_row_logits(model, demos, lengths, rows, ROW_MASK, PREFIX_IDS)
    ref32 = stock_row_logits(model, demos, lengths, rows, ROW_MASK, PREFIX_IDS)
    ref64 = stock_row_logits(copy.deepcopy(model).double(), demos.double(), lengths, rows.double(), ROW_MASK, PREFIX_IDS)
    assert_close_by_rule(f"{family} logits", ours, ref64, ref32)
    assert model.config._attn_implementation == "eager", "the attention implementation must be restored"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gradients_to_demonstrations_match_concatenated(family):
    model = tiny_model(family)
    demos, lengths = ragged_demos(DEMO_LENGTHS, max_len=7)
    rows = torch.randn(5, 5, HIDDEN)
    n_valid = int(ROW_MASK.sum())
    weight = torch.randn(n_valid, VOCAB, dtype=torch.float64)

    def grads(run, model, dtype):
        d = demos.to(dtype).requires_grad_(True)
        r = rows.to(dtype).requires_grad_(True)
        loss = (run(model, d, lengths, r, ROW_MASK, PREFIX_IDS) * weight.to(dtype)).sum()
        return torch.autograd.grad(loss, (d, r))

    ours = grads(prefix_row_logits, model, torch.float32)
    ref32 = grads(stock_row_logits, model, torch.float32)
    ref64 = grads(stock_row_logits, copy.deepcopy(model).double(), torch.float64)
    for name, o, r64, r32 in zip(("demo_embeds", "row_embeds"), ours, ref64, ref32):
        assert_close_by_rule(f"{family} grad {name}", o, r64, r32)
    # padding of the demonstrations never influences anything
    for g, n in enumerate(DEMO_LENGTHS):
        assert ours[0][g, n:].abs().max() == 0


def _prompts(lengths, max_len):
    """Left-padded prompt token ids and mask."""
    ids = torch.randint(1, VOCAB, (len(lengths), max_len))
    mask = torch.zeros(len(lengths), max_len, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, max_len - n :] = 1
    return ids * mask, mask


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
def test_greedy_generation_matches_stock_generate(family):
    model = tiny_model(family)
    demos, lengths = ragged_demos([5, 3], max_len=6)
    ids, mask = _prompts([4, 2, 3, 1], max_len=4)
    prefix_ids = torch.tensor([0, 1, 1, 0])
    cache = DemoPrefixCache.build(model, demos, lengths)
    ours = generate_with_prefix(model, cache, ids, attention_mask=mask, prefix_ids=prefix_ids, max_new_tokens=12)

    rows = model.get_input_embeddings()(ids)
    embeds, cat_mask, _, _ = concatenated(demos, lengths, rows, mask, prefix_ids)
    stock = model.generate(
        inputs_embeds=embeds, attention_mask=cat_mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    assert ours.shape == (4, 12)
    assert torch.equal(ours, stock[:, -12:])


def _stock_sampling_loop(model, embeds, mask, steps, seed, **sampling):
    """Reference decode without any cache: rerun the whole concatenated sequence every step."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits[:, -1]
        token = _pick_next_token(logits, True, generator=gen, **sampling)
        out.append(token)
        embeds = torch.cat([embeds, model.get_input_embeddings()(token[:, None])], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1)


@torch.no_grad()
def test_sampling_matches_uncached_stock_loop_and_filters():
    model = tiny_model("llama")
    demos, lengths = ragged_demos([4, 6], max_len=6)
    ids, mask = _prompts([3, 1, 2], max_len=3)
    prefix_ids = torch.tensor([1, 0, 1])
    cache = DemoPrefixCache.build(model, demos, lengths)
    sampling = dict(temperature=0.7, top_k=20, top_p=0.9)
    ours = generate_with_prefix(
        model,
        cache,
        ids,
        attention_mask=mask,
        prefix_ids=prefix_ids,
        max_new_tokens=8,
        do_sample=True,
        generator=torch.Generator().manual_seed(7),
        **sampling,
    )
    embeds, cat_mask, _, _ = concatenated(demos, lengths, model.get_input_embeddings()(ids), mask, prefix_ids)
    assert torch.equal(ours, _stock_sampling_loop(model, embeds, cat_mask, 8, seed=7, **sampling))
    # top_k=1 sampling is greedy
    greedy = generate_with_prefix(model, cache, ids, attention_mask=mask, prefix_ids=prefix_ids, max_new_tokens=8)
    top1 = generate_with_prefix(
        model, cache, ids, attention_mask=mask, prefix_ids=prefix_ids, max_new_tokens=8, do_sample=True, top_k=1
    )
    assert torch.equal(greedy, top1)


def test_eos_pads_finished_rows_and_stops_early():
    model = tiny_model("llama")
    demos, lengths = ragged_demos([3])
    ids, mask = _prompts([2, 3], max_len=3)
    cache = DemoPrefixCache.build(model, demos, lengths)
    free = generate_with_prefix(model, cache, ids, attention_mask=mask, max_new_tokens=6)
    eos = int(free[0, 1])  # row 0 emits this at step 1
    out = generate_with_prefix(model, cache, ids, attention_mask=mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=99)
    assert torch.equal(out[0, :2], free[0, :2]) and (out[0, 2:] == 99).all()
    row1_end = (free[1] == eos).nonzero()
    if len(row1_end) == 0:
        assert out.shape[1] == 6 and torch.equal(out[1], free[1])
    else:  # both rows finished: stops at the later EOS
        assert out.shape[1] == max(2, int(row1_end[0]) + 1)


def test_prefix_held_once_per_group():
    model = tiny_model("qwen2")
    demos, lengths = ragged_demos([5, 3])
    cache = DemoPrefixCache.build(model, demos, lengths)
    per_group = 2 * 2 * 5 * 2 * 16 * 4  # layers * (K, V) * Lp * Hkv * D * float32
    assert cache.nbytes() == 2 * per_group
    prefix_ids = torch.tensor([0, 1, 1, 0, 0, 1, 0, 0])
    assert cache.expanded_nbytes(prefix_ids) == 8 * per_group
    for k in cache.keys:
        assert k.shape[0] == 2  # G copies, whatever the number of rows
    ids, mask = _prompts([2, 3], max_len=3)
    filled = RowKVCache(capacity=3 + 4)
    generate_with_prefix(
        model, cache, ids, attention_mask=mask, prefix_ids=torch.tensor([0, 1]), max_new_tokens=4, row_cache=filled
    )
    # the rows' own K/V only (prompt + fed tokens), never the prefix
    assert filled.nbytes() == 2 * 2 * 2 * 7 * 2 * 16 * 4 and set(filled.lengths.values()) == {3 + 3}
    with pytest.raises(ValueError, match="row_cache"):
        generate_with_prefix(
            model, cache, ids, attention_mask=mask, prefix_ids=torch.tensor([0, 1]), max_new_tokens=4, row_cache=filled
        )
    row_kv = RowKVCache(capacity=7)
    k = torch.zeros(8, 3, 2, 16)
    keys, _ = row_kv.append(0, k, k)
    assert keys.shape == (8, 3, 2, 16) and row_kv.nbytes() == 2 * 8 * 7 * 2 * 16 * 4


def test_list_of_ragged_demonstrations_equals_padded_tensor():
    model = tiny_model("llama")
    demos, lengths = ragged_demos([4, 2])
    from_list = DemoPrefixCache.build(model, [demos[0, :4], demos[1, :2]])
    from_tensor = DemoPrefixCache.build(model, demos, lengths)
    assert torch.equal(from_list.prefix_lengths, from_tensor.prefix_lengths)
    for a, b in zip(from_list.keys, from_tensor.keys):
        torch.testing.assert_close(a[1, :2], b[1, :2])


def test_bad_input_raises_clear_errors():
    model = tiny_model("llama")
    demos, lengths = ragged_demos([4, 2])
    cache = DemoPrefixCache.build(model, demos, lengths)
    rows = torch.randn(2, 3, HIDDEN)
    with pytest.raises(ValueError, match="prefix_ids"):
        forward_with_prefix(model, cache, inputs_embeds=rows, prefix_ids=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="prefix_ids"):
        forward_with_prefix(model, cache, inputs_embeds=rows)  # G = 2 needs prefix_ids
    other = _tiny("llama", kv_heads=4)
    with pytest.raises(ValueError, match="cache"):
        forward_with_prefix(other, cache, inputs_embeds=rows, prefix_ids=torch.tensor([0, 1]))
    assert other.config._attn_implementation == "eager", "restored after an error"
    with pytest.raises(ValueError, match="attention_mask"):
        forward_with_prefix(
            model, cache, inputs_embeds=rows, attention_mask=torch.tensor([[1, 0, 1], [1, 1, 1]]), prefix_ids=torch.tensor([0, 1])
        )
    with pytest.raises(ValueError, match="attention_mask"):
        forward_with_prefix(model, cache, inputs_embeds=rows, attention_mask=torch.ones(2, 4), prefix_ids=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="position_ids"):
        forward_with_prefix(model, cache, inputs_embeds=rows, prefix_ids=torch.tensor([0, 1]), position_ids=None)
    with pytest.raises(ValueError, match="LEFT"):
        generate_with_prefix(
            model,
            cache,
            torch.ones(2, 3, dtype=torch.long),
            attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]),
            prefix_ids=torch.tensor([0, 1]),
        )
    with pytest.raises(ValueError, match="demo_lengths"):
        DemoPrefixCache.build(model, demos, torch.tensor([5, 1]))
    with pytest.raises(RuntimeError, match=ATTENTION_NAME):
        q = torch.randn(1, 4, 2, 16)
        prefix_cache_attention(model.model.layers[0].self_attn, q, q, q, None)
    dropping = _tiny("llama")  # attention dropout in training is refused, not silently skipped
    for layer in dropping.model.layers:
        layer.self_attn.attention_dropout = 0.1
    dropping_cache = DemoPrefixCache.build(dropping, demos, lengths)  # eval mode: no dropout, fine
    dropping.train()
    with pytest.raises(ValueError, match="dropout"):
        forward_with_prefix(dropping, dropping_cache, inputs_embeds=rows, prefix_ids=torch.tensor([0, 1]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_follow_the_rule(dtype):
    torch.manual_seed(99)
    model = _tiny("llama")
    demos, lengths = ragged_demos([5, 2], max_len=5)
    rows = torch.randn(3, 4, HIDDEN)
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 0]])
    prefix_ids = torch.tensor([1, 0, 1])
    ours = prefix_row_logits(copy.deepcopy(model).to(dtype), demos.to(dtype), lengths, rows.to(dtype), mask, prefix_ids)
    ref_lp = stock_row_logits(copy.deepcopy(model).to(dtype), demos.to(dtype), lengths, rows.to(dtype), mask, prefix_ids)
    ref64 = stock_row_logits(copy.deepcopy(model).double(), demos.double(), lengths, rows.double(), mask, prefix_ids)
    assert ours.dtype == dtype
    assert_close_by_rule(f"{dtype} logits", ours, ref64, ref_lp)


def _triton_refusal() -> str | None:
    from mmict_kernels import backends

    why = backends.explain("prefix_attention", device_type="cpu", dtype=torch.float32, head_dim=32)["triton"]
    if why is None:
        try:
            backends.resolve("prefix_attention", "triton", device_type="cpu", dtype=torch.float32, head_dim=32)
        except ImportError as exc:  # kernels not importable in this checkout
            why = str(exc)
    return why


def test_triton_backend_logits_and_demo_grads():
    """The same model path on the Triton kernels (interpreter on CPU), head dim 32, GQA, ragged prefixes."""
    why = _triton_refusal()
    if why is not None:
        pytest.skip(f"triton prefix_attention unavailable: {why}")
    torch.manual_seed(5)
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_hidden_layers=2,
        vocab_size=VOCAB,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    demos, lengths = ragged_demos([5, 2], max_len=5)
    rows = torch.randn(3, 4, HIDDEN)
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 0]])
    prefix_ids = torch.tensor([1, 0, 1])
    weight = torch.randn(int(mask.sum()), VOCAB, dtype=torch.float64)

    def run(fn, model, dtype, **kw):
        d = demos.to(dtype).requires_grad_(True)
        logits = fn(model, d, lengths, rows.to(dtype), mask, prefix_ids, **kw)
        (grad,) = torch.autograd.grad((logits * weight.to(dtype)).sum(), d)
        return logits.detach(), grad

    ours = run(prefix_row_logits, model, torch.float32, backend="triton")
    ref32 = run(stock_row_logits, model, torch.float32)
    ref64 = run(stock_row_logits, copy.deepcopy(model).double(), torch.float64)
    for name, o, r64, r32 in zip(("logits", "grad demo_embeds"), ours, ref64, ref32):
        assert_close_by_rule(f"triton {name}", o, r64, r32)
    # decode steps (Lq = 1, strided row-cache views, left padding) on the kernels
    ids, prompt_mask = _prompts([3, 1, 2], max_len=3)
    cache = DemoPrefixCache.build(model, demos, lengths)
    kw = dict(attention_mask=prompt_mask, prefix_ids=prefix_ids, max_new_tokens=3)
    assert torch.equal(
        generate_with_prefix(model, cache, ids, backend="triton", **kw),
        generate_with_prefix(model, cache, ids, backend="torch", **kw),
    )


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_logits_and_demo_grads(dtype):
    """On CUDA with backend="auto" (the CUDA or Triton kernels), head dim 64, GQA, ragged prefixes."""
    torch.manual_seed(11)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_hidden_layers=2,
        vocab_size=VOCAB,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval().requires_grad_(False).cuda()
    demos = torch.randn(3, 7, 128, device="cuda")
    lengths = torch.tensor(DEMO_LENGTHS, device="cuda")
    rows = torch.randn(5, 5, 128, device="cuda")
    mask, prefix_ids = ROW_MASK.cuda(), PREFIX_IDS.cuda()
    weight = torch.randn(int(ROW_MASK.sum()), VOCAB, dtype=torch.float64, device="cuda")

    def run(fn, model, dtype):
        d = demos.to(dtype).requires_grad_(True)
        logits = fn(model, d, lengths, rows.to(dtype), mask, prefix_ids)
        (grad,) = torch.autograd.grad((logits * weight.to(dtype)).sum(), d)
        return logits.detach(), grad

    ours = run(prefix_row_logits, copy.deepcopy(model).to(dtype), dtype)
    ref_lp = run(stock_row_logits, copy.deepcopy(model).to(dtype), dtype)
    ref64 = run(stock_row_logits, copy.deepcopy(model).double(), torch.float64)
    for name, o, r64, rlp in zip(("logits", "grad demo_embeds"), ours, ref64, ref_lp):
        assert_close_by_rule(f"cuda {dtype} {name}", o, r64, rlp)
