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

from helpers.threads import one_thread
from mmict_kernels.icl.batch import IGNORE, BatchBuilder
from mmict_kernels.icl.build import build_run
from mmict_kernels.icl.config import load_config
from mmict_kernels.icl.sampling import Group

SMALL = ["data.shapes_train_size=24", "data.shapes_eval_size=8", "train.output_dir=/tmp/unused", "model.backend=torch"]
GROUPS = [Group([0, 1], [5, 6]), Group([2], [7]), Group([3], []), Group([4], [6, 9, 13])]


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


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
    return BatchBuilder(
        run.mhub_tokenizer, run.llm_tokenizer, m.num_query_tokens, m.separator, m.llm_family, 32, mode, shared_prefix
    )


def _direct_turn(model, run, ds, idx, text):
    """One M-Hub call for one turn, the way the official code loops."""
    ids = torch.tensor([run.mhub_tokenizer(text)["input_ids"]])
    nq = model.num_query_tokens
    image = model.ln_vision(ds.image_tokens(idx))[None]
    out = model.mhub(
        input_ids=ids, attention_mask=torch.ones(1, nq + ids.shape[1], dtype=torch.long), encoder_hidden_states=image
    )
    return out.last_hidden_state[0], nq


def _demo_text(ex):
    """The official code's demonstration text: a caption alone, or a question and its answer."""
    return ex.answer if ex.task == "caption" else f"{ex.prompt} {ex.answer}"


def _direct_context(model, run, ds, group, q):
    """[demo text feats][SEP]... [query feats][prompt embeds] for one row, built piece by piece."""
    tok, emb = run.llm_tokenizer, model.llm.get_input_embeddings()
    sep = emb(torch.tensor([tok.convert_tokens_to_ids(run.cfg.model.separator)]))
    parts = []
    for d in group.demos:
        out, nq = _direct_turn(model, run, ds, d, _demo_text(ds[d]))
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
    out = model.eval().generate(
        _builder(run, "generate")(GROUPS, ds, ds),
        max_new_tokens=3,
        eos_token_id=run.llm_tokenizer.eos_token_id,
        pad_token_id=run.llm_tokenizer.pad_token_id,
    )
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


CAPTION = ("data.shapes_tasks=[what_color,caption]",)  # even indices: what_color (VQA), odd: caption


def test_caption_demonstrations_show_their_caption_alone():
    """A caption demonstration's M-Hub text is its caption (no prompt); a VQA one keeps question + answer.

    The query keeps its prompt either way; the loss equals the direct one-turn-at-a-time build.
    """
    run = _run(*CAPTION)
    model, ds = run.model.train(), run.train_set
    assert [ds[i].task for i in range(4)] == ["what_color", "caption", "what_color", "caption"]
    groups = [Group([1], [3, 5]), Group([0], [2, 4]), Group([7], [])]
    builder = _builder(run)
    batch = builder(groups, ds, ds)
    mtok = run.mhub_tokenizer
    turns = {tuple(ids[m.bool()].tolist()) for ids, m in zip(batch.turn_ids, batch.turn_mask)}
    for d in (3, 5):
        assert builder.demo_text(ds[d]) == ds[d].answer
        assert tuple(mtok(ds[d].answer)["input_ids"]) in turns
        assert tuple(mtok(f"{ds[d].prompt} {ds[d].answer}")["input_ids"]) not in turns
    for d in (2, 4):
        assert tuple(mtok(f"{ds[d].prompt} {ds[d].answer}")["input_ids"]) in turns
    for q in (1, 0, 7):  # queries: the prompt only
        assert tuple(mtok(ds[q].prompt)["input_ids"]) in turns
    # Row 0 (caption query): each demonstration contributes its caption's M-Hub text positions.
    n_caption = [len(mtok(ds[d].answer)["input_ids"]) for d in (3, 5)]
    nq = model.num_query_tokens
    assert (batch.llm.feat_index[0] >= 0).sum() == sum(n_caption) + nq

    nll, count = model(batch)
    total, total_count = 0.0, 0
    for g in groups:
        for q in g.queries:
            ctx = _direct_context(model, run, ds, g, q)
            tgt = _target_ids(run, ds[q].answer)
            logits = model.llm(inputs_embeds=torch.cat([ctx, model.llm.get_input_embeddings()(tgt)])[None]).logits[0]
            total = total + F.cross_entropy(logits[-tgt.numel() - 1 : -1], tgt, reduction="sum")
            total_count += tgt.numel()
    assert count == total_count
    _assert_close(nll, total, "caption-layout loss")


def test_kind_overrides_the_task_name():
    from mmict_kernels.icl.data import Example, task_kind

    assert task_kind("msvd_caption") == "caption" and task_kind("vqav2") == "vqa"
    assert BatchBuilder.demo_text(Example(("i",), "Question: what? Short answer:", "a cup", task="coco_caption", kind="vqa")) == (
        "Question: what? Short answer: a cup"
    )
    assert BatchBuilder.demo_text(Example(("i",), "A short caption:", "a dog runs", task="x", kind="caption")) == "a dog runs"
    with pytest.raises(ValueError, match="kind"):
        task_kind("x", "captioning")


def test_hooks_builder_cls_context_lengths_and_llm_ids():
    """The hooks a comparison uses: a builder class for Trainer and predict, context lengths, llm_ids."""
    from mmict_kernels.icl.evaluation import predict
    from mmict_kernels.icl.training import Trainer

    run = _run()
    ds = run.train_set
    b = _builder(run)
    assert b.llm_ids is b._ltok and b.llm_ids("what is this ?") == tuple(
        run.llm_tokenizer("what is this ?", add_special_tokens=False)["input_ids"]
    )

    made = []

    class Recording(BatchBuilder):
        def __call__(self, *args):
            made.append(self.mode)
            return super().__call__(*args)

    trainer = Trainer(run.cfg, run=run, builder_cls=Recording)
    assert isinstance(trainer.builder, Recording)
    trainer.make_batch(0)
    assert made == ["train"]

    # Context lengths: every non-target LLM position of the row, the shared prefix counted per row.
    groups = [Group([0, 1, 2], [5, 6]), Group([3], [7])]
    plain, shared = _builder(run)(groups, ds, ds), _builder(run, shared_prefix=True)(groups, ds, ds)
    rows, computed = plain.context_lengths()
    expect = (plain.llm.attention_mask.sum(1) - (plain.llm.labels != IGNORE).sum(1)).tolist()
    assert rows == expect and computed == sum(expect)
    rows_s, computed_s = shared.context_lengths()
    assert rows_s == rows  # each row reads the same tokens ...
    assert computed - computed_s == 2 * int(
        shared.prefix.attention_mask[0].sum()
    )  # ... group 0's prefix computed once, not 3 times

    made.clear()
    records, ctx, n = predict(run, 1, batch_size=4, max_new_tokens=2, limit=5, builder_cls=Recording, return_context_lengths=True)
    assert made and set(made) == {"generate"} and len(ctx) == len(records) == 5 and n == sum(ctx)
    assert predict(run, 1, batch_size=4, max_new_tokens=2, limit=5) == records


def test_generation_lengths_by_task_then_kind():
    """eval.generation_lengths: a task's entry wins over its kind's; others use the defaults; order kept."""
    from mmict_kernels.icl import evaluation

    run = _run(*CAPTION)
    model = run.model
    calls = []
    original = model.generate

    def recording(batch, max_new_tokens, min_new_tokens, **kw):
        calls.append((tuple(sorted(set(batch.tasks))), min_new_tokens, max_new_tokens))
        return original(batch, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, **kw)

    model.generate = recording
    try:
        records = evaluation.predict(
            run, 0, batch_size=8, max_new_tokens=2, min_new_tokens=1, generation_lengths={"caption": [2, 3]}
        )
        assert sorted(set(calls)) == [(("caption",), 2, 3), (("what_color",), 1, 2)]
        assert [r["query"] for r in records] == list(range(len(run.eval_set)))
        calls.clear()
        evaluation.predict(run, 0, batch_size=8, max_new_tokens=2, generation_lengths={"vqa": [1, 1], "what_color": [1, 4]})
        assert sorted(set(calls)) == [(("caption",), 1, 2), (("what_color",), 1, 4)]
    finally:
        del model.generate
    with pytest.raises(ValueError, match="generation_lengths"):
        load_config(None, ["eval.generation_lengths={vqa: [3, 1]}"])


def test_image_kv_once_or_image_tokens_per_turn_give_the_same_step(monkeypatch):
    """The fused M-Hub's two ways to a batch's images on a CPU (each distinct image's K/V once, or each
    turn's image tokens attended without forming K/V, modules/mhub/absorbed.py): the same loss and gradients."""
    from mmict_kernels.modules.mhub import absorbed

    run = _run()
    model, ds = run.model.eval(), run.train_set  # no dropout: both ways see the same function
    batch = _builder(run)(GROUPS, ds, ds)
    results = []
    for per_turn in (False, True):
        monkeypatch.setattr(absorbed, "cheaper", lambda *a, answer=per_turn, **k: answer)
        assert model._image_tokens_per_turn(batch, model.ln_vision(batch.images)) is per_turn
        model.zero_grad(set_to_none=True)
        nll, _ = model(batch)
        nll.backward()
        results.append((nll.detach(), _trainable_grads(model)))
    (nll_a, grads_a), (nll_b, grads_b) = results
    _assert_close(nll_b, nll_a, "loss")
    assert set(grads_a) == set(grads_b)
    for name in grads_a:
        _assert_close(grads_b[name], grads_a[name], name)
