"""Packed rows (several rollouts per row, segment ids): the packed forward equals each sequence's
own forward, the host packer's plans, and the packed train step equals the unpacked one."""

from __future__ import annotations

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
