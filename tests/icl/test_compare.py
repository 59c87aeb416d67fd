"""The paper's comparison (``mmict_kernels.compare``) and its baselines (``icl/baselines.py``).

- Vanilla ICT's layout (token order, separator, which M-Hub positions are used, no text in a
  demonstration's M-Hub turn) against a direct one-turn-at-a-time construction through the stock
  LLM: same loss and gradients, for a decoder-only LLM and for T5; its shared prefix
  (one-to-many) equals the repeated one.
- AIM's batches carry exactly the groups' demonstrations; the comparison's evaluation answers the
  queries ``evaluation.predict`` answers, with the same demonstrations and predictions.
- The CLI end to end at a tiny budget: table, JSON and CSV; context sizes add up; AIM is skipped
  with a reason on an encoder-decoder LLM; bad configs fail with the key's name.
"""

import csv
import json

import pytest
import torch
import torch.nn.functional as F

from helpers.threads import one_thread
from mmict_kernels import compare
from mmict_kernels.icl import comparison
from mmict_kernels.icl.baselines import VanillaICTBuilder, aim_batch, builder_class
from mmict_kernels.icl.batch import IGNORE, BatchBuilder
from mmict_kernels.icl.build import build_run
from mmict_kernels.icl.comparison import answers
from mmict_kernels.icl.config import load_config
from mmict_kernels.icl.evaluation import predict as driver_predict
from mmict_kernels.icl.sampling import Group

SMALL = ["data.shapes_train_size=24", "data.shapes_eval_size=8", "train.output_dir=/tmp/unused", "model.backend=torch"]
GROUPS = [Group([0, 1], [5, 6]), Group([2], [7]), Group([3], []), Group([4], [6, 9, 13])]
T5 = ("model.llm_family=encoder-decoder", "model.llm_type=t5")
_RUNS = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _run(*extra):
    if extra not in _RUNS:
        _RUNS[extra] = build_run(load_config(None, SMALL + list(extra)))
    run = _RUNS[extra]
    run.model.zero_grad(set_to_none=True)
    return run


def _builder(run, cls=VanillaICTBuilder, mode="train", shared_prefix=False):
    m = run.cfg.model
    return cls(run.mhub_tokenizer, run.llm_tokenizer, m.num_query_tokens, m.separator, m.llm_family, 32, mode, shared_prefix)


def _llm_ids(run, text):
    return run.llm_tokenizer(text, add_special_tokens=False)["input_ids"]


def _direct_context(model, run, ds, group, q):
    """[FC(demo image's query outputs, no text)][demo text embeds][SEP] ... [query feats][prompt], one turn at a time."""
    emb, nq = model.llm.get_input_embeddings(), model.num_query_tokens
    sep = emb(torch.tensor([run.llm_tokenizer.convert_tokens_to_ids(run.cfg.model.separator)]))
    parts = []
    for d in group.demos:
        image = model.ln_vision(ds.image_tokens(d))[None]
        visual = model.mhub(encoder_hidden_states=image).last_hidden_state[0]  # queries only: no text at all
        assert visual.shape[0] == nq
        parts += [model.proj(visual), emb(torch.tensor(_llm_ids(run, f"{ds[d].prompt} {ds[d].answer}"))), sep]
    ids = torch.tensor([run.mhub_tokenizer(ds[q].prompt)["input_ids"]])
    image = model.ln_vision(ds.image_tokens(q))[None]
    out = model.mhub(
        input_ids=ids, attention_mask=torch.ones(1, nq + ids.shape[1], dtype=torch.long), encoder_hidden_states=image
    )
    parts += [model.proj(out.last_hidden_state[0, :nq]), emb(torch.tensor(_llm_ids(run, ds[q].prompt)))]
    return torch.cat(parts)


def _target(run, answer):
    return torch.tensor(_llm_ids(run, " " + answer) + [run.llm_tokenizer.eos_token_id])


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close(a, b, what):
    atol = 1e-5 * max(float(b.detach().abs().max()), 1.0)  # float32 sums in another order
    torch.testing.assert_close(a, b, rtol=1e-4, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("family", ["decoder", "encoder-decoder"])
def test_vanilla_ict_layout_and_loss_match_direct_construction(family):
    run = _run(*T5) if family == "encoder-decoder" else _run()
    model, ds = run.model.train(), run.train_set
    batch = _builder(run)(GROUPS, ds, ds)
    nq = model.num_query_tokens
    sep_id = run.llm_tokenizer.convert_tokens_to_ids(run.cfg.model.separator)

    # Row 0: per demo nq visual positions, its text as LLM tokens, SEP; then the query's nq features and prompt.
    text = [_llm_ids(run, f"{ds[d].prompt} {ds[d].answer}") for d in (5, 6)]
    row_f, row_t = batch.llm.feat_index[0].tolist(), batch.llm.token_ids[0].tolist()
    pos, demo_turns = 0, []
    for t in text:
        feats = row_f[pos : pos + nq]
        assert all(f >= 0 for f in feats) and row_f[pos + nq : pos + nq + len(t) + 1] == [-1] * (len(t) + 1)
        assert row_t[pos + nq : pos + nq + len(t) + 1] == t + [sep_id]
        span = batch.turn_ids.shape[1] + nq
        assert feats == [feats[0] + j for j in range(nq)] and feats[0] % span == 0  # the turn's QUERY positions
        demo_turns.append(feats[0] // span)
        pos += nq + len(t) + 1
    assert all(f >= 0 for f in row_f[pos : pos + nq]) and row_f[pos + nq] == -1
    assert int(batch.turn_mask[demo_turns].sum()) == 0  # a demonstration's M-Hub turn has no text
    if family == "decoder":
        assert (batch.llm.labels != IGNORE).sum() == batch.num_label_tokens

    nll, count = model(batch)
    nll.backward()
    batched = _grads(model)
    model.zero_grad()
    total, total_count = 0.0, 0
    emb = model.llm.get_input_embeddings()
    for g in GROUPS:
        for q in g.queries:
            ctx, tgt = _direct_context(model, run, ds, g, q), _target(run, ds[q].answer)
            if family == "decoder":
                logits = model.llm(inputs_embeds=torch.cat([ctx, emb(tgt)])[None]).logits[0]
                total = total + F.cross_entropy(logits[-tgt.numel() - 1 : -1], tgt, reduction="sum")
            else:
                total = total + model.llm(inputs_embeds=ctx[None], labels=tgt[None]).loss * tgt.numel()
            total_count += tgt.numel()
    assert count == total_count
    _assert_close(nll, total, "loss")
    total.backward()
    direct = _grads(model)
    assert set(batched) == set(direct) and not any(n.startswith("llm.") for n in direct)
    for name in direct:
        _assert_close(batched[name], direct[name], f"grad {name}")


def test_vanilla_ict_shared_prefix_equals_repeated_prefix():
    run = _run()
    model, ds = run.model.train(), run.train_set
    groups = [Group([0, 1, 2], [5, 6]), Group([3, 4], [7, 9, 13])]
    losses, grads = [], []
    for shared in (False, True):
        model.zero_grad(set_to_none=True)
        batch = _builder(run, shared_prefix=shared)(groups, ds, ds)
        assert (batch.prefix is not None) == shared
        nll, count = model(batch)
        nll.backward()
        losses.append((nll, count))
        grads.append(_grads(model))
    assert losses[0][1] == losses[1][1]
    _assert_close(losses[1][0], losses[0][0], "loss")
    for name in grads[0]:
        _assert_close(grads[1][name], grads[0][name], f"grad {name}")


def test_aim_batch_carries_the_groups_demonstrations():
    run = _run()
    ds = run.train_set
    builder = _builder(run, cls=BatchBuilder)
    b = aim_batch(GROUPS, ds, ds, builder)
    distinct = sorted({d for g in GROUPS for d in g.demos})
    assert [[distinct[i] for i in g] for g in b.group_demos] == [g.demos for g in GROUPS]
    assert b.query_ids == [0, 1, 2, 3, 4] and b.query_group.tolist() == [0, 0, 1, 2, 3]
    torch.testing.assert_close(b.demo_images[distinct.index(9)], ds.image_tokens(9))
    assert b.demo_text[distinct.index(6)] == _llm_ids(run, f"{ds[6].prompt} {ds[6].answer}")
    assert b.query_answer[0] == _llm_ids(run, " " + ds[0].answer)  # AIMModel appends the end token itself
    rows, computed = answers._aim_context_lengths(b, run.cfg.model.num_query_tokens)
    own = [run.cfg.model.num_query_tokens + len(p) for p in b.query_prompt]
    assert rows[0] == sum(len(b.demo_text[i]) for i in b.group_demos[0]) + own[0]
    assert computed == sum(own) + sum(len(b.demo_text[i]) for g in b.group_demos for i in g)


@pytest.mark.parametrize("method, sampling", [("mmict", "similar"), ("mmict", "one-to-many"), ("vanilla_ict", "one-to-many")])
def test_comparison_evaluates_what_the_driver_evaluates(method, sampling):
    run = _run()
    mine, ctx = comparison.predict(
        run, method, run.model, 2, sampling, torch.device("cpu"), max_new_tokens=3, limit=None, batch_size=5
    )
    theirs, rows, computed = driver_predict(
        run,
        2,
        sampling=sampling,
        batch_size=5,
        max_new_tokens=3,
        min_new_tokens=1,
        builder_cls=builder_class(method),
        return_context_lengths=True,
    )
    assert mine == theirs
    assert ctx == {"ctx_tokens": sum(rows) / len(rows), "llm_tokens_computed": computed / len(rows)}
    assert ctx["ctx_tokens"] >= ctx["llm_tokens_computed"] > 0


def test_aim_evaluation_answers_the_driver_queries_in_its_order():
    """AIM keeps its own evaluation loop (its batch and generation differ): same queries, same order."""
    run = _run("data.shapes_eval_size=24")  # full one-to-many groups and leftovers
    aim = comparison.build_aim(run.model, run, None)
    mine, _ = comparison.predict(
        run, "aim", aim, 1, "one-to-many", torch.device("cpu"), max_new_tokens=2, limit=None, batch_size=5
    )
    theirs = driver_predict(run, 1, sampling="one-to-many", batch_size=5, max_new_tokens=1)
    assert [(r["query"], r["task"], r["answers"]) for r in mine] == [(r["query"], r["task"], r["answers"]) for r in theirs]


def test_saved_tensor_bytes_counts_activations_not_parameters():
    lin = torch.nn.Linear(16, 16)
    probe = comparison.SavedTensorBytes(lin)
    x = torch.randn(8, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(probe.pack, lambda t: t):
        y = torch.tanh(lin(x))  # saves x (input of the matmul) and tanh's output; the weight is excluded
    y.sum().backward()
    assert probe.total == 2 * 8 * 16 * 4


TINY = [
    "data.shapes_train_size=40",
    "data.shapes_eval_size=12",
    "train.batch_size=8",
    "train.warmup_steps=1",
    "model.backend=torch",
    "data.shapes_tasks=[what_color,what_shape,caption]",
]


def _cli(tmp_path, *extra):
    out = tmp_path / "cmp"
    argv = ["--steps", "2", "--timing-steps", "2", "--threads", "1", "--demos", "0,1", "--train-demos", "1", "--out", str(out)]
    for item in TINY:
        argv += ["--set", item]
    return compare.main(argv + list(extra)), out


def test_cli_end_to_end_tiny(tmp_path, capsys):
    rc, out = _cli(tmp_path, "--sampling", "random,one-to-many", "--markdown")
    assert rc == 0
    screen = capsys.readouterr().out
    result = json.loads((tmp_path / "cmp.json").read_text())
    rows = result["rows"]
    # VanillaFine-Tune once (no demonstrations), the others per sampling x demonstration count.
    assert [(r["method"], r["sampling"], r["eval_demos"]) for r in rows] == [("VanillaFine-Tune", "-", 0)] + [
        (m, s, k) for m in ("Vanilla ICT", "MMICT", "AIM") for s in ("random", "one-to-many") for k in (0, 1)
    ]
    with open(tmp_path / "cmp.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and {"step_ms", "mem_mb", "ctx_tokens", "exact_match", "device", "date_utc"} <= set(table[0])
    assert "| method |" in screen and "VanillaFine-Tune" in screen and result["machine"]["device"].startswith("CPU")
    by = {(r["method"], r["sampling"], r["eval_demos"]): r for r in rows}
    # The query alone costs the same context in every method; one demonstration costs its text
    # (+ SEP) in MMICT, its visual tokens on top in Vanilla ICT, and no SEP in AIM.
    zero = {r["ctx_tokens"] for r in rows if r["eval_demos"] == 0}
    assert len(zero) == 1
    for s in ("random", "one-to-many"):
        ict, mmict, aim = (by[(m, s, 1)]["ctx_tokens"] for m in ("Vanilla ICT", "MMICT", "AIM"))
        assert ict == pytest.approx(mmict + 8) and mmict == pytest.approx(aim + 1)
    # One-to-many computes each shared prefix once: fewer LLM positions than the context it serves.
    assert by[("MMICT", "one-to-many", 1)]["llm_tokens_computed"] < by[("MMICT", "one-to-many", 1)]["ctx_tokens"]
    assert by[("MMICT", "random", 1)]["llm_tokens_computed"] == pytest.approx(by[("MMICT", "random", 1)]["ctx_tokens"])
    assert all(
        r["step_ms"] > 0 and r["mem_mb"] >= 0 and 0 <= r["exact_match"] <= 100 and r["caption_bleu"] is not None for r in rows
    )
    assert by[("AIM", "random", 1)]["trainable_params"] < by[("MMICT", "random", 1)]["trainable_params"]


def test_cli_skips_aim_on_an_encoder_decoder_llm(tmp_path, capsys):
    rc, _ = _cli(tmp_path, "--methods", "mmict,aim", "--sampling", "random", "--demos", "1", "--set", T5[0], "--set", T5[1])
    assert rc == 0
    screen = capsys.readouterr().out
    assert "AIM skipped" in screen and "decoder-only" in screen
    rows = json.loads((tmp_path / "cmp.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["MMICT"]


@pytest.mark.parametrize(
    "values, match",
    [
        ({"methods": ["mmict", "bogus"]}, "methods"),
        ({"samplings": ["nearest"]}, "samplings"),
        ({"eval_demos": [-1]}, "eval_demos"),
        ({"stepz": 3}, "stepz"),
        ({"timing_steps": 1}, "timing_steps"),
        ({"threads": 0}, "threads"),
        ({"caption_bleu_n": 5}, "caption_bleu_n"),
    ],
)
def test_bad_config_names_the_key(values, match):
    with pytest.raises(ValueError, match=match):
        comparison.CompareConfig.from_dict(values)


def test_cli_reports_a_missing_config_file(tmp_path, capsys):
    assert compare.main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_cli_per_count_trains_one_model_per_count(tmp_path):
    rc, _ = _cli(tmp_path, "--methods", "mmict", "--sampling", "random", "--per-count")
    assert rc == 0
    rows = json.loads((tmp_path / "cmp.json").read_text())["rows"]
    assert [(r["train_demos"], r["eval_demos"]) for r in rows] == [(0, 0), (1, 1)]
