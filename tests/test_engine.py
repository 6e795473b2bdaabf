"""The continuous-batching engine: its host-side scheduler (scope_jax.engine) alone, then the
engine (scope_jax.rollout, kind "continuous") against the static sampler and transformers."""
from __future__ import annotations

import numpy as np
import pytest

from scope_jax import engine


def _run(sched, lengths):
    """Drives a Scheduler like the engine, with rows ending after lengths[row] tokens; checks
    the page invariants at every block. Returns (admission order, finished order)."""
    admitted, finished = [], []
    while not sched.done():
        sched.reserve()
        admitted += [a.row for a in sched.admit()]
        live = sched.live
        owned = [p for s in live for p in sched.pages(s)]
        assert len(owned) == len(set(owned)), "a page owned twice"
        assert len(owned) + sched.free_pages == sched.num_pages, "a page lost"
        progress = {}
        for s, r in live.items():
            # the block may write kv_len + block tokens (capped by the budget): pages for them
            room = len(sched.pages(s)) * sched.page_size
            g = min(sched.generated(r) + sched.block, lengths[r])
            assert room >= sched.kv_len(r) + (g - sched.generated(r))
            progress[r] = (g, g == lengths[r])
        finished += sched.advance(progress)
    return admitted, finished


def test_scheduler_serves_every_row_once_within_the_pool():
    rng = np.random.default_rng(0)
    n = 40
    prompts = rng.integers(1, 30, n).tolist()
    lengths = rng.integers(1, 60, n).tolist()
    sched = engine.Scheduler(slots=4, num_pages=12, page_size=8, block=4)
    for i in range(n):
        sched.add(i, prompts[i], lengths[i])
    admitted, finished = _run(sched, lengths)
    assert sorted(finished) == list(range(n))
    assert sched.free_pages == 12 and not sched.live


def test_scheduler_preempts_the_most_recent_row_and_it_resumes_with_its_tokens():
    # 3 pages of 4 tokens: two rows of prompt 2 fit at first, then grow past the pool.
    sched = engine.Scheduler(slots=2, num_pages=3, page_size=4, block=2)
    sched.add(0, 2, 8)
    sched.add(1, 2, 8)
    first = sched.admit()
    assert [a.row for a in first] == [0, 1] and [len(a.pages) for a in first] == [1, 1]
    sched.advance({0: (3, False), 1: (3, False)})  # kv_len 4 each: next block needs 2 pages each
    pre = sched.reserve()
    assert [(p.row, p.generated) for p in pre] == [(1, 3)]
    assert sched.live == {0: 0} and len(sched.pages(0)) == 2
    assert sched.admit() == []  # 1 page free, row 1 needs pages for 2 + 3 + 2 tokens
    for g in (5, 7):
        assert sched.advance({0: (g, False)}) == []
        assert sched.reserve() == [] and sched.admit() == []
    assert sched.advance({0: (8, True)}) == [0]
    again = sched.admit()
    assert [(a.row, a.context, a.generated) for a in again] == [(1, 5, 3)]
    assert sched.preemptions == 1


def test_scheduler_refuses_a_row_larger_than_the_pool():
    sched = engine.Scheduler(slots=2, num_pages=4, page_size=4, block=2)
    sched.add(0, 8, 8)  # exactly the pool
    with pytest.raises(ValueError, match="row 1: prompt 9 \\+ budget 8 tokens need 5 pages"):
        sched.add(1, 9, 8)


def test_scheduler_orders_longest_budget_first():
    sched = engine.Scheduler(slots=1, num_pages=64, page_size=4, block=4, order="longest")
    for i, b in enumerate([3, 9, 5, 9]):
        sched.add(i, 2, b)
    admitted, _ = _run(sched, [3, 9, 5, 9])
    assert admitted == [1, 3, 2, 0]


def test_replay_counts_match_a_hand_count():
    # One slot, block 4, pages of 4: row 0 prompt 3 length 6 (1 token from prefill, then 5
    # decode steps over contexts 4, 5, 6, 7, 8), row 1 prompt 1 length 1 (prefill only).
    s = engine.replay([3, 1], [6, 1], slots=1, num_pages=8, page_size=4, block=4)
    assert s.decode_steps == 5 and s.useful_row_steps == 5 and s.row_steps == 5
    assert s.kv_live == 4 + 5 + 6 + 7 + 8
    assert s.kv_read == 4 + 8 + 8 + 8 + 8
    assert s.prefill_tokens == 3 + 1 and s.prefills == 2 and s.preemptions == 0
