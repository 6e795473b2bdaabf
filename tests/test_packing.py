"""Packed rows (several rollouts per row, segment ids): the packed forward equals each sequence's
own forward, the host packer's plans, and the packed train step equals the unpacked one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from scope_jax import sharding as shd
from scope_jax.models import ModelConfig, Transformer

TINY = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=97, hidden_size=32,
            intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=10000.0)


def _model(remat=False):
    return Transformer(ModelConfig.from_hf(TINY), rngs=nnx.Rngs(0), remat=remat, attention_chunk=8)


def _pack_rows(seqs, capacity):
    """seqs (lists of token ids) packed in order, greedily, into rows of `capacity`:
    (ids [R, C], segment ids [R, C], [(row, start)] of each sequence)."""
    rows, where = [[]], []
    for s in seqs:
        if len(rows[-1]) + len(s) > capacity:
            rows.append([])
        where.append((len(rows) - 1, len(rows[-1])))
        rows[-1].extend(s)
    ids = np.zeros((len(rows), capacity), np.int32)
    seg = np.zeros((len(rows), capacity), np.int32)
    for i, (s, (r, start)) in enumerate(zip(seqs, where)):
        ids[r, start:start + len(s)] = s
        seg[r, start:start + len(s)] = i + 1
    return ids, seg, where


@pytest.mark.parametrize("mesh_shape", [None, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_packed_forward_equals_each_sequence_alone(mesh_shape):
    rng = np.random.default_rng(0)
    lengths = [13, 5, 30, 1, 9, 22, 7, 17]
    seqs = [rng.integers(1, TINY["vocab_size"], n).tolist() for n in lengths]
    ids, seg, where = _pack_rows(seqs, capacity=40)  # 4 rows, each with 1-3 sequences
    ids, seg = (np.pad(x, ((0, 8 - len(x)), (0, 0))) for x in (ids, seg))  # 8 rows: one a device
    # the unpacked layout: one left-padded sequence per row (as the trainer's rollouts)
    width = max(lengths)
    alone = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros((len(seqs), width), bool)
    for i, s in enumerate(seqs):
        alone[i, width - len(s):], mask[i, width - len(s):] = s, True
    model = _model()
    graphdef, state = nnx.split(model)
    packed_fn = jax.jit(lambda st, x, sg: nnx.merge(graphdef, st).hidden(x, segment_ids=sg))
    alone_fn = jax.jit(lambda st, x, m: nnx.merge(graphdef, st).hidden(x, attention_mask=m))
    if mesh_shape is None:
        packed = packed_fn(state, jnp.asarray(ids), jnp.asarray(seg))
    else:
        mesh = shd.make_mesh(mesh_shape)
        state = jax.device_put(state, shd.model_shardings(model, mesh))
        rows = shd.logical_to_sharding(("batch", "length"), mesh)
        with jax.set_mesh(mesh):
            packed = packed_fn(state, jax.device_put(jnp.asarray(ids), rows),
                               jax.device_put(jnp.asarray(seg), rows))
    ref = np.asarray(alone_fn(nnx.split(model)[1], jnp.asarray(alone), jnp.asarray(mask)))
    packed = np.asarray(packed)
    for i, (s, (r, start)) in enumerate(zip(seqs, where)):
        np.testing.assert_allclose(packed[r, start:start + len(s)], ref[i, width - len(s):],
                                   atol=2e-5, rtol=0, err_msg=f"sequence {i}")
    # the same rows as one sequence each would differ (the test can fail)
    mixed = np.asarray(alone_fn(nnx.split(model)[1], jnp.asarray(ids), jnp.asarray(seg > 0)))
    r, start = where[1]
    assert np.abs(mixed[r, start:start + lengths[1]] - ref[1, width - lengths[1]:]).max() > 1e-3


def test_segment_positions_restart_at_each_sequence():
    from scope_jax.models.model import segment_positions

    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5]])
    np.testing.assert_array_equal(np.asarray(segment_positions(seg)),
                                  [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])


def test_hidden_refuses_both_masks():
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="attention_mask or segment_ids"):
        _model().hidden(ids, attention_mask=jnp.ones((1, 4), bool), segment_ids=jnp.ones((1, 4), jnp.int32))


# ---- the host packer -----------------------------------------------------------------------

from scope_jax import packing  # noqa: E402


def test_count_bucket_is_exact_to_8_then_eight_counts_per_doubling():
    assert [packing.count_bucket(n) for n in (0, 1, 7, 8, 9, 15, 16, 17, 33, 100)] == \
        [1, 1, 7, 8, 9, 15, 16, 18, 36, 104]
    for n in range(1, 2000):
        b = packing.count_bucket(n)
        assert n <= b <= n * 1.125 + 1e-9, n
    assert len({packing.count_bucket(n) for n in range(65, 129)}) == 8


def test_first_fit_decreasing_fills_bins_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, 200)
    bins = packing.first_fit_decreasing(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(200))
    assert all(lengths[b].sum() <= 100 for b in bins)
    # FFD's bound: at most 11/9 OPT + 1 bins, OPT >= total / capacity
    assert len(bins) <= 11 / 9 * np.ceil(lengths.sum() / 100) + 1
    with pytest.raises(ValueError, match=r"in \[1, capacity=100\]"):
        packing.first_fit_decreasing([50, 101], 100)


def test_snake_order_keeps_rows_per_shard_and_balances_lengths():
    lengths = np.random.default_rng(1).integers(1, 1000, 64)
    order = packing.snake_order(lengths, 4)
    assert sorted(order) == list(range(64))
    sums = lengths[order].reshape(4, 16).sum(1)
    assert sums.max() - sums.min() <= lengths.max()  # within one row's length


def test_swap_to_fit_moves_a_rollout_so_every_shard_packs_into_the_bound():
    lengths = np.array([6, 6, 6, 2, 5, 5, 4, 4])  # shard 0 needs 3 rows of 10 (6 | 6 | 6 + 2)
    assert len(packing.first_fit_decreasing(lengths[:4], 10)) == 3
    perm = packing.swap_to_fit(lengths, 2, 10)
    swapped = lengths[perm]
    assert sorted(perm) == list(range(8))
    assert [len(packing.first_fit_decreasing(swapped[s * 4:(s + 1) * 4], 10)) for s in (0, 1)] == [2, 2]
    np.testing.assert_array_equal(packing.swap_to_fit(lengths, 2, 10, budget=0), np.arange(8))
    fits = np.array([6, 4, 5, 5, 3, 3, 4, 4])  # nothing to do: the identity
    np.testing.assert_array_equal(packing.swap_to_fit(fits, 2, 10), np.arange(8))


def test_packing_at_the_realistic_mix_is_within_the_issues_goal():
    """Issue 11's mix on the paper's 64 batch shards of 32 rollouts: <= 10% padding (one
    draw; the README gives 10 draws' spread)."""
    from tools.scale_check import response_lengths

    r = response_lengths(2048, median=4000, cap=12288, cap_share=0.05, seed=0)
    prompts = np.random.default_rng(1).integers(64, 512, 2048)
    p = packing.plan(prompts + r, 64, 16384)
    assert p.padding <= 0.10, p.padding
    assert 1 - (prompts + r).sum() / (2048 * 16384) > 0.6  # one rollout per row: > 60% padding


def _unpacked_rows(rng, n, p, m):
    """Left-padded prompts + right-padded responses: (ids [n, p + m], mask [n, p + m])."""
    prompt = rng.integers(1, p + 1, n)
    resp = rng.integers(1, m + 1, n)
    ids = rng.integers(1, 50, (n, p + m)).astype(np.int32)
    mask = (np.arange(p + m)[None] >= (p - prompt)[:, None]) & (np.arange(p + m)[None] < (p + resp)[:, None])
    return np.where(mask, ids, 0), mask


def test_plan_and_pack_tokens_keep_every_rollout_on_its_shard_intact():
    rng = np.random.default_rng(2)
    shards, per, cap = 4, 12, 40
    ids, mask = _unpacked_rows(rng, shards * per, 8, 24)
    lengths = mask.sum(1)
    p = packing.plan(lengths, shards, cap)
    s, n, k = p.rollout.shape
    assert s == shards and n == packing.count_bucket(n) and k == packing.count_bucket(k)
    # the order keeps per rows on every shard
    assert sorted(p.order) == list(range(shards * per))
    ids, mask = ids[p.order], mask[p.order]
    packed, seg = packing.pack_tokens(p, ids, mask)
    assert packed.shape == seg.shape == (s * n, cap)
    seen = []
    for shard in range(s):
        for j in range(n):
            row = shard * n + j
            for slot in np.flatnonzero(p.real[shard, j]):
                r = shard * per + p.rollout[shard, j, slot]
                seen.append(r)
                at = np.flatnonzero(seg[row] == slot + 1)
                assert at[0] == p.start[shard, j, slot] and len(at) == lengths[p.order][r]
                np.testing.assert_array_equal(packed[row, at], ids[r][mask[r]])
    assert sorted(seen) == list(range(shards * per))  # each rollout exactly once, on its shard
    assert 0 < p.padding == pytest.approx(1 - lengths.sum() / (s * n * cap))


# ---- the packed train step -----------------------------------------------------------------

from scope_jax import scoring, step as step_lib  # noqa: E402


def _rollouts(b=16, p=6, m=7, seed=0):
    """b rollouts of 4 prompts: prompts of 3..6 tokens, responses of 4..7 (each rollout 7..13
    real tokens, so two never share a 13-token row), mixed labels."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, TINY["vocab_size"], (b, p + m)).astype(np.int32)
    prompt, resp = rng.integers(3, p + 1, b), rng.integers(4, m + 1, b)
    attn = np.concatenate([np.arange(p)[None] >= (p - prompt)[:, None],
                           np.arange(m)[None] < resp[:, None]], 1)
    resp_mask = np.arange(m)[None] < resp[:, None]
    lp = lambda: np.where(resp_mask, np.log(rng.uniform(0.05, 1, (b, m))), 0).astype(np.float32)
    return step_lib.Rollouts(
        input_ids=np.where(attn, ids, 0), attention_mask=attn, response_mask=resp_mask,
        old_logprobs=lp(), teacher_logprobs=lp(), ref_logprobs=lp(),
        correct=rng.random(b) < 0.5, group_ids=(np.arange(b) // 4).astype(np.int32))


def _step_cfg(algo, packing=0):
    from configs import toy

    c = toy.get_config()
    c.algo, c.micro_batches, c.packing = algo, 1, packing
    c.optim.warmup_steps = 0
    if algo == "grpo":
        c.grpo.kl_coef = 0.1  # the reference log-probs count too
    return c


def _run_step(cfg, mesh, batch, packed=None):
    model = _model(remat="full")
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    opt = step_lib.make_optimizer(cfg)
    param_sh = nnx.to_pure_dict(shd.model_shardings(model, mesh))
    state_sh = step_lib.state_shardings(opt, param_sh, mesh, params)
    state = jax.device_put(step_lib.TrainState(params=params, opt_state=opt.init(params),
                                            step=jnp.zeros((), jnp.int32)), state_sh)
    step = step_lib.build_step(cfg, graphdef, opt, state_sh, mesh)
    rows = shd.batch_sharding(mesh)
    args = (jax.device_put(batch, rows),) + (() if packed is None else (jax.device_put(packed, rows),))
    with jax.set_mesh(mesh):
        state, metrics = step(state, *args)
    return jax.device_get(metrics), jax.device_get(state.params)


@pytest.mark.parametrize("algo", ["scope", "opd", "grpo", "kd"])
def test_packed_step_equals_the_unpacked_step(algo):
    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    batch = _rollouts(seed=3)
    if algo == "kd":  # kd_only_correct: the loss mask also drops the wrong rollouts
        assert _step_cfg(algo).kd_only_correct
    ref_metrics, ref_params = _run_step(_step_cfg(algo), mesh, batch)
    for capacity, micro_batches in ((32, 1), (13, 2)):
        pb = packing.pack_batch(batch.input_ids, batch.attention_mask, batch.response_mask.shape[1], mesh, capacity)
        permuted, packed = packing.permute(batch, pb, mesh), pb.packed
        assert packed.input_ids.shape == (8 * micro_batches, capacity), capacity
        assert 0 < pb.plan.padding < 1
        metrics, params = _run_step(_step_cfg(algo, capacity), mesh, permuted, packed)
        for key in ("loss", "grad_norm"):
            assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-5), (capacity, key)
        assert set(metrics) == set(ref_metrics)
        for key in metrics:  # the routing metrics too (the rows' order does not matter)
            assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-5, abs=1e-6), (capacity, key)
        for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert abs(ref_metrics["loss"]) > 1e-3 and ref_metrics["grad_norm"] > 1e-3  # not a vacuous step


def test_config_packing_must_hold_any_rollout():
    from configs import common
    from scope_jax import config as config_lib

    cfg = common.base()
    cfg.student, cfg.teacher, cfg.data.train_files = "s", "t", "d.jsonl"
    cfg.data.max_prompt_len, cfg.sampling.max_new_tokens = 100, 50  # prompt bucket 128
    cfg.packing = 177
    assert config_lib.problems(cfg) == ["config.packing=177: a packed row must hold any rollout, "
                                        "prompt bucket + sampling.max_new_tokens = 178 tokens; set it >= 178"]
    cfg.packing = 178
    assert config_lib.problems(cfg) == []


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def toy_setup(tmp_path_factory):
    sys.path.insert(0, os.path.dirname(__file__))
    from tiny_hf import make_toy_setup

    return make_toy_setup(tmp_path_factory.mktemp("toy"))


def _cli(setup, workdir, packing, *extra):
    return [sys.executable, "-m", "tools.train", "--config", "configs/toy.py", "--config.algo=scope",
            f"--config.workdir={workdir}", "--config.toy_dir=", f"--config.student={setup / 'student'}",
            f"--config.teacher={setup / 'teacher'}", f"--config.data.train_files={setup / 'data' / 'train.jsonl'}",
            "--config.num_steps=1", "--config.prompts_per_step=2", "--config.num_samples=4",
            "--config.sampling.max_new_tokens=8", "--config.verifier.num_workers=1",
            "--config.optim.warmup_steps=0", "--config.export=False", f"--config.packing={packing}", *extra]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    env.update(JAX_PLATFORMS="cpu", **extra)
    return env


def _first_row(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return json.loads(f.readline())


def test_cli_packed_run_logs_the_packed_layout_and_the_same_update(toy_setup, tmp_path):
    """tools.train with config.packing: the same step-0 loss and gradient as without, and
    metrics.jsonl's seq_len / padding are the packed rows' (one CPU device: one shard)."""
    rows = {}
    for packing in (0, 72):  # prompt bucket 64 + 8 new tokens
        subprocess.run(_cli(toy_setup, tmp_path / str(packing), packing), cwd=ROOT, env=_env(),
                       check=True, capture_output=True, timeout=300)
        rows[packing] = _first_row(tmp_path / str(packing))
    plain, packed = rows[0], rows[72]
    assert packed["seq_len"] == 72 and plain["seq_len"] < 72  # the batch's prompt bucket + 16
    real = (1 - plain["padding"]) * plain["seq_len"] * 8  # the rollouts' real tokens
    rows_used = real / ((1 - packed["padding"]) * 72)
    assert rows_used == pytest.approx(round(rows_used), abs=1e-6) and rows_used < 8  # packed rows
    for key in ("loss", "grad_norm", "reward", "response_length"):
        assert packed[key] == pytest.approx(plain[key], rel=1e-5), key


def test_cli_continuous_engine_trains_as_the_static_one(toy_setup, tmp_path):
    """tools.train with config.rollout.engine=continuous (sampled at the toy's T 0.6, packed):
    the rollouts depend on the per-row keys only, so two steps log what the static engine's
    run logs (the training math is shared; only the sampler differs)."""
    rows = {}
    for engine in ("static", "continuous"):
        subprocess.run(_cli(toy_setup, tmp_path / engine, 72, "--config.num_steps=2",
                            f"--config.rollout.engine={engine}", "--config.rollout.slots=4",
                            "--config.rollout.kv_tokens_per_chip=512"),
                       cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=300)
        with open(tmp_path / engine / "metrics.jsonl") as f:
            rows[engine] = [json.loads(line) for line in f]
    assert [r["step"] for r in rows["continuous"]] == [0, 1]
    for plain, cont in zip(rows["static"], rows["continuous"]):
        for key in ("loss", "grad_norm", "reward", "response_length", "finished_eos"):
            assert cont[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-7), key


def test_two_processes_pack_their_own_rows_and_match_one_process(toy_setup, tmp_path):
    """2 local processes (1 CPU device each, gloo): each packs its half of the rollouts on its
    own shard; the update equals one unpacked process's on the same global batch."""
    from tiny_hf import run_two_processes

    greedy = "--config.sampling.temperature=0.0"
    subprocess.run(_cli(toy_setup, tmp_path / "one", 0, greedy), cwd=ROOT, env=_env(), check=True,
                   capture_output=True, timeout=300)
    run_two_processes(_cli(toy_setup, tmp_path / "two", 72, greedy), ROOT, _env())
    one, two = _first_row(tmp_path / "one"), _first_row(tmp_path / "two")
    assert two["seq_len"] == 72 and two["rollouts"] == 4  # 4 of 8 per host
    for key in ("loss", "grad_norm", "wrong/teacher_ppl", "response_length"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("mesh_shape", [None, {"data": 2, "fsdp": 4}])
def test_packed_scoring_pass_equals_the_unpacked_one(mesh_shape):
    """make_score with config.packing (same signature): the same response log-probs, in the
    rows' order (the plan permutes rows over shards and back)."""
    batch = _rollouts(seed=4)
    model = _model()
    graphdef, params = nnx.split(model)
    m = batch.response_mask.shape[1]
    real = batch.attention_mask[:, -m:]  # the response tokens the rollouts hold
    mesh = shd.make_mesh(mesh_shape) if mesh_shape else None
    out = {}
    for packing in (0, 13):
        cfg = _step_cfg("scope", packing)
        score = scoring.make_score(cfg) if mesh is None else shd.under_mesh(scoring.make_score(cfg), mesh)
        ids, mask = jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask)
        if mesh is not None:
            ids, mask = jax.device_put((ids, mask), shd.batch_sharding(mesh))
        out[packing] = np.asarray(score(graphdef, params, ids, mask, m, 0.6))
    assert out[13].shape == out[0].shape == (16, m)
    np.testing.assert_allclose(out[13][real], out[0][real], atol=1e-5, rtol=0)
    assert np.abs(out[0][real]).min() > 1e-3  # real log-probs, not zeros
