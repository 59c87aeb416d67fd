"""Distributed evaluation: each of 2 processes (torchrun, gloo) generates a share of the batches and rank 0
gathers the predictions, which equal one process's, with the LLM replicated (DDP runs) or FSDP2-sharded
(decoder-only and T5); ``evaluate`` scores and writes on rank 0 only."""

import json

import pytest

from mmict_kernels.icl.build import build_run
from mmict_kernels.icl.config import load_config
from mmict_kernels.icl.evaluation import evaluate, predict

CASES = {"random-0": (0, "random"), "random-2": (2, "random"), "one-to-many-2": (2, "one-to-many")}  # as two_process_scenarios


def one_process_predictions(overrides) -> dict:
    run = build_run(load_config(None, overrides))
    return {
        name: predict(run, k, sampling=s, group_size=4, batch_size=3, max_new_tokens=3, seed=0) for name, (k, s) in CASES.items()
    }


@pytest.mark.parametrize("key", ["predict_replicated", "predict_fsdp"])
def test_two_process_predictions_equal_one_process(two_processes, tiny, tmp_path, key):
    expected = one_process_predictions(tiny(tmp_path))
    got = two_processes["results"][key]
    assert got.keys() == expected.keys()
    for name in expected:
        assert len(got[name]) == len(expected[name]) == 12  # every query once (12 over 4 batches: uneven shares)
        assert got[name] == expected[name], name


def test_two_process_predictions_over_a_sharded_t5(two_processes, tiny, tmp_path):
    expected = one_process_predictions(tiny(tmp_path, "model.llm_family=encoder-decoder", "model.llm_type=t5"))
    assert two_processes["results"]["predict_fsdp_t5"] == expected


def test_evaluate_scores_and_writes_on_rank_zero(two_processes, tiny, tmp_path):
    ranks = two_processes["ranks"]
    assert ranks[0]["evaluate_returned"] == ["by_num_demos", "sampling"] and ranks[1]["evaluate_returned"] == []
    written = json.loads((two_processes["out"] / "eval.json").read_text())
    run = build_run(load_config(None, tiny(tmp_path)))
    expected = evaluate(run, demo_counts=(0, 2), sampling="random", print_table=False, batch_size=3, max_new_tokens=3)
    for k in ("0", "2"):
        assert written["by_num_demos"][k]["scores"] == json.loads(json.dumps(expected["by_num_demos"][k]["scores"]))


def test_evaluate_cli_under_torchrun_with_the_llm_sharded(two_processes, tmp_path):
    """``torchrun -m mmict_kernels.evaluate --run R`` on an FSDP run: the same scores as one process."""
    from mmict_kernels import evaluate as evaluate_cli

    assert [r["evaluate_cli_status"] for r in two_processes["ranks"]] == [0, 0]
    run = two_processes["out"] / "fsdp"
    args = ["--run", str(run), "--demos", "0", "2", "--limit", "6", "--output", str(tmp_path / "one.json")]
    assert evaluate_cli.main(args) == 0
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((two_processes["out"] / "fsdp_cli_eval.json").read_text())
    assert two["by_num_demos"].keys() == one["by_num_demos"].keys() == {"0", "2"}
    for k in ("0", "2"):
        assert two["by_num_demos"][k]["scores"] == one["by_num_demos"][k]["scores"]
        assert two["by_num_demos"][k]["examples"] == one["by_num_demos"][k]["examples"]
