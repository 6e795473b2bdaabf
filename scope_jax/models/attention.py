"""Causal grouped-query attention: one entry point, a kernel per backend.

    out = attention(q, k, v, q_slot, kv_valid, scale)            # [B, T, N * D]

kv_valid is bool [B, S] (False at padding), or, for packed rows (several sequences per row),
int32 segment ids [B, S] with 0 at padding: a query then sees only the keys of its own
segment (segments_allowed). Packed rows run on "xla" and "splash"; "cudnn" refuses them.

Implementations (``implementation=``):
  "xla":    attend(), pure JAX with optional query chunking. The reference; runs everywhere.
  "splash": jax.experimental.pallas.ops.tpu.splash_attention (TPU flash attention), causal
            mask plus segment ids (kv_valid's, or 1 / 0 from a bool kv_valid). Tested here only in Pallas interpret
            mode on CPU (tests/test_attention.py), never compiled for a TPU by this project's
            tests: head_dim and block-size limits of the Mosaic compiler are not checked.
  "cudnn":  jax.nn.dot_product_attention(implementation="cudnn") (GPU flash attention). Each
            row's valid keys are rolled to the front so cuDNN's padding-causal mask with
            per-row lengths expresses left / right padding. The roll and lengths are tested on
            CPU through jax.nn.dot_product_attention(implementation="xla"); the cuDNN kernel
            itself has NOT been run by this project (no GPU here).

implementation=None picks by jax.default_backend(): splash on TPU, cudnn on GPU for bf16 /
fp16 inputs (xla for packed rows, which cuDNN's padding masks cannot express), else xla;
attention over a KV cache (S != T) always uses xla. A pick other than
xla is logged once per process with a warning saying what it was tested on.

Paged attention (the continuous-batching engine's cache; issue 20):

    kv_pages = write_kv(kv_pages, k, v, slots)                    # [P, page_size, 2 * Hkv, D]
    out = paged_attention(queries, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                          sm_scale=scale)                         # [T, Hq, D]

queries are ragged (sequence s owns rows cu_q_lens[s]:cu_q_lens[s + 1]: prefill chunks and
decodes mixed in one call); the pool interleaves K and V heads (combined head 2h = K head h,
2h + 1 = V head h), the layout of JAX's Pallas TPU ragged_paged_attention, so the TPU kernel
reads the pool as it is. Implementations:
  "xla":        paged_attention_xla, pure JAX: each query reads its own sequence's pages a
                block at a time with an online softmax (no T x all-kv product, nothing of
                size T x pages_per_seq); the reference and the CPU path. Tested against a
                float64 numpy re-derivation and JAX's ref_ragged_paged_attention.
  "pallas_tpu": jax.experimental.pallas.ops.tpu.ragged_paged_attention (head_dim a multiple of
                128). NOT run by this project: jax 0.10.2's Pallas interpret modes cannot run
                it on CPU (the test skips with the error), and lowering for TPU needs a TPU.
  "pallas_gpu": jax.experimental.pallas.ops.gpu.paged_attention (Triton), decode only (T == S;
                else ValueError): K / V are copied into its [Hkv, pages, page_size, D] layout
                first (gpu_page_layout), q is pre-scaled. Tested in Pallas interpret mode on
                CPU; compiled on a GPU by the GPU-only test and tools/bench_paged.py.
implementation=None: pallas_tpu on TPU, pallas_gpu on GPU when T == S and the batch is decode
on device (lax.cond, else xla), else xla (default_paged_implementation).

tokamax (0.0.12, the newest the package index here serves) was read and not used: its TPU kernel is a vendored copy of the
same splash kernel, its GPU path for cuDNN is the same jax.nn call, and it needs qwix,
jaxtyping, einshape and typeguard==2.13.3; its Triton / Mosaic-GPU kernels could not be tested
without a GPU.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from scope_jax.sharding import logical_to_spec

IMPLEMENTATIONS = ("xla", "splash", "cudnn")

_log = logging.getLogger(__name__)
_logged: set[tuple[str, str]] = set()


def is_packed(kv_valid: jax.Array) -> bool:
    """Whether kv_valid holds segment ids (packed rows) rather than a bool padding mask."""
    return not jnp.issubdtype(kv_valid.dtype, jnp.bool_)


def segments_allowed(q_slot: jax.Array, kv_valid: jax.Array) -> jax.Array:
    """bool [B, T, S]: query t may attend key slot s.

    Always s <= q_slot[t] (causal). With a bool kv_valid [B, S], also kv_valid[b, s]. With
    segment ids [B, S] (0 = padding), also segment[b, s] == segment[b, q_slot[t]] != 0: the
    sequences packed in one row never see each other, and a padding query sees nothing.
    """
    s = kv_valid.shape[1]
    causal = (jnp.arange(s, dtype=jnp.int32)[None, :] <= q_slot[:, None])[None]
    if not is_packed(kv_valid):
        return causal & kv_valid[:, None, :]
    # q_slot may be -1 (attend's padded chunk queries): clipped, those rows are causal-empty
    q_segment = jnp.take(kv_valid, jnp.clip(q_slot, 0, s - 1), axis=1)  # [B, T]
    return causal & (kv_valid[:, None, :] == q_segment[:, :, None]) & (kv_valid[:, None, :] != 0)


def _attend_block(q, k, v, q_slot, kv_valid, scale):
    """attend() for one block of queries; see attend for shapes."""
    b, t, n, d = q.shape
    kh = k.shape[2]
    q = q.reshape(b, t, kh, n // kh, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    mask = segments_allowed(q_slot, kv_valid)  # [B, T, S]
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, n * d)


def attend_decode(q: jax.Array, k_t: jax.Array, v_t: jax.Array, q_slot: jax.Array,
                  kv_valid: jax.Array, scale: float, context=None) -> jax.Array:
    """attend() for T new queries against a DecodeCache layer's own layout.

    Args:
      q: [B, T, N, D]; k_t, v_t: [K, B, D, S] (keys and values transposed).
      q_slot, kv_valid, scale: as in attend.
      context: None, or chunks of keys every query of a row also attends to, before the S
        slots: (k, v [K, C, D, L] (C chunks of L tokens), row int32 [C] the batch row each
        chunk belongs to (>= B: padding, read by no row), length int32 [C] the chunk's valid
        tokens from its start). See attend_pages. row None: one chunk per row (C == B, chunk
        b is row b's context; attend_rows).
    Returns:
      [B, T, N * D] in v_t's dtype, the same attention as attend.

    The T queries and the G = N // K heads sharing a kv head are folded into one row axis, so
    both products are plain batched matmuls over (K, B) in the operands' stored layouts
    ([G*T, D] @ [D, S] and [D, S] @ [S, G*T]): XLA's CPU dot then reads the cache in place,
    where attend's einsums made it copy each layer's K and V into another order every step.
    (Values stored [K, B, S, D] with probs @ v measured the same; one layout serves both.)
    """
    b, t, n, d = q.shape
    kh = k_t.shape[0]
    g = n // kh
    rows = q.reshape(b, t, kh, g, d).transpose(2, 0, 3, 1, 4).reshape(kh, b, g * t, d)
    scores = jnp.matmul(rows, k_t, preferred_element_type=jnp.float32) * scale  # [K,B,G*T,S]
    mask = (jnp.arange(k_t.shape[3], dtype=jnp.int32)[None, :] <= q_slot[:, None])[None]
    mask = jnp.tile(mask & kv_valid[:, None, :], (1, g, 1))  # [B, G*T, S], rows (g, t)
    scores = jnp.where(mask[None], scores, jnp.finfo(jnp.float32).min)
    if context is None:
        probs = jax.nn.softmax(scores, axis=-1).astype(v_t.dtype)
        out = jnp.matmul(v_t, probs.swapaxes(-1, -2))  # [K, B, D, G*T]
    elif context[2] is None:  # one context chunk per row
        out = attend_rows(rows, scores, v_t, context[0], context[1], context[3], scale)
    else:
        out = attend_pages(rows, scores, v_t, *context, scale)
    return out.reshape(kh, b, d, g, t).transpose(1, 4, 0, 3, 2).reshape(b, t, n * d)


def _chunk_scores(q: jax.Array, k: jax.Array, length: jax.Array, scale: float) -> jax.Array:
    """Scaled float32 scores of queries q [K, C, Q, D] against chunks of keys k [K, C, D, L],
    the keys past each chunk's length int32 [C] masked to the float32 minimum: [K, C, Q, L]."""
    s = jnp.matmul(q, k.astype(q.dtype), preferred_element_type=jnp.float32) * scale
    valid = jnp.arange(k.shape[-1], dtype=jnp.int32)[None, :] < length[:, None]  # [C, L]
    return jnp.where(valid[None, :, None, :], s, jnp.finfo(jnp.float32).min)


def attend_rows(rows: jax.Array, scores: jax.Array, v_t: jax.Array, ctx_k: jax.Array,
                ctx_v: jax.Array, ctx_len: jax.Array, scale: float) -> jax.Array:
    """attend_pages with exactly one chunk per row (chunk b is row b's whole context), as one
    float32 softmax over [context, slots]: no per-chunk partials to rescale and combine, so
    a handful of ops where attend_pages has about twenty (on CPU, at a small model's decode
    step, that overhead is the step's cost).

    rows [K, B, Q, D]; scores float32 [K, B, Q, S] (masked); v_t [K, B, D, S]; ctx_k, ctx_v
    [K, B, D, W]; ctx_len int32 [B]: row b's valid context tokens, from the start (0: none).
    Returns [K, B, D, Q] in v_t's dtype.
    """
    w = ctx_k.shape[-1]
    s = _chunk_scores(rows, ctx_k, ctx_len, scale)  # [K, B, Q, W]
    probs = jax.nn.softmax(jnp.concatenate([s, scores], axis=-1), axis=-1)
    out = (jnp.matmul(ctx_v.astype(jnp.float32), probs[..., :w].swapaxes(-1, -2))
           + jnp.matmul(v_t.astype(jnp.float32), probs[..., w:].swapaxes(-1, -2)))
    return out.astype(v_t.dtype)


def attend_pages(rows: jax.Array, scores: jax.Array, v_t: jax.Array, chunk_k: jax.Array,
                 chunk_v: jax.Array, chunk_row: jax.Array, chunk_len: jax.Array,
                 scale: float) -> jax.Array:
    """attend_decode's softmax over its slots and a ragged context of chunks, split by chunk.

    rows [K, B, Q, D] the queries (Q = G * T, attend_decode's fold); scores float32 [K, B, Q,
    S] their masked scores over the S slots of v_t [K, B, D, S]; chunk_k, chunk_v [K, C, D, L]
    (C chunks of L context tokens, transposed as a DecodeCache layer); chunk_row int32 [C];
    chunk_len int32 [C] (see attend_decode's context). Returns [K, B, D, Q] in v_t's dtype.

    Each chunk's partial softmax (its max, sum and weighted values) is computed against its
    own row's queries, then a row's partials and its slots' are combined with the usual
    rescaling (flash-decoding's split): the work follows the chunks given, C x L keys, not
    B x the longest row's, and every reduction is a matmul or a masked max (no scatter).
    """
    b = rows.shape[1]
    low = jnp.finfo(jnp.float32).min
    mine = chunk_row[None, :] == jnp.arange(b)[:, None]  # [B, C]
    own = jnp.minimum(chunk_row, b - 1)
    s = _chunk_scores(rows[:, own], chunk_k, chunk_len, scale)  # [K, C, Q, L]
    m_chunk = s.max(-1)  # [K, C, Q]
    m = jnp.maximum(scores.max(-1), jnp.where(mine[None, :, :, None], m_chunk[:, None], low).max(2))
    # each chunk rescaled to its row's max; chunks of no row (or without tokens) weigh nothing
    keep = mine.any(0) & (chunk_len > 0)
    w = jnp.where(keep[None, :, None], jnp.exp(m_chunk - m[:, own]), 0.0)  # [K, C, Q]
    p = jnp.exp(s - m_chunk[..., None])  # [K, C, Q, L]
    p_slots = jnp.exp(scores - m[..., None])  # [K, B, Q, S]
    onehot = mine.astype(jnp.float32)
    total = p_slots.sum(-1) + jnp.einsum("bc,kcq->kbq", onehot, w * p.sum(-1))
    o_chunk = jnp.matmul(chunk_v.astype(jnp.float32), p.swapaxes(-1, -2))  # [K, C, D, Q]
    out = (jnp.einsum("bc,kcdq->kbdq", onehot, w[:, :, None, :] * o_chunk)
           + jnp.matmul(v_t.astype(jnp.float32), p_slots.swapaxes(-1, -2)))
    return (out / total[:, :, None, :]).astype(v_t.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_slot: jax.Array, kv_valid: jax.Array,
           scale: float, chunk: int | None = None) -> jax.Array:
    """Causal grouped-query attention with a float32 softmax.

    Query t attends to key slot s iff s <= q_slot[t] and kv_valid[b, s] (segments_allowed).

    Args:
      q: [B, T, N, D]; k, v: [B, S, K, D] with N a multiple of K (query head h uses kv head
        h // (N // K), as transformers' repeat_kv).
      q_slot: int32 [T], the key slot each query occupies (arange(T) without a cache).
      kv_valid: bool [B, S], False at padding, or int32 segment ids [B, S] (0 = padding; see
        segments_allowed). Rows with no allowed key produce an average of all values instead
        of NaN (they are padding).
      chunk: if set and T > chunk, queries are processed ``chunk`` at a time (each chunk
        rematerialised in the backward pass), so the [B, N, T, S] scores never exist at once:
        peak memory is O(B * N * chunk * S). The result is the same exact softmax.
    Returns:
      [B, T, N * D] in v's dtype.
    """
    b, t, n, d = q.shape
    if chunk is None or t <= chunk:
        return _attend_block(q, k, v, q_slot, kv_valid, scale)
    num = -(-t // chunk)
    pad = num * chunk - t  # padded queries (slot -1) attend to nothing and are cut off below
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q_slot = jnp.pad(q_slot, (0, pad), constant_values=-1)
    qs = q.reshape(b, num, chunk, n, d).swapaxes(0, 1)
    slots = q_slot.reshape(num, chunk)
    block = jax.checkpoint(lambda a: _attend_block(a[0], k, v, a[1], kv_valid, scale))
    out = jax.lax.map(block, (qs, slots))  # [num, B, chunk, N * D]
    return out.swapaxes(0, 1).reshape(b, num * chunk, n * d)[:, :t]




def default_implementation(backend: str, dtype, self_attention: bool, packed: bool = False) -> str:
    """The kernel attention(implementation=None) uses.

    Args:
      backend: jax.default_backend() ('cpu', 'gpu', 'tpu', ...).
      dtype: the query dtype.
      self_attention: S == T (no KV cache), the only case the kernels serve.
      packed: kv_valid holds segment ids; cuDNN's padding masks cannot express them, so a GPU
        runs packed rows on xla (logged once).
    """
    if not self_attention:
        return "xla"
    if backend == "tpu":
        choice, note = "splash", "tested only in Pallas interpret mode on CPU"
    elif backend in ("gpu", "cuda") and packed:
        choice, note = "xla", "cuDNN's padding masks cannot express packed rows' segment ids"
    elif backend in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        choice, note = "cudnn", "its padding handling is tested on CPU; the cuDNN kernel was not run"
    else:
        return "xla"
    if (backend, choice) not in _logged:
        _logged.add((backend, choice))
        _log.warning("attention: backend %r -> %r kernel (%s); pass implementation='xla' for "
                     "the reference", backend, choice, note)
    return choice


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_slot: jax.Array, kv_valid: jax.Array,
              scale: float, *, chunk: int | None = None, implementation: str | None = None,
              rules=None) -> jax.Array:
    """Causal grouped-query attention through the kernel for this backend.

    Query t attends to key slot s iff s <= q_slot[t] and kv_valid[b, s] (as attend).

    Args:
      q: [B, T, N, D]; k, v: [B, S, K, D], N a multiple of K.
      q_slot: int32 [T]. The kernels ("splash", "cudnn") serve self-attention only: S == T
        and q_slot == arange(T) (every S == T use in the model has it); S != T with them is
        an error.
      kv_valid: bool [B, S], or int32 segment ids [B, S] for packed rows (see
        segments_allowed; "cudnn" refuses them). "cudnn" needs each row's valid keys to be one
        contiguous span (left and / or right padding); a row that is not gets NaN outputs,
        loudly.
      scale: logits scale (head_dim ** -0.5).
      chunk: query chunk of the "xla" implementation (see attend); ignored by the kernels.
      implementation: None (auto, see default_implementation), "xla", "splash" or "cudnn".
      rules: logical-axis rules (default scope_jax.sharding.DEFAULT_RULES); under jax.set_mesh
        the kernels run per shard (see per_shard).
    Returns:
      [B, T, N * D] in v's dtype. Outputs at padded query positions are meaningless and
      differ between implementations.
    """
    self_attention = q.shape[1] == k.shape[1]
    if implementation is None:
        implementation = default_implementation(jax.default_backend(), q.dtype, self_attention,
                                                is_packed(kv_valid))
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention: implementation {implementation!r} is not one of "
                         f"{IMPLEMENTATIONS}")
    if implementation == "cudnn" and is_packed(kv_valid):
        raise ValueError("attention: implementation 'cudnn' cannot run packed rows (segment ids "
                         "in kv_valid): its padding masks take one span per row; use 'xla' or "
                         "'splash', or turn config.packing off")
    if implementation == "xla":
        return attend(q, k, v, q_slot, kv_valid, scale, chunk)
    if not self_attention:
        raise ValueError(f"attention: implementation {implementation!r} serves self-attention "
                         f"only (S == T); got T={q.shape[1]} queries over S={k.shape[1]} keys")
    kernel = splash_attention if implementation == "splash" else cudnn_attention
    return per_shard(functools.partial(kernel, scale=scale), q, k, v, kv_valid, rules)


def per_shard(kernel, q: jax.Array, k: jax.Array, v: jax.Array, kv_valid: jax.Array,
              rules=None) -> jax.Array:
    """kernel(q, k, v, kv_valid) -> [B, T, N * D], run per device under the current mesh.

    A Pallas or cuDNN call is opaque to XLA's partitioner, so under jax.set_mesh it runs in
    shard_map: rows split like the "batch" activations and heads like "act_heads" /
    "act_kv_heads" (the rules), the sequence whole. Heads are split only when both query and
    kv heads split the same way, so each shard keeps whole GQA groups; otherwise they are
    gathered. No mesh: kernel(q, k, v, kv_valid).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q, k, v, kv_valid)
    qs = logical_to_spec(("batch", None, "act_heads", None), rules, shape=q.shape, mesh=mesh)
    ks = logical_to_spec(("batch", None, "act_kv_heads", None), rules, shape=k.shape, mesh=mesh)
    heads = qs[2] if qs[2] == ks[2] else None
    spec = PartitionSpec(qs[0], None, heads, None)  # q, k and v alike
    return jax.shard_map(kernel, in_specs=(spec, spec, spec, PartitionSpec(qs[0], None)),
                         out_specs=PartitionSpec(qs[0], None, heads), check_vma=False)(
        q, k, v, kv_valid)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_valid: jax.Array,
                     scale: float, *, block: int = 512, interpret: bool = False) -> jax.Array:
    """Causal self-attention with the Pallas TPU splash kernel (single device).

    A bool kv_valid becomes segment ids (1 real, 0 padding); packed rows' segment ids are used
    as they are: a real query sees the keys of its own segment up to it, a padding query sees
    padding keys (at least itself, so no softmax row is empty). T is
    padded to a multiple of 128 (the kernel's lane width) and the block shrunk by 128s until
    it divides that.

    Args:
      q: [B, T, N, D]; k, v: [B, T, K, D]; kv_valid: bool [B, T] or int32 segment ids [B, T];
      scale: logits scale.
      block: query / key block size (capped at the padded length).
      interpret: run the kernel in Pallas interpret mode (any backend; slow; for tests).
    Returns:
      [B, T, N * D] in v's dtype.

    Single device: attention() runs it per shard under a mesh (see per_shard).
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, t, n, d = q.shape
    lanes = 128
    padded = -(-t // lanes) * lanes
    block = min(block, padded)
    while padded % block:
        block -= lanes
    pad = ((0, 0), (0, padded - t), (0, 0), (0, 0))
    qh = jnp.pad(q * jnp.asarray(scale, q.dtype), pad).transpose(0, 2, 1, 3)  # [B, N, T', D]
    kh = jnp.pad(k, pad).transpose(0, 2, 1, 3)  # [B, K, T', D]
    vh = jnp.pad(v, pad).transpose(0, 2, 1, 3)
    segments = jnp.pad(kv_valid.astype(jnp.int32), ((0, 0), (0, padded - t)))
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    mask = sa.MultiHeadMask([sa.CausalMask((padded, padded))] * n)
    kernel = sa.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)
    out = jax.vmap(kernel)(qh, kh, vh, sa.SegmentIds(q=segments, kv=segments))
    return out.transpose(0, 2, 1, 3)[:, :t].reshape(b, t, n * d).astype(v.dtype)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_valid: jax.Array,
                    scale: float, *, implementation: str = "cudnn") -> jax.Array:
    """Causal self-attention through jax.nn.dot_product_attention's cuDNN flash kernel.

    cuDNN's padding masks take per-row lengths of a prefix, so each row's valid span
    [start, start + length) is rolled to the front, attended with is_causal and
    query / key_value_seq_lengths = length, and rolled back. Rows whose valid keys are not
    one contiguous span come out NaN (a wrong mask must not pass silently); padded query
    positions come out 0; an all-padding row is given length 1 so the kernel never sees an
    empty row.

    Args:
      q: [B, T, N, D]; k, v: [B, T, K, D]; kv_valid: bool [B, T]; scale: logits scale.
      implementation: passed to jax.nn.dot_product_attention; "xla" runs the same roll and
        lengths without cuDNN (how the tests check them on CPU).
    Returns:
      [B, T, N * D] in v's dtype.
    """
    b, t, n, d = q.shape
    pos = jnp.arange(t, dtype=jnp.int32)
    start = jnp.argmax(kv_valid, axis=1).astype(jnp.int32)  # first valid slot (0 if none)
    length = kv_valid.sum(axis=1, dtype=jnp.int32)
    span = (pos[None] >= start[:, None]) & (pos[None] < (start + length)[:, None])
    contiguous = jnp.all(span == kv_valid, axis=1)
    gather = (pos[None] + start[:, None]) % t  # rolled slot i holds original slot gather[i]
    roll = lambda x: jnp.take_along_axis(x, gather[:, :, None, None], axis=1)
    out = jax.nn.dot_product_attention(
        roll(q), roll(k), roll(v), scale=scale, is_causal=True,
        query_seq_lengths=jnp.maximum(length, 1), key_value_seq_lengths=jnp.maximum(length, 1),
        implementation=implementation)
    back = (pos[None] - start[:, None]) % t
    out = jnp.take_along_axis(out, back[:, :, None, None], axis=1)
    out = jnp.where(kv_valid[:, :, None, None], out, 0)
    out = jnp.where(contiguous[:, None, None, None], out, jnp.nan)
    return out.reshape(b, t, n * d).astype(v.dtype)


# ---------------------------------------------------------------------------------------------
# Paged attention: ragged queries over a paged KV cache (the continuous-batching engine's layout)
# ---------------------------------------------------------------------------------------------

PAGED_IMPLEMENTATIONS = ("xla", "pallas_tpu", "pallas_gpu")


def _paged_dims(queries, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs):
    """(T, Hq, D, P, page_size, Hkv, S, pages_per_seq) after checking the static layout."""
    if queries.ndim != 3:
        raise ValueError(f"paged_attention: queries must be [T, Hq, D], got {queries.shape}")
    if kv_pages.ndim != 4 or kv_pages.shape[2] % 2:
        raise ValueError(f"paged_attention: kv_pages must be [P, page_size, 2 * Hkv, D] (K and V "
                         f"heads interleaved), got {kv_pages.shape}")
    t, hq, d = queries.shape
    p, page_size, h2, dk = kv_pages.shape
    if dk != d:
        raise ValueError(f"paged_attention: queries' head_dim {d} != kv_pages' {dk}")
    if hq % (h2 // 2):
        raise ValueError(f"paged_attention: {hq} query heads are not a multiple of {h2 // 2} kv "
                         "heads")
    if page_indices.ndim != 2:
        raise ValueError(f"paged_attention: page_indices must be [S, pages_per_seq], got "
                         f"{page_indices.shape}")
    s, pages_per_seq = page_indices.shape
    for name, x, shape in (("kv_lens", kv_lens, (s,)), ("cu_q_lens", cu_q_lens, (s + 1,)),
                           ("num_seqs", num_seqs, (1,)), ("page_indices", page_indices, None)):
        if shape is not None and x.shape != shape:
            raise ValueError(f"paged_attention: {name} must have shape {shape} (S = "
                             f"page_indices.shape[0] = {s}), got {x.shape}")
        if x.dtype != jnp.int32:
            raise ValueError(f"paged_attention: {name} must be int32, got {x.dtype}")
    return t, hq, d, p, page_size, h2 // 2, s, pages_per_seq


def paged_token_positions(kv_lens: jax.Array, cu_q_lens: jax.Array, num_seqs: jax.Array,
                          num_tokens: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Which sequence each query token belongs to, and where it sits in it.

    Args:
      kv_lens: int32 [S]; cu_q_lens: int32 [S + 1]; num_seqs: int32 [1] (see paged_attention).
      num_tokens: T, the static number of query rows.
    Returns:
      (seq, pos, live), each [T]: seq int32 in [0, S), the sequence owning token t; pos int32,
      its absolute position kv_lens[seq] - q_len + (t - cu_q_lens[seq]); live bool, False for
      padding tokens (t >= cu_q_lens[num_seqs]) and for tokens with pos < 0 (q_len > kv_len).
    """
    s = kv_lens.shape[0]
    n = jnp.clip(num_seqs[0], 0, s)
    idx = jnp.arange(s + 1, dtype=jnp.int32)
    cu = jnp.where(idx <= n, cu_q_lens, cu_q_lens[n])  # entries past num_seqs are unspecified
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    # a [T, S] count rather than searchsorted, whose while loop costs more on CPU at these sizes
    seq = jnp.minimum(jnp.sum(cu[None, 1:] <= t[:, None], axis=1, dtype=jnp.int32), s - 1)
    q_len = cu[seq + 1] - cu[seq]
    pos = kv_lens[seq] - q_len + (t - cu[seq])
    return seq, pos, (t < cu[n]) & (pos >= 0)


def paged_attention_xla(queries: jax.Array, kv_pages: jax.Array, kv_lens: jax.Array,
                        page_indices: jax.Array, cu_q_lens: jax.Array, num_seqs: jax.Array, *,
                        sm_scale: float, block_bytes: int | None = None) -> jax.Array:
    """paged_attention in pure JAX: the reference, and the CPU path.

    Each query token reads its own sequence's pages, a block of pages at a time, with an
    online (flash-decoding) float32 softmax: per block it gathers [T, block pages, page_size,
    2 * Hkv, D], scores it against its [Hkv, G, D] query, masks positions past its own, and
    folds the block into a running max, sum and value accumulator (probabilities cast to the
    cache dtype for the value product, as the Pallas kernels do). So there is no T x (all
    sequences' kv) product and nothing of size T x pages_per_seq is materialised: in decode
    (T = S) each step is the [S, Hq, D] x [S, block pages, page_size, Hkv, D] product, the
    loop runs only up to the block of the furthest attended position (not to the end of the
    caller's page_indices bucket), and the gathered block stays in cache (on CPU, several
    times faster than one gather of the whole bucket; tools/bench_paged.py --sizes cpu times
    it against the static sampler's dense-cache attend_decode).

    block_bytes: the gathered block's target size (whole pages, at least 32 positions); default
    256 KiB on CPU (L2-sized), 64 MiB elsewhere (fewer loop steps). The CPU figures were
    chosen by timing decode at the tiny model's and Qwen2-1.5B's heads on the shared 2-core
    dev machine (2026-12-04; noisy, load average ~10): both were slower with 2x larger or
    smaller blocks. block_bytes=1 means one page (or 32 positions) a block. page_indices entries past a
    sequence's live pages may hold anything (clipped into range, masked). Not differentiable
    (a dynamic-length loop): inference only, as the kernels. Arguments and result as
    paged_attention.
    """
    t, hq, d, p, page_size, hkv, _, pages_per_seq = _paged_dims(
        queries, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    g = hq // hkv
    if block_bytes is None:
        block_bytes = 1 << 18 if jax.default_backend() == "cpu" else 1 << 26
    page_bytes = t * page_size * 2 * hkv * d * kv_pages.dtype.itemsize
    # at least 32 positions a block: fewer made the loop's per-step cost dominate on CPU
    block = min(pages_per_seq, max(-(-32 // page_size), block_bytes // page_bytes))
    num_blocks = -(-pages_per_seq // block)
    width = block * page_size  # kv positions per block
    seq, pos, live = paged_token_positions(kv_lens, cu_q_lens, num_seqs, t)
    pages = jnp.pad(jnp.clip(page_indices, 0, p - 1),  # padding pages are masked by position
                    ((0, 0), (0, num_blocks * block - pages_per_seq)))
    pages = pages[seq].reshape(t, num_blocks, block)
    split = kv_pages.reshape(p, page_size, hkv, 2, d)
    q = queries.reshape(t, hkv, g, d)

    def fold(j, carry):
        top, total, acc = carry  # running max and sum [T, Hkv, G], values [T, Hkv, G, D]
        # combined head 2h is K_h, 2h + 1 is V_h; two gathers, each fused with its slice and
        # transpose to [T, Hkv, width, D] (head-major: 1.5x faster at the tiny model's heads on
        # CPU than position-major, ~8% slower at Qwen2-1.5B's)
        k, v = (split[pages[:, j], :, :, i].reshape(t, width, hkv, d).transpose(0, 2, 1, 3)
                for i in (0, 1))
        scores = jnp.einsum("tkgd,tkld->tkgl", q, k, preferred_element_type=jnp.float32)
        at = j * width + jnp.arange(width, dtype=jnp.int32)
        allowed = at[None, :] <= pos[:, None]  # [T, width]; pos < kv_len
        scores = jnp.where(allowed[:, None, None], scores * sm_scale, -jnp.inf)
        new_top = jnp.maximum(top, scores.max(-1))
        shift = jnp.where(new_top == -jnp.inf, 0.0, new_top)  # nothing seen yet: no NaN
        probs = jnp.exp(scores - shift[..., None])
        rescale = jnp.exp(top - shift)
        acc = acc * rescale[..., None] + jnp.einsum(
            "tkgl,tkld->tkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return new_top, total * rescale + probs.sum(-1), acc

    init = (jnp.full((t, hkv, g), -jnp.inf, jnp.float32), jnp.zeros((t, hkv, g), jnp.float32),
            jnp.zeros((t, hkv, g, d), jnp.float32))
    needed = jnp.max(jnp.where(live, pos, -1)) // width + 1  # blocks up to the furthest query
    _, total, acc = jax.lax.fori_loop(0, jnp.minimum(needed, num_blocks), fold, init)
    out = acc / jnp.where(total == 0, 1.0, total)[..., None]
    out = jnp.where(live[:, None, None, None], out, 0)
    return out.reshape(t, hq, d).astype(queries.dtype)


def paged_attention(queries: jax.Array, kv_pages: jax.Array, kv_lens: jax.Array,
                    page_indices: jax.Array, cu_q_lens: jax.Array, num_seqs: jax.Array, *,
                    sm_scale: float, implementation: str | None = None) -> jax.Array:
    """Causal GQA attention of ragged query tokens over a paged KV cache.

    Sequence s owns query rows cu_q_lens[s]:cu_q_lens[s + 1] and kv positions
    0..kv_lens[s] - 1, stored in pages page_indices[s, :] (position i in page
    page_indices[s, i // page_size] at offset i % page_size). kv_lens counts the sequence's
    current queries, whose K and V must already be written (write_kv). Query i of sequence s
    sits at position kv_lens[s] - q_len_s + i and attends to kv positions <= it.

    Args:
      queries: [T, Hq, D], T the static number of query rows (padded past
        cu_q_lens[num_seqs]).
      kv_pages: [P, page_size, 2 * Hkv, D]; combined head 2h holds K head h and 2h + 1 holds V
        head h (the layout of jax.experimental.pallas.ops.tpu.ragged_paged_attention). Query
        head j uses kv head j // (Hq // Hkv), as transformers' repeat_kv.
      kv_lens: int32 [S], S = page_indices.shape[0] the static number of sequence slots.
        kv_lens[s] <= pages_per_seq * page_size is the caller's to keep (not checked: traced).
      page_indices: int32 [S, pages_per_seq]; the caller slices it to the live-page bucket,
        which bounds the work. Entries past a sequence's live pages are not read.
      cu_q_lens: int32 [S + 1], cumulative query counts (cu_q_lens[0] = 0).
      num_seqs: int32 [1]; sequences >= num_seqs are ignored (their entries may hold anything).
      sm_scale: scale of q . k (head_dim ** -0.5).
      implementation: None (default_paged_implementation), "xla", "pallas_tpu" or "pallas_gpu".
    Returns:
      [T, Hq, D] in queries' dtype (float32 softmax). Rows past cu_q_lens[num_seqs] (padding)
      are 0, with every implementation. "xla" also gives 0 for a sequence's rows whose
      position would be negative (q_len > kv_len: bad input). Explicit "pallas_gpu" on a batch
      that is T == S but not one query per sequence gives NaN everywhere (see
      paged_attention_pallas_gpu); the default never does.

    Inference only (no gradient: the loop and the kernels). The kernels are single-device
    calls: under a mesh the caller runs paged_attention per shard (jax.shard_map, pool and
    sequences split alike). None of this has been run under a mesh by this project's tests.
    """
    t = queries.shape[0]
    s = page_indices.shape[0] if page_indices.ndim == 2 else None
    auto = implementation is None
    if auto:
        implementation = default_paged_implementation(jax.default_backend(), t == s,
                                                      queries.shape[-1])
    if implementation not in PAGED_IMPLEMENTATIONS:
        raise ValueError(f"paged_attention: implementation {implementation!r} is not one of "
                         f"{PAGED_IMPLEMENTATIONS}")
    args = (queries, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    if implementation == "xla":
        return paged_attention_xla(*args, sm_scale=sm_scale)
    if implementation == "pallas_tpu":
        return paged_attention_pallas_tpu(*args, sm_scale=sm_scale)
    if not auto:
        return paged_attention_pallas_gpu(*args, sm_scale=sm_scale)
    return gpu_kernel_if_decode(*args, sm_scale=sm_scale)


def gpu_kernel_if_decode(*args, sm_scale: float, interpret: bool = False) -> jax.Array:
    """paged_attention(*args) for T == S on a GPU: the Pallas GPU kernel where the batch
    really is decode (is_decode, checked on device by lax.cond), else the reference. XLA
    reserves the reference branch's buffers ([S, pages_per_seq * page_size, 2 * Hkv, D]) even
    when the kernel runs."""
    return jax.lax.cond(is_decode(args[4], args[5]),
                        functools.partial(paged_attention_pallas_gpu, sm_scale=sm_scale,
                                          interpret=interpret),
                        functools.partial(paged_attention_xla, sm_scale=sm_scale), *args)


def default_paged_implementation(backend: str, decode_shaped: bool, head_dim: int = 128) -> str:
    """The kernel paged_attention(implementation=None) uses.

    Args:
      backend: jax.default_backend().
      decode_shaped: T == S (as many query rows as sequence slots), the only shape the GPU
        kernel serves; paged_attention then runs it only if the live cu_q_lens is really one
        query per sequence (is_decode, on device), else the reference.
      head_dim: the TPU kernel needs a multiple of 128 (its lane width).
    Returns:
      "pallas_tpu" on TPU (head_dim a multiple of 128); "pallas_gpu" on GPU for decode-shaped
      calls; else "xla". A pick other than the reference's default is logged once per process.
    """
    if backend == "tpu" and head_dim % 128:
        choice, note = "xla", f"the TPU kernel needs head_dim a multiple of 128, not {head_dim}"
    elif backend == "tpu":
        choice, note = "pallas_tpu", ("NOT run by this project's tests: Pallas TPU interpret mode "
                                      "in jax 0.10.2 cannot run it")
    elif backend in ("gpu", "cuda") and decode_shaped:
        choice, note = "pallas_gpu", "tested in Pallas interpret mode on CPU; see tools/bench_paged.py"
    else:
        return "xla"
    if ("paged", choice, note) not in _logged:
        _logged.add(("paged", choice, note))
        _log.warning("paged_attention: backend %r -> %r kernel (%s); pass implementation='xla' "
                     "for the reference", backend, choice, note)
    return choice


def is_decode(cu_q_lens: jax.Array, num_seqs: jax.Array) -> jax.Array:
    """bool []: every live sequence has exactly one query (cu_q_lens[:num_seqs + 1] == arange)."""
    idx = jnp.arange(cu_q_lens.shape[0], dtype=jnp.int32)
    return jnp.all((cu_q_lens == idx) | (idx > num_seqs[0]))


def paged_attention_pallas_tpu(queries: jax.Array, kv_pages: jax.Array, kv_lens: jax.Array,
                               page_indices: jax.Array, cu_q_lens: jax.Array,
                               num_seqs: jax.Array, *, sm_scale: float,
                               interpret: bool = False) -> jax.Array:
    """paged_attention through jax.experimental.pallas.ops.tpu.ragged_paged_attention.

    The kernel takes this layout as it is (mixed prefill and decode in one call, block sizes
    from its own tuned table, which needs a TPU v4+ device); padding rows are zeroed after it,
    as the reference does. head_dim must be a multiple of 128 (ValueError; the tiny test
    models' 16 is not). Single device: under a mesh, the caller runs it per shard.

    Not run by this project: in jax 0.10.2 neither Pallas interpret mode runs it on CPU (TPU
    interpret mode: "'ReshapeTransform' object has no attribute 'indices'" on the kernel's
    reshape of its VMEM buffer; the generic interpreter: "'TypedInt' object has no attribute
    'shape'"), and lowering for TPU needs a TPU device (tuned block sizes, chip info).
    interpret=True runs it under pltpu.force_tpu_interpret_mode() for when that is fixed
    (tests/test_attention.py tries it and skips with the error).
    """
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu import ragged_paged_attention as rpa

    t, _, d = _paged_dims(queries, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)[:3]
    if d % 128:
        raise ValueError(f"paged_attention: 'pallas_tpu' needs head_dim a multiple of 128 (the "
                         f"kernel's lane width), got {d}; use implementation='xla'")
    args = (queries, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    if interpret:
        with pltpu.force_tpu_interpret_mode():
            out = rpa.ragged_paged_attention(*args, sm_scale=sm_scale,
                                             num_kv_pages_per_block=1, num_queries_per_block=8)
    else:
        out = rpa.ragged_paged_attention(*args, sm_scale=sm_scale)
    live = paged_token_positions(kv_lens, cu_q_lens, num_seqs, t)[2]
    return jnp.where(live[:, None, None], out, 0).astype(queries.dtype)


def gpu_page_layout(kv_pages: jax.Array, page_indices: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(k_pages, v_pages [Hkv, P', page_size, D], block_tables int32 [S, pages_per_seq]): the
    GPU kernel's layout of what page_indices reaches.

    The GPU kernel wants K and V apart with kv heads leading, so one copy is unavoidable: of
    the S * pages_per_seq pages the table names (tables become arange) when that is fewer than
    the pool's P pages, else of the whole pool (tables unchanged). Either way it reads and
    writes 2 x min(S * pages_per_seq, P) pages more than a kernel reading this layout would.
    """
    p, page_size, h2, d = kv_pages.shape
    s, pages_per_seq = page_indices.shape
    pages = jnp.clip(page_indices, 0, p - 1)
    if s * pages_per_seq < p:
        kv_pages = kv_pages[pages.reshape(-1)]
        pages = jnp.arange(s * pages_per_seq, dtype=jnp.int32).reshape(s, pages_per_seq)
    kv = kv_pages.reshape(kv_pages.shape[0], page_size, h2 // 2, 2, d)
    k, v = (kv[..., i, :].transpose(2, 0, 1, 3) for i in (0, 1))
    return k, v, pages


def paged_attention_pallas_gpu(queries: jax.Array, kv_pages: jax.Array, kv_lens: jax.Array,
                               page_indices: jax.Array, cu_q_lens: jax.Array,
                               num_seqs: jax.Array, *, sm_scale: float, interpret: bool = False,
                               pages_per_compute_block: int = 8, k_splits: int = 16) -> jax.Array:
    """paged_attention in decode through jax.experimental.pallas.ops.gpu.paged_attention.

    The kernel serves one query per sequence: T must equal S (else ValueError), and if the
    live cu_q_lens is not arange (is_decode false, known only on device) every output is NaN,
    loudly wrong rather than silently. Costs over a kernel native to this layout:
      - the K / V copy of gpu_page_layout (2 x min(S * pages_per_seq, P) pages of traffic);
      - queries pre-scaled by sm_scale in their dtype (the kernel has no scale argument): one
        extra rounding of q in bfloat16;
      - the GPU kernel pads each GQA group to block_h = 16 query heads (Qwen2-1.5B's group of
        6 computes 16), and page_indices is padded with page 0 to a multiple of
        k_splits x pages_per_compute_block pages (skipped or masked by length).
    Block sizes: pages_per_compute_block pages per step (a power of two, capped by the table),
    k_splits partitions of the table run in parallel and are merged after (flash-decoding).
    Triton needs page_size and head_dim to be powers of two, head_dim >= 16 (ValueError).
    Single device. interpret=True runs it in Pallas interpret mode (any backend; slow).
    """
    from jax.experimental.pallas.ops.gpu import paged_attention as gpu_pa

    t, hq, d, _, page_size, _, s, pages_per_seq = _paged_dims(
        queries, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    if t != s:
        raise ValueError(f"paged_attention: implementation 'pallas_gpu' serves decode only, one "
                         f"query row per sequence slot (T == S); got T={t} rows for S={s} slots. "
                         "Use implementation='xla' for prefill or mixed batches")
    pow2 = lambda n: n & (n - 1) == 0
    if not (pow2(page_size) and pow2(d) and d >= 16):
        raise ValueError(f"paged_attention: 'pallas_gpu' (Triton) needs page_size and head_dim "
                         f"powers of two and head_dim >= 16; got {page_size} and {d}")
    k_pages, v_pages, tables = gpu_page_layout(kv_pages, page_indices)
    block = min(pages_per_compute_block, 1 << (pages_per_seq - 1).bit_length())
    splits = min(k_splits, -(-pages_per_seq // block))
    width = -(-pages_per_seq // (splits * block)) * splits * block
    tables = jnp.pad(tables, ((0, 0), (0, width - pages_per_seq)))
    live = jnp.arange(s) < num_seqs[0]
    lengths = jnp.where(live, kv_lens, 0)  # dead slots: no work
    q = (queries.astype(jnp.float32) * sm_scale).astype(queries.dtype)
    out = gpu_pa.paged_attention(q, k_pages, v_pages, tables, lengths, block_h=16,
                                 pages_per_compute_block=block, k_splits=splits,
                                 interpret=interpret)
    out = jnp.where(live[:, None, None], out, 0)
    return jnp.where(is_decode(cu_q_lens, num_seqs), out, jnp.nan).astype(queries.dtype)


def write_kv(kv_pages: jax.Array, k: jax.Array, v: jax.Array, slots: jax.Array) -> jax.Array:
    """Writes tokens' keys and values into the page pool: one scatter.

    Args:
      kv_pages: [P, page_size, 2 * Hkv, D] (paged_attention's layout: K head h at combined
        head 2h, V head h at 2h + 1).
      k, v: [T, Hkv, D], cast to kv_pages' dtype.
      slots: int32 [T], flat slot page * page_size + offset of each token; slots < 0 (padding
        tokens) and slots >= P * page_size are dropped. Two tokens with one slot: either wins.
    Returns:
      kv_pages with the tokens written. Pure; under jit with kv_pages donated the scatter
      updates the pool in place.
    """
    p, page_size, h2, d = kv_pages.shape
    if k.shape != v.shape or k.ndim != 3 or k.shape[1:] != (h2 // 2, d):
        raise ValueError(f"write_kv: k and v must both be [T, {h2 // 2}, {d}] for kv_pages "
                         f"{kv_pages.shape}; got {k.shape} and {v.shape}")
    if slots.shape != k.shape[:1] or not jnp.issubdtype(slots.dtype, jnp.integer):
        raise ValueError(f"write_kv: slots must be integer [{k.shape[0]}], got {slots.dtype} "
                         f"{slots.shape}")
    t = k.shape[0]
    kv = jnp.stack([k, v], axis=2).reshape(t, h2, d).astype(kv_pages.dtype)  # K0 V0 K1 V1 ...
    total = p * page_size
    # negative indices would wrap around in .at[]: send them out of range, where mode="drop"
    # discards them
    slots = jnp.where(slots < 0, total, slots)
    flat = kv_pages.reshape(total, h2, d).at[slots].set(kv, mode="drop")
    return flat.reshape(p, page_size, h2, d)
