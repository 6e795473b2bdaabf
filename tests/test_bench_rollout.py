"""tools/bench_rollout.py: the replay's counts against brute-force recounts, its byte model
against an independent parameter count, and the tool's report structure at smoke sizes.
No timings are asserted (speed figures come from the tool's interleaved runs)."""
from __future__ import annotations

import heapq
import json
import math

import ml_collections
import numpy as np
import pytest

from configs import paper_r1_1p5b
from tools import bench_rollout as br


def _paper(prompts: int = 16, **rollout):
    """configs/paper_r1_1p5b.py with a smaller RL step; `rollout` overrides config.rollout."""
    cfg = paper_r1_1p5b.get_config()
    cfg.prompts_per_step = prompts
    if rollout:
        if "rollout" not in cfg:
            cfg.rollout = ml_collections.ConfigDict()
        cfg.rollout.update(rollout)
    return cfg


def _phase_ends(m: int, first: int) -> list[int]:
    """The static sampler's phases as its docstring states them: first, 2 first, ... then m."""
    ends, e = [], first
    while e < m:
        ends.append(e)
        e *= 2
    return ends + [m]


def test_static_cost_equals_a_step_by_step_recount():
    rng = np.random.default_rng(0)
    n, shards, m, first = 12, 3, 40, 4
    p = rng.integers(1, 20, n)
    lengths = rng.integers(1, m + 1, n)
    got = br.static_cost(p, lengths, shards=shards, max_new_tokens=m, first_phase=first)
    bucket = max(16, 1 << int(p.max() - 1).bit_length())  # sampling.prompt_bucket's rule
    ends = _phase_ends(m, first)
    rows = n // shards
    want = {k: np.zeros(shards, np.int64) for k in ("useful_row_steps", "row_steps", "kv_live",
                                                     "kv_read", "decode_steps")}
    for i in range(1, int(lengths.max())):  # decode step producing token i, for the whole batch
        cache = bucket + next(e for e in ends if i < e) - 1
        for c in range(shards):
            want["decode_steps"][c] += 1
            for r in range(c * rows, (c + 1) * rows):
                want["row_steps"][c] += 1
                want["kv_read"][c] += cache
                if i < lengths[r]:
                    want["useful_row_steps"][c] += 1
                    want["kv_live"][c] += p[r] + i  # prompt + tokens 0..i-1
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    assert got["prompt_bucket"] == bucket


def _lay(rows_per_instance_slots: int, page: int, block: int, pages: int = 10_000,
         instances: int = 2) -> br.Layout:
    return br.Layout(axes={"data": 1, "fsdp": 1, "tensor": 1}, chips=1, instances=instances,
                     slots=rows_per_instance_slots, page_size=page, block=block,
                     num_pages=pages, kv_tokens_per_chip=pages * page, order="fifo",
                     prefill_tokens=None)


@pytest.mark.parametrize("block", [1, 4, 16])
def test_engine_cost_equals_a_brute_force_recount_when_every_row_has_a_slot(block):
    rng = np.random.default_rng(1)
    n, page, m = 10, 8, 60
    p = rng.integers(1, 30, n)
    lengths = rng.integers(1, m + 1, n)
    got = br.engine_cost(p, lengths, _lay(n // 2, page, block), max_new_tokens=m)
    for k, sl in enumerate((slice(0, 5), slice(5, 10))):
        pp, ll = p[sl], lengths[sl]
        # every row prefills token 0 at once, then decodes tokens 1 .. L-1, attending over
        # its prompt and the tokens before: p + g at the step producing token g
        live = sum(pr + g for pr, lr in zip(pp, ll) for g in range(1, lr))
        read = sum(math.ceil((pr + g) / page) * page for pr, lr in zip(pp, ll) for g in range(1, lr))
        assert got["decode_steps"][k] == ll.max() - 1
        assert got["useful_row_steps"][k] == np.sum(ll - 1)
        assert got["row_steps"][k] == (ll.max() - 1) * 5
        assert got["kv_live"][k] == live and got["kv_read"][k] == read
        assert got["longest"][k] == ll.max() and got["preemptions"][k] == 0


def test_engine_steps_equal_fifo_list_scheduling_with_refill():
    # block 1: a finished slot is refilled before the next step, so each slot runs its rows
    # back to back and the instance takes the makespan of FIFO list scheduling
    rng = np.random.default_rng(2)
    n, slots, m = 24, 4, 50
    p = rng.integers(1, 20, n)
    lengths = rng.integers(2, m + 1, n)  # >= 2: every row decodes at least one step
    got = br.engine_cost(p, lengths, _lay(slots, 4, 1, instances=1), max_new_tokens=m)
    free = [0] * slots  # when each slot frees, a heap
    for d in lengths - 1:
        heapq.heapreplace(free, free[0] + int(d))
    assert got["decode_steps"][0] == max(free)
    assert got["useful_row_steps"][0] == np.sum(lengths - 1)
    assert got["kv_live"][0] == sum(pr + g for pr, lr in zip(p, lengths) for g in range(1, lr))


def test_weight_bytes_match_an_independent_parameter_count():
    cfg = _paper()
    a = paper_r1_1p5b.R1_DISTILL_QWEN_1P5B
    h, i, v, n = a["hidden_size"], a["intermediate_size"], a["vocab_size"], a["num_hidden_layers"]
    kv = a["num_key_value_heads"] * h // a["num_attention_heads"]
    # Qwen2 layer: q, k, v with biases, o, gate/up/down, two norms; then the final norm and the
    # untied lm_head (the input embedding is left out: a lookup reads a few rows of it)
    split = n * (h * h + h + 2 * (h * kv + kv) + h * h + 3 * h * i) + h * v
    whole = n * 2 * h + h
    axes = {"data": 1, "fsdp": 1, "tensor": 1}
    assert br.weight_bytes_per_chip(cfg, axes, np.float32) == 4 * (split + whole)
    assert br.weight_bytes_per_chip(cfg, dict(axes, tensor=4), "bfloat16") == 2 * (split // 4 + whole)


def test_trace_is_the_issue_mix():
    p, n = br.trace(256, 8, 12288, br.Mix(), seed=0)
    assert p.shape == n.shape == (2048,)
    assert p.min() >= 64 and p.max() <= 511 and np.all(p.reshape(256, 8) == p[::8, None])
    assert abs(np.median(n) - 4000) < 300 and abs(np.mean(n == 12288) - 0.05) < 0.02


ROLLOUT = dict(mesh={"tensor": 4}, slots=16, page_size=16, block=8, kv_tokens_per_chip=16 * 12800)


def test_replay_report_structure_and_invariants():
    r = br.replay_report(_paper(prompts=32, **ROLLOUT), draws=2, mix=br.Mix())
    for k in ("useful_row_steps", "live_kv_reads", "decode_steps_over_longest",
              "modelled_decode_s", "static_modelled_decode_s"):
        lo, hi = r[k + "_range"]
        assert lo <= r[k] <= hi, k
    for k in ("useful_row_steps", "live_kv_reads", "static_useful_row_steps", "static_live_kv_reads"):
        assert 0 < r[k] <= 1, k
    assert r["decode_steps_over_longest"] >= 1 and r["static_decode_steps_over_longest"] == 1
    assert r["modelled_decode_s"] <= r["static_modelled_decode_s"]
    assert len(r["per_draw"]) == 2 and r["rollouts"] == 256
    assert r["continuous"]["instances"] == 64 and r["continuous"]["rows_per_instance"] == 4
    json.dumps(r, default=float)


def test_layout_names_what_the_config_lacks():
    cfg = _paper()
    if "rollout" in cfg:
        del cfg["rollout"]
    with pytest.raises(ValueError, match="rollout.slots"):
        br.layout(cfg)
    with pytest.raises(ValueError, match="does not divide"):
        br.layout(_paper(**dict(ROLLOUT, mesh={"tensor": 3})))


def test_quick_run_writes_every_mode(tmp_path):
    """The tool end to end at --quick sizes (tunix left out: its venv is not the test's)."""
    out = tmp_path / "r.json"
    br.main(["--quick", "--json", str(out), "--set", "prompts_per_step=32",
             "--tunix-python", str(tmp_path / "no-tunix")])
    r = json.loads(out.read_text())
    assert r["modes"] == ["replay", "skewed", "equal"] and r["machine"]["backend"] == "cpu"
    for k in ("useful_row_steps", "live_kv_reads", "static_useful_row_steps", "static_live_kv_reads"):
        assert 0 < r[k] <= 1, k
    assert r["decode_steps_over_longest"] >= 1 and r["static_modelled_decode_s"] > 0
    b = r["skewed"]
    assert set(b["engines"]) == {"continuous", "static", "transformers_generate_batch"}
    assert "tunix" in b["skipped"] and b["greedy_continuous_equals_static"] is True
    # the same checkpoint in torch: float differences may flip a near-tie, not half the tokens
    assert b["greedy_agreement_with_static"]["transformers_generate_batch"] > 0.5
    assert b["engines"]["static"]["over_static"]["median"] == 1.0
    for e in b["engines"].values():
        assert e["tokens_per_s"] > 0 and e["over_static"]["min"] <= e["over_static"]["median"]
    assert set(r["equal"]["modes"]) == {"greedy", "sample"}
    assert r["equal"]["modes"]["greedy"]["same_tokens"] is True
