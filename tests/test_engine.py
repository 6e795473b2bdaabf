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


# ----------------------------------------------------------------------------- the engine
# Tiny random Qwen2 / Qwen3 / Llama checkpoints (tests/tiny_hf.py), shared with test_sampling.

import jax  # noqa: E402

from scope_jax import rollout, sampling  # noqa: E402
from tests.test_sampling import hf_greedy, load_checkpoint, random_prompts  # noqa: E402

# Small slots, pages and blocks, so that every test refills slots, crosses pages and blocks.
SMALL = dict(slots=2, page_size=4, block=4)


@pytest.fixture(scope="module", params=["qwen2", "qwen3", "llama"])
def checkpoint(request, tmp_path_factory):
    return load_checkpoint(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return load_checkpoint("qwen3", tmp_path_factory)[1]


def _np(out):
    return {k: np.asarray(v) for k, v in vars(out).items()}


def _both(model, settings, prompts, **kw):
    """(static output, continuous output, the continuous engine) for the same call."""
    static = rollout.make_engine("static", model, settings).generate(prompts, **kw)
    eng = rollout.make_engine("continuous", model, settings, **SMALL)
    return _np(static), _np(eng.generate(prompts, **kw)), eng


def test_greedy_matches_transformers_and_the_static_sampler(checkpoint):
    family, model, hf = checkpoint
    prompts = random_prompts(0)
    eos_id = hf_greedy(hf, prompts[2], 20, eos_id=None)[5]  # both stop paths happen
    settings = rollout.Settings(max_new_tokens=20, stop_ids=(eos_id,))
    static, cont, eng = _both(model, settings, prompts)
    assert eng.last_stats["prefills"] >= 3  # 5 rows through 2 slots: refills
    for i, prompt in enumerate(prompts):
        want = hf_greedy(hf, prompt, 20, eos_id=eos_id)
        n = cont["lengths"][i]
        assert cont["tokens"][i, :n].tolist() == want, (family, i)
    for k in ("tokens", "response_mask", "lengths", "finish_reason", "prompt_ids",
              "prompt_lengths", "group_ids"):
        np.testing.assert_array_equal(cont[k], static[k], err_msg=k)
    assert (cont["finish_reason"] == sampling.FINISH_EOS).any()
    for k in ("logprobs", "policy_logprobs"):
        np.testing.assert_allclose(cont[k], static[k], atol=1e-5, err_msg=k)


def test_sampled_tokens_and_logprobs_match_the_static_sampler(checkpoint):
    family, model, _ = checkpoint
    prompts = random_prompts(1)
    settings = rollout.Settings(max_new_tokens=24, temperature=0.7, top_k=20, top_p=0.9,
                                stop_ids=(2,))
    static, cont, _ = _both(model, settings, prompts, num_samples=4, key=jax.random.key(3))
    same = (cont["tokens"] == static["tokens"]).all(axis=1)
    # Float differences (paged vs dense attention sums) could flip a draw that falls on a CDF
    # boundary; measured: no row of the 20 differs on any family.
    assert same.sum() >= len(same) - 1, (family, np.flatnonzero(~same))
    for k in ("logprobs", "policy_logprobs"):
        np.testing.assert_allclose(cont[k][same], static[k][same], atol=1e-5, err_msg=k)


def test_repetition_penalty_matches_the_static_sampler(qwen3):
    prompts = random_prompts(6)
    for temperature in (0.0, 0.9):
        settings = rollout.Settings(max_new_tokens=24, temperature=temperature,
                                    repetition_penalty=1.5)
        static, cont, _ = _both(qwen3, settings, prompts, key=jax.random.key(0))
        np.testing.assert_array_equal(cont["tokens"], static["tokens"])
        np.testing.assert_allclose(cont["logprobs"], static["logprobs"], atol=1e-5)


def test_per_row_budgets_cut_each_row(qwen3):
    prompts = random_prompts(2)[:3]
    settings = rollout.Settings(max_new_tokens=16, temperature=0.8)
    budgets = [1, 16, 5, 9, 3, 12]
    key = jax.random.key(5)
    full = _np(rollout.make_engine("continuous", qwen3, settings, **SMALL).generate(
        prompts, num_samples=2, key=key))
    out = _np(rollout.make_engine("continuous", qwen3, settings, **SMALL).generate(
        prompts, num_samples=2, key=key, max_new_tokens=budgets))
    assert out["tokens"].shape == (6, 16)
    np.testing.assert_array_equal(out["lengths"], np.minimum(full["lengths"], budgets))
    for i, b in enumerate(budgets):
        n = out["lengths"][i]
        assert out["tokens"][i, :n].tolist() == full["tokens"][i, :n].tolist()
        assert (out["tokens"][i, n:] == settings.pad_id).all()
        np.testing.assert_allclose(out["logprobs"][i, :n], full["logprobs"][i, :n], atol=1e-6)
    with pytest.raises(ValueError, match="per-row max_new_tokens must be in"):
        rollout.make_engine("continuous", qwen3, settings).generate(
            prompts, num_samples=2, key=key, max_new_tokens=[17] * 6)


def test_a_tiny_pool_preempts_and_gives_the_same_tokens(qwen3):
    prompts = random_prompts(3)
    settings = rollout.Settings(max_new_tokens=24, temperature=0.9)
    key = jax.random.key(7)
    roomy = rollout.make_engine("continuous", qwen3, settings, slots=4, page_size=4, block=4)
    want = _np(roomy.generate(prompts, num_samples=2, key=key))
    assert roomy.last_stats["preemptions"] == 0
    # 14 pages of 4 tokens: the longest row (30 + 24 tokens) fits alone, 4 rows never do.
    tight = rollout.make_engine("continuous", qwen3, settings, slots=4, page_size=4, block=4,
                                kv_tokens=56)
    got = _np(tight.generate(prompts, num_samples=2, key=key))
    assert tight.last_stats["preemptions"] > 0
    np.testing.assert_array_equal(got["tokens"], want["tokens"])
    np.testing.assert_allclose(got["logprobs"], want["logprobs"], atol=1e-5)


def test_a_row_larger_than_the_pool_is_refused(qwen3):
    settings = rollout.Settings(max_new_tokens=24)
    eng = rollout.make_engine("continuous", qwen3, settings, slots=2, page_size=4, kv_tokens=48)
    with pytest.raises(ValueError, match="row 1: prompt 30 \\+ budget 24 tokens need 14 pages"):
        eng.generate([[5] * 10, [6] * 30])


def test_tokens_do_not_depend_on_slots_or_admission_order(qwen3):
    prompts = random_prompts(4)
    settings = rollout.Settings(max_new_tokens=12, temperature=1.0, stop_ids=(2,))
    key = jax.random.key(9)
    outs = [_np(rollout.make_engine("continuous", qwen3, settings, slots=s, page_size=p,
                                    block=b, order=o).generate(prompts, num_samples=3, key=key))
            for s, p, b, o in ((1, 4, 4, "fifo"), (5, 8, 3, "longest"), (15, 16, 16, "fifo"))]
    for o in outs[1:]:
        np.testing.assert_array_equal(o["tokens"], outs[0]["tokens"])


def test_gather_and_paged_decode_give_the_same_rows(qwen3):
    """The CPU default ("gather": context chunks read once per block) against the paged
    reference read at every step: same tokens, log-probs within 1e-5, through refills, a
    preemption, EOS and the repetition penalty."""
    assert rollout.make_engine("continuous", qwen3, rollout.Settings(4)).implementation == "gather"
    prompts = random_prompts(3)
    key = jax.random.key(11)
    for settings in (rollout.Settings(max_new_tokens=24, temperature=0.9, stop_ids=(2,)),
                     rollout.Settings(max_new_tokens=24, repetition_penalty=1.3)):
        outs = {}
        for impl in ("gather", "xla"):
            eng = rollout.make_engine("continuous", qwen3, settings, slots=4, page_size=4,
                                      block=5, kv_tokens=56, implementation=impl)
            outs[impl] = _np(eng.generate(prompts, num_samples=2, key=key))
            assert eng.last_stats["preemptions"] > 0
        np.testing.assert_array_equal(outs["gather"]["tokens"], outs["xla"]["tokens"])
        np.testing.assert_array_equal(outs["gather"]["lengths"], outs["xla"]["lengths"])
        for k in ("logprobs", "policy_logprobs"):
            np.testing.assert_allclose(outs["gather"][k], outs["xla"][k], atol=1e-5, err_msg=k)
    with pytest.raises(ValueError, match="implementation 'dense'"):
        rollout.make_engine("continuous", qwen3, settings, implementation="dense")


def test_gather_args_lay_out_each_live_context_once():
    """_gather_args: at equal lengths one chunk per slot (per-row layout, ctx_row None), at a
    skewed mix chunks of GATHER_CHUNK tokens; either way each live slot's context pages, in
    order, with its length, nothing for a dead slot, and its block's new tokens' pool slots."""
    ps, block, n = 4, 3, rollout.GATHER_CHUNK // 4
    rng = np.random.default_rng(0)

    def check(kv, live):
        s = len(kv)
        owned = np.where(live, -(-(kv + block) // ps), 0).astype(np.int32)
        table = np.zeros((s, int(owned.max()) + 2), np.int32)
        for sl in range(s):
            table[sl, :owned[sl]] = rng.permutation(1000)[:owned[sl]] + 1
        pages, row, length, write = rollout._gather_args(table, owned, live, kv, block, ps)
        for sl in range(s):
            mine = np.flatnonzero(((np.arange(s) if row is None else row) == sl) & (length > 0))
            got = np.concatenate([pages[c].repeat(ps)[:length[c]] for c in mine] or [[]])
            want = table[sl].repeat(ps)[:kv[sl]] if live[sl] else []
            np.testing.assert_array_equal(got, want)  # the pages of each context token
            pos = kv[sl] + np.arange(block)
            np.testing.assert_array_equal(
                write[sl], table[sl, pos // ps] * ps + pos % ps if live[sl] else -1)
        return pages.shape, row

    live = np.array([True, True, True, False])
    shape, row = check(np.array([150, 151, 149, 7]), live)  # about equal: one chunk per slot
    assert row is None and shape == (4, n * 3)  # 3 chunks of 64 tokens each
    shape, row = check(np.array([200, 5, 9, 7]), live)  # skewed: 4 + 1 + 1 chunks of 64
    assert row is not None and shape == (6, n)


def test_prefill_calls_bound_the_padded_shape():
    """Longest first; rows x longest context (powers of two, 16 at least) within the budget,
    a context over it alone; every row in exactly one call."""
    contexts = [30, 500, 7, 9000, 64, 65, 3, 3, 3]
    calls = rollout.prefill_calls(contexts, 512)
    assert sorted(i for c in calls for i in c) == list(range(len(contexts)))
    assert calls[0] == [3] and calls[1] == [1]  # 9000 alone, then 500 (512 x 1)
    for c in calls[2:]:
        assert rollout._pow2(len(c)) * rollout._pow2(max(contexts[i] for i in c), 16) <= 512
        assert [contexts[i] for i in c] == sorted((contexts[i] for i in c), reverse=True)
    assert rollout.prefill_calls([5] * 40, 512) == [list(range(32)), list(range(32, 40))]


def test_finished_rows_stream_out_once_and_equal_the_result(qwen3):
    prompts = random_prompts(5)
    settings = rollout.Settings(max_new_tokens=16, temperature=0.8, stop_ids=(2,))
    parts = []
    out = _np(rollout.make_engine("continuous", qwen3, settings, **SMALL).generate(
        prompts, num_samples=2, key=jax.random.key(1), max_new_tokens=[1, 16] * 5,
        on_finished=lambda rows, part: parts.append((rows, _np(part)))))
    assert len(parts) > 1  # several calls: rows come out as they end
    rows = [r for rs, _ in parts for r in rs]
    assert sorted(rows) == list(range(10))
    for rs, part in parts:
        for k, v in part.items():
            np.testing.assert_array_equal(v, out[k][rs], err_msg=k)


def _two_process_worker(ckpt: str, out: str) -> None:
    """One of 2 processes (tests/tiny_hf.run_two_processes): the student sharded over both
    processes' devices (fsdp), each process generating its own prompts on its own engine."""
    from scope_jax.models import load_hf
    from scope_jax.sharding import initialize_distributed, make_mesh

    initialize_distributed()
    mesh = make_mesh({"fsdp": -1})
    model = load_hf(ckpt, mesh=mesh)
    pid = jax.process_index()
    for temperature in (0.0, 0.8):
        settings = rollout.Settings(max_new_tokens=12, temperature=temperature, stop_ids=(2,))
        eng = rollout.make_engine("continuous", model, settings, mesh, **SMALL)
        got = eng.generate(random_prompts(20 + pid)[:3], num_samples=2, key=jax.random.key(4))
        assert got.tokens.shape == (12, 12) and not got.tokens.is_fully_addressable
        np.savez(f"{out}/{pid}_{temperature}.npz",
                 **{k: sampling.local_rows(v) for k, v in vars(got).items()})


def test_two_processes_generate_their_own_rows(qwen3, tmp_path):
    """2 CPU processes: each one's rows equal a one-process run of its prompts with its key
    (jax.random.fold_in(key, process)), and the outputs are global arrays."""
    import os
    import subprocess  # noqa: F401
    import sys

    from tests.tiny_hf import make_tiny_checkpoint, run_two_processes

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "qwen3", seed=11, tie_word_embeddings=True)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=root)
    run_two_processes([sys.executable, os.path.abspath(__file__), str(ckpt), str(tmp_path)],
                      root, env)
    from scope_jax.models import load_hf

    model = load_hf(ckpt)
    for temperature in (0.0, 0.8):
        settings = rollout.Settings(max_new_tokens=12, temperature=temperature, stop_ids=(2,))
        for pid in (0, 1):
            want = _np(rollout.make_engine("continuous", model, settings, **SMALL).generate(
                random_prompts(20 + pid)[:3], num_samples=2,
                key=jax.random.fold_in(jax.random.key(4), pid)))
            got = dict(np.load(tmp_path / f"{pid}_{temperature}.npz"))
            np.testing.assert_array_equal(got["tokens"], want["tokens"])
            np.testing.assert_allclose(got["logprobs"], want["logprobs"], atol=1e-5)
            np.testing.assert_array_equal(got["group_ids"], want["group_ids"] + 3 * pid)


if __name__ == "__main__":
    import sys

    _two_process_worker(sys.argv[1], sys.argv[2])
