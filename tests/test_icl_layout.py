"""The MMICT layout against a direct, one-turn-at-a-time construction through the stock models.

The direct version is what the official code does (one M-Hub call per turn, concatenated LLM
context), built here by hand: token order, the separator, which M-Hub positions are used, that
padded demonstration positions never reach the LLM, and that only target tokens carry loss.
The batched path (one M-Hub call for all turns, gathered FC, logits only where needed) must
give the same loss and the same gradients. Also: T5 (encoder-decoder) and the shared-prefix
path (one-to-many on a decoder-only LLM, ``modules.prefix_cache``).
"""

import pytest
import torch
import torch.nn.functional as F

from mmict_kernels.icl.batch import IGNORE, BatchBuilder
from mmict_kernels.icl.build import build_run
from mmict_kernels.icl.config import load_config
from mmict_kernels.icl.sampling import Group

SMALL = ["data.shapes_train_size=24", "data.shapes_eval_size=8", "train.output_dir=/tmp/unused", "model.backend=torch"]
GROUPS = [Group([0, 1], [5, 6]), Group([2], [7]), Group([3], []), Group([4], [6, 9, 13])]


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny models on a shared 2-core machine: more threads only fight each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_RUNS = {}


def _run(*extra):
    """Runs are built once per config (the models are small, the imports and set-up are not)."""
    if extra not in _RUNS:
        _RUNS[extra] = build_run(load_config(None, SMALL + list(extra)))
    run = _RUNS[extra]
    run.model.zero_grad(set_to_none=True)
    return run


def _builder(run, mode="train", shared_prefix=False):
    m = run.cfg.model
    return BatchBuilder(run.mhub_tokenizer, run.llm_tokenizer, m.num_query_tokens, m.separator, m.llm_family, 32, mode, shared_prefix)


def _direct_turn(model, run, ds, idx, text):
    """One M-Hub call for one turn, the way the official code loops."""
    ids = torch.tensor([run.mhub_tokenizer(text)["input_ids"]])
    nq = model.num_query_tokens
    image = model.ln_vision(ds.image_tokens(idx))[None]
    out = model.mhub(input_ids=ids, attention_mask=torch.ones(1, nq + ids.shape[1], dtype=torch.long), encoder_hidden_states=image)
    return out.last_hidden_state[0], nq


def _direct_context(model, run, ds, group, q):
    """[demo text feats][SEP]... [query feats][prompt embeds] for one row, built piece by piece."""
    tok, emb = run.llm_tokenizer, model.llm.get_input_embeddings()
    sep = emb(torch.tensor([tok.convert_tokens_to_ids(run.cfg.model.separator)]))
    parts = []
    for d in group.demos:
        out, nq = _direct_turn(model, run, ds, d, f"{ds[d].prompt} {ds[d].answer}")
        parts += [model.proj(out[nq:]), sep]  # the text positions: visual-guided textual features
    out, nq = _direct_turn(model, run, ds, q, ds[q].prompt)
    parts.append(model.proj(out[:nq]))  # the query positions: textual-guided visual features
    parts.append(emb(torch.tensor(tok(ds[q].prompt, add_special_tokens=False)["input_ids"])))
    return torch.cat(parts)


def _target_ids(run, answer):
    tok = run.llm_tokenizer
    return torch.tensor(tok(" " + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])


def _trainable_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close(a, b, what, rtol=1e-4):
    # float32 sums in another order: the error scales with the tensor's largest entries.
    atol = 1e-5 * max(float(b.detach().abs().max()), 1.0)
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("impl", ["fused", "transformers"])
def test_decoder_layout_and_loss_match_direct_construction(impl):
    run = _run() if impl == "fused" else _run(f"model.mhub_impl={impl}")
    model, ds = run.model.train(), run.train_set
    batch = _builder(run)(GROUPS, ds, ds)
    # Token order: row 0 = 2 demos (text + SEP each), 8 query feats, prompt, target.
    nq = model.num_query_tokens
    sep_id = run.llm_tokenizer.convert_tokens_to_ids(run.cfg.model.separator)
    row0 = batch.llm
    n_demo_text = [len(run.mhub_tokenizer(f"{ds[d].prompt} {ds[d].answer}")["input_ids"]) for d in (5, 6)]
    sep_pos = [n_demo_text[0], n_demo_text[0] + 1 + n_demo_text[1]]
    assert row0.token_ids[0, sep_pos].tolist() == [sep_id, sep_id]
    assert (row0.feat_index[0, : sep_pos[1] + 1 + nq] >= 0).sum() == sum(n_demo_text) + nq
    assert (batch.llm.labels != IGNORE).sum() == batch.num_label_tokens

    nll, count = model(batch)
    nll.backward()
    batched_grads = _trainable_grads(model)
    model.zero_grad()

    total, total_count = 0.0, 0
    for g in GROUPS:
        for q in g.queries:
            ctx = _direct_context(model, run, ds, g, q)
            tgt = _target_ids(run, ds[q].answer)
            seq = torch.cat([ctx, model.llm.get_input_embeddings()(tgt)])[None]
            logits = model.llm(inputs_embeds=seq).logits[0]
            n = tgt.numel()
            total = total + F.cross_entropy(logits[-n - 1 : -1], tgt, reduction="sum")
            total_count += n
    assert count == total_count
    _assert_close(nll, total, "loss")
    total.backward()
    direct_grads = _trainable_grads(model)
    assert set(batched_grads) == set(direct_grads) and not any(n.startswith("llm.") for n in direct_grads)
    for name in direct_grads:
        _assert_close(batched_grads[name], direct_grads[name], f"grad {name}")


def test_encoder_decoder_loss_matches_direct_construction():
    run = _run("model.llm_family=encoder-decoder", "model.llm_type=t5")
    model, ds = run.model.train(), run.train_set
    batch = _builder(run)(GROUPS, ds, ds)
    assert batch.decoder is not None and batch.llm.labels is None  # context -> encoder, target -> decoder
    nll, count = model(batch)
    total, total_count = 0.0, 0
    for g in GROUPS:
        for q in g.queries:
            ctx = _direct_context(model, run, ds, g, q)[None]
            tgt = _target_ids(run, ds[q].answer)[None]
            logits = model.llm(inputs_embeds=ctx, labels=tgt).logits[0]
            total = total + F.cross_entropy(logits, tgt[0], reduction="sum")
            total_count += tgt.numel()
    assert count == total_count
    _assert_close(nll, total, "T5 loss")
    out = model.eval().generate(_builder(run, "generate")(GROUPS, ds, ds), max_new_tokens=3,
                                eos_token_id=run.llm_tokenizer.eos_token_id, pad_token_id=run.llm_tokenizer.pad_token_id)
    assert out.shape[0] == 5 and out.shape[1] <= 3


def test_shared_prefix_equals_repeated_prefix():
    """One-to-many on a decoder-only LLM: the prefix cache gives the loss and grads of the plain layout."""
    run = _run()
    model, ds = run.model.train(), run.train_set
    groups = [Group([0, 1, 2], [5, 6]), Group([3, 4], [7])]
    plain = _builder(run)(groups, ds, ds)
    shared = _builder(run, shared_prefix=True)(groups, ds, ds)
    assert shared.prefix.token_ids.shape[0] == 2 and shared.prefix_ids.tolist() == [0, 0, 0, 1, 1]
    nll_p, n_p = model(plain)
    nll_p.backward()
    grads_p = _trainable_grads(model)
    model.zero_grad()
    nll_s, n_s = model(shared)
    nll_s.backward()
    grads_s = _trainable_grads(model)
    assert n_p == n_s
    _assert_close(nll_s, nll_p, "shared-prefix loss")
    for name in grads_p:
        _assert_close(grads_s[name], grads_p[name], f"grad {name}")
    # Greedy generation on the shared prefix gives the tokens of the plain left-padded batch.
    tok = run.llm_tokenizer
    kw = dict(max_new_tokens=3, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.eval()
    out_plain = model.generate(_builder(run, "generate")(groups, ds, ds), **kw)
    out_shared = model.generate(_builder(run, "generate", shared_prefix=True)(groups, ds, ds), **kw)
    assert out_plain.tolist() == out_shared[:, : out_plain.shape[1]].tolist()


def test_generation_of_padded_batch_equals_one_row_at_a_time():
    run = _run()
    model, ds = run.model.eval(), run.train_set
    tok = run.llm_tokenizer
    kw = dict(max_new_tokens=3, min_new_tokens=3, eos_token_id=None, pad_token_id=tok.pad_token_id)
    together = model.generate(_builder(run, "generate")(GROUPS, ds, ds), **kw)
    alone = []
    for g in GROUPS:
        for q in g.queries:
            alone.append(model.generate(_builder(run, "generate")([Group([q], g.demos)], ds, ds), **kw)[0])
    assert together.tolist() == torch.stack(alone).tolist()


def test_shared_prefix_needs_a_decoder_only_llm():
    run = _run("model.llm_family=encoder-decoder", "model.llm_type=t5")
    with pytest.raises(ValueError, match="decoder-only"):
        _builder(run, shared_prefix=True)
