"""attention(): every kernel path this machine can run equals the chunked reference.

References: a float64 numpy softmax written here, and jax.nn.dot_product_attention
(implementation="xla") with an explicit boolean mask. splash runs in Pallas interpret mode;
the cuDNN path's roll / lengths run through jax.nn's xla implementation (no GPU here, so the
cuDNN kernel itself is not exercised).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scope_jax.models import attention as attn
from scope_jax.models.attention import attend, attention, cudnn_attention, splash_attention

B, T, N, K, D = 3, 40, 4, 2, 16  # T not a multiple of splash's 128-lane blocks


def _inputs(seed=0, t=T):
    r = np.random.RandomState(seed)
    q, k, v = (jnp.asarray(r.randn(B, t, h, D), jnp.float32) for h in (N, K, K))
    valid = np.ones((B, t), bool)
    valid[1, :7] = False  # left padding
    valid[2, :3] = False  # left and right padding: one span in the middle
    valid[2, t - 5:] = False
    return q, k, v, jnp.asarray(valid)


def _numpy_reference(q, k, v, valid, scale):
    """float64 causal GQA softmax attention; [B, T, N * D]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("btnd,bsnd->bnts", q, k) * scale
    t = q.shape[1]
    allowed = np.tril(np.ones((t, t), bool))[None] & np.asarray(valid)[:, None, :]
    s = np.where(allowed[:, None], s, -1e30)  # padded query rows: uniform, ignored
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnd->btnd", p, v).reshape(q.shape[0], t, -1)


def _real(x, valid):
    return np.asarray(x)[np.asarray(valid)]


@pytest.fixture(scope="module")
def data():
    q, k, v, valid = _inputs()
    scale = D ** -0.5
    return q, k, v, valid, scale, _numpy_reference(q, k, v, valid, scale)


def test_reference_and_jax_nn_match_numpy(data):
    q, k, v, valid, scale, ref = data
    slots = jnp.arange(T, dtype=jnp.int32)
    for chunk in (None, 16):  # 16 does not divide 40
        out = attend(q, k, v, slots, valid, scale, chunk)
        np.testing.assert_allclose(_real(out, valid), _real(ref, valid), atol=1e-5, rtol=0)
    mask = jnp.tril(jnp.ones((T, T), bool))[None, None] & valid[:, None, None, :]
    nn = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")
    np.testing.assert_allclose(_real(nn.reshape(B, T, -1), valid), _real(ref, valid), atol=1e-5,
                               rtol=0)


def test_auto_on_cpu_is_the_reference(data):
    q, k, v, valid, scale, _ = data
    slots = jnp.arange(T, dtype=jnp.int32)
    assert jax.default_backend() == "cpu"
    np.testing.assert_array_equal(np.asarray(attention(q, k, v, slots, valid, scale, chunk=16)),
                                  np.asarray(attend(q, k, v, slots, valid, scale, 16)))


@pytest.mark.parametrize("kernel", ["splash", "cudnn_roll"])
def test_kernel_matches_reference_on_real_positions(data, kernel):
    q, k, v, valid, scale, ref = data
    if kernel == "splash":
        out = splash_attention(q, k, v, valid, scale, interpret=True)
    else:
        out = cudnn_attention(q, k, v, valid, scale, implementation="xla")
    assert out.shape == (B, T, N * D) and out.dtype == v.dtype
    np.testing.assert_allclose(_real(out, valid), _real(ref, valid), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel", ["splash", "cudnn_roll"])
def test_kernel_gradients_match_reference(data, kernel):
    """Gradients of a loss over real positions only (as the trainer's masked losses)."""
    q, k, v, valid, scale, _ = data
    w = jnp.asarray(np.random.RandomState(1).randn(B, T, N * D), jnp.float32)
    w = w * valid[:, :, None]
    slots = jnp.arange(T, dtype=jnp.int32)
    if kernel == "splash":
        fn = lambda q, k, v: splash_attention(q, k, v, valid, scale, interpret=True)
    else:
        fn = lambda q, k, v: cudnn_attention(q, k, v, valid, scale, implementation="xla")
    grads = jax.grad(lambda *a: (fn(*a) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(lambda *a: (attend(*a, slots, valid, scale) * w).sum(), argnums=(0, 1, 2))(
        q, k, v)
    for name, g, r in zip("qkv", grads, ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, rtol=0, err_msg=name)


def test_splash_longer_than_one_block_in_bfloat16():
    """T = 300 spans three 128-blocks (block capped and padded); bf16 inputs."""
    q, k, v, valid = _inputs(seed=2, t=300)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    scale = D ** -0.5
    out = splash_attention(q, k, v, valid, scale, block=128, interpret=True)
    assert out.dtype == jnp.bfloat16
    ref = _numpy_reference(q, k, v, valid, scale)
    np.testing.assert_allclose(_real(out.astype(jnp.float32), valid), _real(ref, valid),
                               atol=3e-2, rtol=0)


def test_cudnn_path_poisons_non_contiguous_rows(data):
    """A row with a hole in its valid keys cannot be expressed as cuDNN lengths: NaN, loudly."""
    q, k, v, valid, scale, ref = data
    holed = np.asarray(valid).copy()
    holed[0, 10:12] = False
    out = np.asarray(cudnn_attention(q, k, v, jnp.asarray(holed), scale, implementation="xla"))
    assert np.isnan(out[0]).all() and not np.isnan(out[1:]).any()
    empty = np.asarray(valid).copy()
    empty[1] = False  # an all-padding row stays finite (length 1 internally)
    out = np.asarray(cudnn_attention(q, k, v, jnp.asarray(empty), scale, implementation="xla"))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(_real(out, empty), _real(ref, empty), atol=1e-5, rtol=0)


def test_kernels_refuse_attention_over_a_cache(data):
    q, k, v, valid, scale, _ = data
    slots = jnp.arange(T, dtype=jnp.int32) + 4
    kc = jnp.pad(k, ((0, 0), (4, 0), (0, 0), (0, 0)))
    vc = jnp.pad(v, ((0, 0), (4, 0), (0, 0), (0, 0)))
    valid_c = jnp.pad(valid, ((0, 0), (4, 0)))
    for impl in ("splash", "cudnn"):
        with pytest.raises(ValueError, match="self-attention only"):
            attention(q, kc, vc, slots, valid_c, scale, implementation=impl)
    with pytest.raises(ValueError, match="'flash' is not one of"):
        attention(q, k, v, slots, valid, scale, implementation="flash")


def test_default_implementation_logs_kernel_picks(caplog, monkeypatch):
    monkeypatch.setattr(attn, "_logged", set())
    with caplog.at_level(logging.WARNING, logger="scope_jax.models.attention"):
        assert attn.default_implementation("cpu", jnp.float32, True) == "xla"
        assert attn.default_implementation("tpu", jnp.bfloat16, False) == "xla"  # a cache
        assert not caplog.records
        assert attn.default_implementation("tpu", jnp.bfloat16, True) == "splash"
        assert attn.default_implementation("gpu", jnp.float32, True) == "xla"  # cuDNN: 16-bit
        assert attn.default_implementation("gpu", jnp.bfloat16, True) == "cudnn"
        assert attn.default_implementation("gpu", jnp.bfloat16, True) == "cudnn"  # logged once
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "'splash'" in messages[0] and "interpret mode" in messages[0]
    assert "'cudnn'" in messages[1] and "not run" in messages[1]


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_kernels_run_per_shard_under_a_mesh(kv_heads):
    """Under jax.set_mesh the kernels run in shard_map: rows over ('data', 'fsdp'), heads over
    'tensor' when query and kv heads both split (kv_heads=2), else heads gathered (MQA)."""
    from scope_jax.sharding import constrain, make_mesh

    b = 4
    r = np.random.RandomState(3)
    q = jnp.asarray(r.randn(b, T, N, D), jnp.float32)
    k, v = (jnp.asarray(r.randn(b, T, kv_heads, D), jnp.float32) for _ in range(2))
    valid = np.ones((b, T), bool)
    valid[1, :9] = False
    valid[3, 30:] = False
    valid = jnp.asarray(valid)
    scale = D ** -0.5
    ref = _numpy_reference(q, k, v, valid, scale)
    kernels = {"splash": lambda *a: splash_attention(*a, scale, interpret=True),
               "cudnn_roll": lambda *a: cudnn_attention(*a, scale, implementation="xla")}
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    for name, kernel in kernels.items():
        def fn(q, k, v, m):  # activations sharded as the model's attention sees them
            q = constrain(q, ("batch", "length", "act_heads", "head_dim"))
            k, v = (constrain(x, ("batch", "length", "act_kv_heads", "head_dim")) for x in (k, v))
            return constrain(attn.per_shard(kernel, q, k, v, m), ("batch", "length", "act_heads"))

        fn = jax.jit(fn)
        with jax.set_mesh(mesh):
            out = fn(q, k, v, valid)
            hlo = fn.lower(q, k, v, valid).compile().as_text()
        np.testing.assert_allclose(_real(out, valid), _real(ref, valid), atol=1e-5, rtol=0,
                                   err_msg=name)
        assert ("all-gather" in hlo) == (kv_heads == 1), name  # MQA gathers the query heads


def _packed_inputs(seed=4, t=T):
    """Two rows of packed sequences: segment ids [B, T] (0 = trailing padding)."""
    q, k, v, _ = _inputs(seed, t)
    lengths = [[11, 20, 5], [t], [3, 1, 25]]  # a row with one, with 3 and a 1-token segment
    seg = np.zeros((B, t), np.int32)
    for row, ls in enumerate(lengths):
        seg[row, :sum(ls)] = np.repeat(np.arange(1, len(ls) + 1), ls)
    return q, k, v, jnp.asarray(seg)


def _per_segment_reference(q, k, v, seg, scale):
    """Each segment attended alone (the float64 reference on its slice); NaN at padding."""
    out = np.full((q.shape[0], q.shape[1], q.shape[2] * q.shape[3]), np.nan)
    seg = np.asarray(seg)
    for b in range(seg.shape[0]):
        for s in set(seg[b]) - {0}:
            at = np.flatnonzero(seg[b] == s)
            part = lambda x: np.asarray(x)[b:b + 1, at]
            out[b, at] = _numpy_reference(part(q), part(k), part(v), np.ones((1, len(at)), bool),
                                          scale)[0]
    return out


@pytest.mark.parametrize("kernel", ["xla", "xla_chunked", "splash"])
def test_packed_segments_attend_only_within_themselves(kernel):
    q, k, v, seg = _packed_inputs()
    scale = D ** -0.5
    ref = _per_segment_reference(q, k, v, seg, scale)
    slots = jnp.arange(T, dtype=jnp.int32)
    if kernel == "splash":
        out = splash_attention(q, k, v, seg, scale, interpret=True)
    else:
        out = attention(q, k, v, slots, seg, scale, chunk=16 if kernel == "xla_chunked" else None,
                        implementation="xla")
    real = np.asarray(seg) > 0
    np.testing.assert_allclose(np.asarray(out)[real], ref[real], atol=1e-5, rtol=0)
    # and not what one sequence per row would give (the test can fail)
    mixed = np.asarray(attend(q, k, v, slots, seg > 0, scale))
    assert np.abs(mixed[real] - ref[real]).max() > 1e-2


def test_cudnn_refuses_packed_rows_and_auto_picks_xla_for_them(monkeypatch):
    q, k, v, seg = _packed_inputs()
    with pytest.raises(ValueError, match="'cudnn' cannot run packed rows"):
        attention(q, k, v, jnp.arange(T, dtype=jnp.int32), seg, D ** -0.5, implementation="cudnn")
    monkeypatch.setattr(attn, "_logged", set())
    assert attn.default_implementation("gpu", jnp.bfloat16, True, packed=True) == "xla"
    assert attn.default_implementation("tpu", jnp.bfloat16, True, packed=True) == "splash"


# ---------------------------------------------------------------------------------------------
# paged_attention / write_kv
# ---------------------------------------------------------------------------------------------

from scope_jax.models.attention import paged_attention, paged_attention_xla, write_kv  # noqa: E402


def _paged_batch(q_lens, kv_lens, *, heads=(4, 2), d=16, page_size=8, num_pages=24, slots=None,
                 num_tokens=None, dtype=jnp.float32, seed=0):
    """A random ragged batch over a randomly assigned page pool.

    Sequence s has q_lens[s] queries at its last positions of kv_lens[s] tokens. Every
    sequence's dense K / V [kv_len, Hkv, D] are drawn first and copied into randomly chosen
    pages of a pool full of noise (stale data); page_indices entries past a sequence's pages
    point at other sequences' pages. Slots past len(q_lens) and query rows past sum(q_lens)
    hold garbage. Returns (args for paged_attention, dense (q, k, v) per sequence, live rows).
    """
    r = np.random.RandomState(seed)
    hq, hkv = heads
    n = len(q_lens)
    slots = slots or n
    rnd = lambda *shape: np.array(jnp.asarray(r.randn(*shape), dtype).astype(jnp.float32))
    pages_per_seq = max(-(-kv // page_size) for kv in kv_lens)
    order = r.permutation(num_pages)
    pool = rnd(num_pages, page_size, 2 * hkv, d)
    table = r.randint(0, num_pages, (slots, pages_per_seq))
    cu = np.concatenate([[0], np.cumsum(q_lens)])
    t = num_tokens or int(cu[-1])
    queries = rnd(t, hq, d)
    dense, used = [], 0
    for s, (ql, kv) in enumerate(zip(q_lens, kv_lens)):
        k, v = rnd(kv, hkv, d), rnd(kv, hkv, d)
        mine = order[used:used + -(-kv // page_size)]
        used += len(mine)
        table[s, :len(mine)] = mine
        for i in range(kv):
            pool[mine[i // page_size], i % page_size, 0::2] = k[i]
            pool[mine[i // page_size], i % page_size, 1::2] = v[i]
        dense.append((queries[cu[s]:cu[s + 1]], k, v))
    assert used <= num_pages
    lens = np.concatenate([kv_lens, r.randint(0, 999, slots - n)])  # dead slots: garbage
    cu_full = np.concatenate([cu, r.randint(0, t + 1, slots - n)])
    args = (jnp.asarray(queries, dtype), jnp.asarray(pool, dtype), jnp.asarray(lens, jnp.int32),
            jnp.asarray(table, jnp.int32), jnp.asarray(cu_full, jnp.int32),
            jnp.asarray([n], jnp.int32))
    return args, dense, int(cu[-1])


def _paged_numpy_reference(dense, hq, scale):
    """float64 dense causal attention of each sequence's queries over its tokens in order."""
    outs = []
    for q, k, v in dense:
        ql, kv, hkv = q.shape[0], k.shape[0], k.shape[1]
        k, v = (np.repeat(np.asarray(x, np.float64), hq // hkv, axis=1) for x in (k, v))
        s = np.einsum("qhd,khd->hqk", np.asarray(q, np.float64), k) * scale
        pos = kv - ql + np.arange(ql)
        s = np.where(np.arange(kv)[None, None, :] <= pos[None, :, None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        outs.append(np.einsum("hqk,khd->qhd", p, v))
    return np.concatenate(outs)


# prefill from scratch, a prefill chunk continuing a sequence, decodes (one at a page boundary,
# one exactly filling its pages), a 1-token prefill; two dead slots and 3 padding query rows
MIXED = dict(q_lens=[13, 7, 1, 1, 1], kv_lens=[13, 45, 17, 16, 1], slots=7, num_tokens=26)
DECODE = dict(q_lens=[1] * 6, kv_lens=[5, 16, 17, 40, 1, 23], slots=8, num_tokens=8)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", ["mixed", "decode"])
@pytest.mark.parametrize("heads", [(4, 2), (6, 1)])
@pytest.mark.parametrize("page_size", [8, 32])  # 1 page a block: 4 pages / 1 page
@pytest.mark.parametrize("block_bytes", [None, 1])  # all pages in one block / the least
def test_paged_xla_matches_numpy_per_sequence(dtype, case, heads, page_size, block_bytes):
    batch = dict(MIXED if case == "mixed" else DECODE, heads=heads, dtype=dtype,
                 page_size=page_size)
    args, dense, live = _paged_batch(**batch)
    scale = 16 ** -0.5
    out = jax.jit(functools.partial(paged_attention_xla, sm_scale=scale,
                                    block_bytes=block_bytes))(*args)
    assert out.shape == args[0].shape and out.dtype == dtype
    out = np.asarray(out.astype(jnp.float32))
    ref = _paged_numpy_reference(dense, heads[0], scale)
    np.testing.assert_allclose(out[:live], ref, atol=TOL[dtype], rtol=0)
    np.testing.assert_array_equal(out[live:], 0)  # padding rows


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_paged_xla_matches_jax_ref_ragged_paged_attention(dtype):
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention

    args, _, live = _paged_batch(**MIXED, heads=(4, 2), dtype=dtype, seed=1)
    ref = ref_ragged_paged_attention(*args, sm_scale=0.3)  # its live rows only
    out = paged_attention(*args, sm_scale=0.3, implementation="xla")
    np.testing.assert_allclose(np.asarray(out[:live], np.float32), np.asarray(ref, np.float32),
                               atol=TOL[dtype], rtol=0)


def test_paged_xla_ignores_unread_page_indices_and_dead_slots():
    """Entries past a sequence's pages (here out of range, and 3 more columns than any sequence
    needs, as a caller's bucket) and dead slots change nothing, whatever the block size."""
    args, dense, live = _paged_batch(**MIXED, seed=2)
    q, pool, lens, table, cu, n = args
    out = paged_attention_xla(*args, sm_scale=0.25)
    table = np.pad(np.asarray(table), ((0, 0), (0, 3)))
    for s, kv in enumerate(MIXED["kv_lens"]):
        table[s, -(-kv // 8):] = [-7, 10 ** 6][s % 2]
    table[len(MIXED["q_lens"]):] = 10 ** 6
    for block_bytes in (None, 1, 5 * 26 * 8 * 4 * 16 * 4):  # 9 pages: 1 block; 4; 5 a block
        out2 = paged_attention_xla(q, pool, lens, jnp.asarray(table), cu, n, sm_scale=0.25,
                                   block_bytes=block_bytes)
        np.testing.assert_allclose(np.asarray(out), np.asarray(out2), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(out[:live]), _paged_numpy_reference(dense, 4, 0.25),
                               atol=1e-5, rtol=0)


def test_paged_attention_refuses_bad_layouts():
    args, _, _ = _paged_batch(**DECODE)
    q, pool, lens, table, cu, n = args
    with pytest.raises(ValueError, match="cu_q_lens must have shape"):
        paged_attention(q, pool, lens, table, cu[:-1], n, sm_scale=1.0)
    with pytest.raises(ValueError, match="kv_lens must be int32"):
        paged_attention(q, pool, lens.astype(jnp.int16), table, cu, n, sm_scale=1.0)
    with pytest.raises(ValueError, match="not a multiple of"):
        paged_attention(q[:, :3], pool, lens, table, cu, n, sm_scale=1.0)
    with pytest.raises(ValueError, match="'flash' is not one of"):
        paged_attention(*args, sm_scale=1.0, implementation="flash")


def _write_kv_numpy(pool, k, v, slots):
    pool = np.array(pool)
    ps = pool.shape[1]
    for t, s in enumerate(np.asarray(slots)):
        if 0 <= s < pool.shape[0] * ps:
            pool[s // ps, s % ps, 0::2] = k[t]
            pool[s // ps, s % ps, 1::2] = v[t]
    return pool


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_write_kv_matches_numpy(dtype):
    r = np.random.RandomState(5)
    p, ps, hkv, d, t = 6, 4, 2, 8, 11
    pool = jnp.asarray(r.randn(p, ps, 2 * hkv, d), dtype)
    k, v = (jnp.asarray(r.randn(t, hkv, d), jnp.float32) for _ in range(2))
    slots = r.permutation(p * ps)[:t].astype(np.int32)
    slots[[2, 7]] = [-1, -5]  # padding tokens: dropped, never wrapped to the pool's end
    slots[9] = p * ps - 1  # the very last slot
    ref = _write_kv_numpy(np.asarray(pool.astype(jnp.float32)),
                          np.asarray(k.astype(dtype).astype(jnp.float32)),
                          np.asarray(v.astype(dtype).astype(jnp.float32)), slots)
    fn = jax.jit(write_kv, donate_argnums=0)
    hlo = fn.lower(pool, k, v, jnp.asarray(slots)).compile().as_text()
    assert hlo.count("scatter(") == 1 and "input_output_alias" in hlo  # one in-place scatter
    out = fn(pool, k, v, jnp.asarray(slots))
    assert out.dtype == dtype and out.shape == (p, ps, 2 * hkv, d)
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), ref)
    with pytest.raises(ValueError, match="write_kv: k and v must both be"):
        write_kv(out, k[:, :1], v[:, :1], jnp.asarray(slots))


def test_write_kv_then_paged_attention_is_dense_attention():
    """Prefill a 2-sequence batch through write_kv, then one decode step each."""
    r = np.random.RandomState(6)
    hq, hkv, d, ps = 4, 2, 8, 4
    pool = jnp.zeros((10, ps, 2 * hkv, d), jnp.float32)
    lens, table = [6, 9], np.array([[7, 2, 0], [4, 9, 1]], np.int32)
    ks, vs, qs = ([r.randn(n, h, d).astype(np.float32) for n in lens] for h in (hkv, hkv, hq))
    slot = lambda s, i: table[s, i // ps] * ps + i % ps
    slots = np.array([slot(s, i) for s in range(2) for i in range(lens[s])] + [-1], np.int32)
    cat = lambda xs, h: jnp.asarray(np.concatenate(xs + [np.zeros((1, h, d), np.float32)]))
    pool = write_kv(pool, cat(ks, hkv), cat(vs, hkv), jnp.asarray(slots))
    common = (jnp.asarray(table), jnp.asarray([0, 6, 15], jnp.int32), jnp.asarray([2], jnp.int32))
    out = paged_attention(cat(qs, hq), pool, jnp.asarray(lens, jnp.int32), common[0], common[1],
                          common[2], sm_scale=0.4)
    ref = _paged_numpy_reference(list(zip(qs, ks, vs)), hq, 0.4)
    np.testing.assert_allclose(np.asarray(out[:15]), ref, atol=1e-5, rtol=0)


GPU_CASES = [  # (dtype, heads, num_pages): the pool either larger than the table (its pages
    # are gathered) or not (the whole pool is transposed); a GQA group of 6 (Qwen2-1.5B's)
    (jnp.float32, (4, 2), 24), (jnp.float32, (6, 1), 64), (jnp.bfloat16, (6, 1), 64)]


@pytest.mark.parametrize("dtype,heads,num_pages", GPU_CASES)
def test_pallas_gpu_decode_in_interpret_mode_matches_reference(dtype, heads, num_pages):
    args, dense, live = _paged_batch(**DECODE, heads=heads, dtype=dtype, num_pages=num_pages,
                                     seed=7)
    scale = 16 ** -0.5
    out = attn.paged_attention_pallas_gpu(*args, sm_scale=scale, interpret=True)
    assert out.shape == args[0].shape and out.dtype == dtype
    out = np.asarray(out.astype(jnp.float32))
    np.testing.assert_allclose(out[:live], _paged_numpy_reference(dense, heads[0], scale),
                               atol=TOL[dtype], rtol=0)
    np.testing.assert_array_equal(out[live:], 0)
    ref = paged_attention(*args, sm_scale=scale, implementation="xla")
    np.testing.assert_allclose(out, np.asarray(ref.astype(jnp.float32)), atol=TOL[dtype], rtol=0)


def test_pallas_gpu_refuses_what_it_cannot_serve():
    args, _, _ = _paged_batch(**MIXED)  # T = 26 rows, S = 7 slots
    with pytest.raises(ValueError, match="'pallas_gpu' serves decode only"):
        paged_attention(*args, sm_scale=1.0, implementation="pallas_gpu")
    # T == S but not one query per sequence: only the device knows; the output is NaN
    ragged = dict(q_lens=[3, 1, 1, 1], kv_lens=[9, 4, 12, 20], slots=6, num_tokens=6)
    args, dense, live = _paged_batch(**ragged, seed=8)
    out = attn.paged_attention_pallas_gpu(*args, sm_scale=0.25, interpret=True)
    assert np.isnan(np.asarray(out)).all()
    # what the default picks on a GPU for T == S: the reference for this batch ...
    out = attn.gpu_kernel_if_decode(*args, sm_scale=0.25, interpret=True)
    np.testing.assert_allclose(np.asarray(out[:live]), _paged_numpy_reference(dense, 4, 0.25),
                               atol=1e-5, rtol=0)
    # ... and the kernel for a decode batch (bitwise its output)
    args, _, _ = _paged_batch(**DECODE, seed=9)
    np.testing.assert_array_equal(
        np.asarray(attn.gpu_kernel_if_decode(*args, sm_scale=0.25, interpret=True)),
        np.asarray(attn.paged_attention_pallas_gpu(*args, sm_scale=0.25, interpret=True)))
    args, _, _ = _paged_batch(**DECODE, d=24, seed=9)
    with pytest.raises(ValueError, match="powers of two"):
        paged_attention(*args, sm_scale=1.0, implementation="pallas_gpu")


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="the compiled Pallas GPU kernel needs a GPU backend (this is "
                           f"{jax.default_backend()}); interpret mode is tested above")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_gpu_compiled_matches_reference(dtype):
    """The Triton kernel's dots on float32 inputs run in TF32 (pl.dot's default precision),
    hence the looser float32 tolerance; the reference runs at full float32 precision."""
    args, dense, live = _paged_batch(**DECODE, heads=(12, 2), d=128, page_size=16,
                                     num_pages=40, dtype=dtype, seed=10)
    scale = 128 ** -0.5
    tol = {jnp.float32: 5e-3, jnp.bfloat16: 3e-2}[dtype]
    out = paged_attention(*args, sm_scale=scale, implementation="pallas_gpu")
    auto = paged_attention(*args, sm_scale=scale)
    with jax.default_matmul_precision("highest"):
        ref = paged_attention(*args, sm_scale=scale, implementation="xla")
    for got in (out, auto):
        np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)),
                                   np.asarray(ref.astype(jnp.float32)), atol=tol, rtol=0)
    np.testing.assert_allclose(np.asarray(out[:live].astype(jnp.float32)),
                               _paged_numpy_reference(dense, 12, scale), atol=tol, rtol=0)


def test_pallas_tpu_in_interpret_mode_or_skip_with_the_error():
    """Runs jax's ragged_paged_attention in TPU interpret mode on the mixed batch; jax 0.10.2's
    interpreter cannot run that kernel, so this skips with the error until it can (any other
    error fails)."""
    args, dense, live = _paged_batch(**MIXED, d=128, seed=11)
    with pytest.raises(ValueError, match="multiple of 128"):
        attn.paged_attention_pallas_tpu(*_paged_batch(**MIXED)[0], sm_scale=0.25)
    try:
        out = attn.paged_attention_pallas_tpu(*args, sm_scale=0.25, interpret=True)
    except Exception as err:  # noqa: BLE001 - only the known interpreter gap is skipped
        if "ReshapeTransform" not in str(err):
            raise
        pytest.skip(f"Pallas TPU interpret mode cannot run ragged_paged_attention in jax "
                    f"{jax.__version__}: {str(err).strip().splitlines()[-1]}")
    np.testing.assert_allclose(np.asarray(out[:live]), _paged_numpy_reference(dense, 4, 0.25),
                               atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(out[live:]), 0)


def test_default_paged_implementation(caplog, monkeypatch):
    monkeypatch.setattr(attn, "_logged", set())
    with caplog.at_level(logging.WARNING, logger="scope_jax.models.attention"):
        assert attn.default_paged_implementation("cpu", True) == "xla"
        assert attn.default_paged_implementation("gpu", False) == "xla"  # prefill / mixed
        assert not caplog.records
        assert attn.default_paged_implementation("gpu", True) == "pallas_gpu"
        assert attn.default_paged_implementation("tpu", False) == "pallas_tpu"
        assert attn.default_paged_implementation("tpu", True) == "pallas_tpu"  # logged once
        assert attn.default_paged_implementation("tpu", True, head_dim=64) == "xla"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3 and "interpret mode on CPU" in messages[0]
    assert "NOT run" in messages[1] and "multiple of 128, not 64" in messages[2]
    args, _, _ = _paged_batch(**DECODE)
    np.testing.assert_array_equal(  # CPU: auto is the reference
        np.asarray(paged_attention(*args, sm_scale=0.5)),
        np.asarray(paged_attention(*args, sm_scale=0.5, implementation="xla")))


def test_bench_paged_runs_here_at_small_sizes(tmp_path):
    """tools/bench_paged.py (the GPU check) at its small sizes on this backend: it runs, and
    every implementation agrees with the float32 reference within bfloat16 rounding."""
    import json

    from tools import bench_paged

    out = tmp_path / "paged.json"
    result = bench_paged.main(["--sizes", "small", "--repeats", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    assert len(result["cases"]) == len(bench_paged.SIZES["small"]["cases"])
    for case in result["cases"]:
        assert len(case["impls"]) >= 2
        for name, r in case["impls"].items():
            assert r["max_abs_err_vs_f32"] < 2e-2, (case["page_size"], name)
            assert r["median_ms"] > 0


@pytest.mark.parametrize("heads,d,page_size,num_seqs,pages_per_seq,num_pages", [
    ((12, 2), 128, 16, 256, 768, 100_000),  # Qwen2-1.5B heads, 12k kv: the pool transposed
    ((12, 2), 128, 64, 32, 192, 8_000),  # the table's pages gathered
    ((4, 2), 16, 16, 32, 5, 200),  # the tiny test model's heads; 5 pages padded to 8
])
def test_pallas_gpu_lowers_for_cuda(heads, d, page_size, num_seqs, pages_per_seq, num_pages):
    """The Triton lowering runs in Python, so its shape rules (every load a power of two) are
    checked here without a GPU; compiling to PTX and running need one."""
    shape = jax.ShapeDtypeStruct
    i32 = jnp.int32
    args = (shape((num_seqs, heads[0], d), jnp.bfloat16),
            shape((num_pages, page_size, 2 * heads[1], d), jnp.bfloat16),
            shape((num_seqs,), i32), shape((num_seqs, pages_per_seq), i32),
            shape((num_seqs + 1,), i32), shape((1,), i32))
    for fn in (attn.paged_attention_pallas_gpu, attn.gpu_kernel_if_decode):
        lowered = jax.jit(functools.partial(fn, sm_scale=d ** -0.5)).trace(*args).lower(
            lowering_platforms=("cuda",))
        assert "triton" in lowered.as_text()
    with pytest.raises(ValueError, match="power of 2"):  # the check can fail
        jax.jit(functools.partial(attn.paged_attention_pallas_gpu, sm_scale=1.0,
                                  pages_per_compute_block=3)).trace(*args).lower(
            lowering_platforms=("cuda",))


# ---------------------------------------------------------------------------------------------
# attend_decode with a context of chunks (the continuous engine's "gather" decode on CPU)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [4, 16, "per_row"])
def test_attend_decode_with_a_chunked_context_is_attention_over_both(chunk):
    """Rows attend over their own context chunks (ragged: several chunks, a partial last one,
    none) and their slots; a float64 numpy softmax over each row's keys in any order is the
    reference. Padding chunks and the masked slots' garbage must not leak in. "per_row": one
    chunk per row, as wide as the longest context (attend_rows)."""
    from scope_jax.models.attention import attend_decode

    r = np.random.RandomState(0)
    b, n, kh, d, s = 4, 4, 2, 8, 6
    per_row = chunk == "per_row"
    ctx_lens = [0, 3, 9, 4]  # row 0: no context
    chunk = max(ctx_lens) + 3 if per_row else chunk
    ctx_lens = ctx_lens if per_row else [0, 3, chunk * 2 + 1, chunk]
    q_slot = 2  # slots 0..2 valid
    slots_valid = np.ones((b, s), bool)
    slots_valid[1, 1] = False  # one masked slot
    q = r.randn(b, 1, n, d).astype(np.float32)
    k_t = r.randn(kh, b, d, s).astype(np.float32)
    v_t = r.randn(kh, b, d, s).astype(np.float32)
    ctx = [(r.randn(ln, kh, d).astype(np.float32), r.randn(ln, kh, d).astype(np.float32))
           for ln in ctx_lens]
    ck, cv, row, length = [], [], [], []
    for i in (range(b) if per_row else (3, 1, 2)):  # chunks: rows out of order
        k, v = ctx[i]
        for start in range(0, max(len(k), per_row), chunk):  # per row: row 0's empty one too
            pad = lambda x: np.concatenate(  # garbage after the valid tokens
                [x[start:start + chunk], r.randn(chunk - len(x[start:start + chunk]), kh, d)
                 .astype(np.float32) * 50])
            ck.append(pad(k))
            cv.append(pad(v))
            row.append(i)
            length.append(len(k[start:start + chunk]))
    for _ in range(0 if per_row else 3):  # padding chunks: garbage, no row
        ck.append(r.randn(chunk, kh, d).astype(np.float32) * 50)
        cv.append(r.randn(chunk, kh, d).astype(np.float32) * 50)
        row.append(b + 7)
        length.append(chunk)
    layout = lambda xs: jnp.asarray(np.stack(xs).transpose(2, 0, 3, 1))  # [K, C, D, L]
    context = (layout(ck), layout(cv), None if per_row else jnp.asarray(row, jnp.int32),
               jnp.asarray(length, jnp.int32))
    out = jax.jit(attend_decode, static_argnums=5)(
        jnp.asarray(q), jnp.asarray(k_t), jnp.asarray(v_t), jnp.asarray([q_slot], jnp.int32),
        jnp.asarray(slots_valid), 0.3, context)
    g = n // kh
    for i in range(b):
        valid = slots_valid[i] & (np.arange(s) <= q_slot)
        keys = np.concatenate([ctx[i][0], k_t[:, i].transpose(2, 0, 1)[valid]]).astype(np.float64)
        vals = np.concatenate([ctx[i][1], v_t[:, i].transpose(2, 0, 1)[valid]]).astype(np.float64)
        for h in range(n):
            sc = keys[:, h // g] @ q[i, 0, h].astype(np.float64) * 0.3
            p = np.exp(sc - sc.max())
            want = (p / p.sum()) @ vals[:, h // g]
            np.testing.assert_allclose(np.asarray(out)[i, 0, h * d:(h + 1) * d], want,
                                       rtol=1e-5, atol=1e-5)
