"""Rollout generation: jit-compiled programs per (prompt bucket, batch, settings, phase).

`generate` left-pads the prompts into a power-of-two bucket, prefills a KV cache (per-row RoPE
positions start at each row's first real token), then decodes one token per step inside
`jax.lax.while_loop`s that stop as soon as every row has finished (EOS) or the token budget is
spent. The cache is allocated inside the programs and carried by the loops, so it is updated in
place and never crosses the host boundary (no per-token dispatch).

Decoding runs in phases over growing static cache lengths (_phase_ends): the first phase covers
FIRST_PHASE tokens over a cache of bucket + FIRST_PHASE - 1 slots, each later phase doubles the
tokens and grows the cache (zero slots appended inside the program). A step therefore attends
over at most twice the slots its rows need, not over the whole budget, and a phase is entered
(and compiled) only when some row is still live after the previous one: one host sync per
phase. With every row ending early, generate(max_new_tokens=4096) costs about what
generate(64) does. The sampled tokens do not depend on the phases; the log-probs agree with a
single-phase run to float32 rounding (attention reduces over a different number of masked
slots). Programs are cached by jax.jit per (model graph, batch size, prompt bucket, settings,
phase, mesh).

Not done: finished rows keep their place in the batch until every row of it finishes (no
compaction or refill), so a phase costs the full batch while any row is live.

Which log-probs should a loss take?
  * `policy_logprobs` -- log-probs under the policy itself at temperature 1 with no
    truncation. They equal a teacher-forced forward pass over prompt + response (tested to
    1e-4), so a trainer whose policy is the raw model (rollouts at temperature 1) can use them
    as pi_old without another forward pass.
  * `logprobs` -- log-probs under the distribution actually sampled from (after the
    repetition penalty, temperature, top-k, top-p). With the penalty and top-k / top-p off they
    are log softmax(logits / T), the behaviour
    policy of the method (scope_jax/losses.py docstring) at rollout temperature T. The trainer (as verl) takes
    pi_theta and pi_old at T and recomputes pi_old with its own forward pass
    (scope_jax.step.policy_temperature). For greedy decoding the sampled distribution is a
    point mass, so `logprobs` then holds the log-probs of the greedy token at temperature 1
    after the repetition penalty (without a penalty: the same values as `policy_logprobs`).
  The repetition penalty never changes `policy_logprobs`: they stay the raw policy's, the
  distribution a teacher-forced forward pass gives.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from scope_jax import sharding as shd
from scope_jax.sharding import local_rows

FINISH_EOS = 0
FINISH_LENGTH = 1
_FINISH_NAMES = ("eos", "length")
# Mesh axes that split the batch (scope_jax.sharding maps the logical "batch" axis to both).


@flax.struct.dataclass
class SamplerOutput:
    """Rollouts; N = len(prompts) * num_samples, the samples of one prompt adjacent.

    tokens:          int32 [N, M]  generated ids; pad_id after a row finished (M = max_new_tokens)
    response_mask:   bool  [N, M]  True on generated tokens, EOS included (the policy must learn
                                   to stop), False on padding
    lengths:         int32 [N]     number of generated tokens (EOS included)
    finish_reason:   int32 [N]     FINISH_EOS (0) or FINISH_LENGTH (1); see `finish_reason_names`
    logprobs:        float32 [N, M] log-prob of each token under the distribution it was
                                   sampled from (after temperature / top-k / top-p); 0 on padding
    policy_logprobs: float32 [N, M] log-prob under the unmodified policy (temperature 1, no
                                   truncation); 0 on padding. The losses take these (see module doc)
    prompt_ids:      int32 [N, P]  the prompts, left-padded with pad_id to the bucket length P
    prompt_lengths:  int32 [N]     real prompt lengths
    group_ids:       int32 [N]     index of the prompt each row answers (row // num_samples)
    """

    tokens: jax.Array
    response_mask: jax.Array
    lengths: jax.Array
    finish_reason: jax.Array
    logprobs: jax.Array
    policy_logprobs: jax.Array
    prompt_ids: jax.Array
    prompt_lengths: jax.Array
    group_ids: jax.Array


def finish_reason_names(out: SamplerOutput) -> list[str]:
    """'eos' or 'length' for each row of `out` (host-side list of N strings)."""
    return [_FINISH_NAMES[int(r)] for r in np.asarray(out.finish_reason)]


def response_lists(out: SamplerOutput) -> list[list[int]]:
    """The generated ids of each (local) row without padding (host-side lists, EOS included)."""
    tokens, lengths = local_rows(out.tokens), local_rows(out.lengths)
    return [tokens[i, : lengths[i]].tolist() for i in range(tokens.shape[0])]


def full_sequences(out: SamplerOutput) -> tuple[jax.Array, jax.Array]:
    """Prompt + response as one training sequence per row.

    Returns (input_ids int32 [N, P + M], attention_mask bool [N, P + M]): the left-padded prompt
    followed by the response; the mask is True on real prompt tokens and generated tokens, so the
    real tokens of a row are contiguous and positions = cumsum(mask) - 1 reproduces the RoPE
    positions used while sampling.
    """
    p = out.prompt_ids.shape[1]
    prompt_mask = jnp.arange(p)[None, :] >= (p - out.prompt_lengths)[:, None]
    ids = jnp.concatenate([out.prompt_ids, out.tokens], axis=1)
    mask = jnp.concatenate([prompt_mask, out.response_mask], axis=1)
    return ids, mask


# ----------------------------------------------------------------------------- logit processing


def sampling_logprobs(logits: jax.Array, *, temperature: float, top_k: int | None = None,
                      top_p: float | None = None) -> jax.Array:
    """Log-probs of the distribution to sample from.

    logits: float [B, V]. Applies, in this order (the order of transformers and vLLM),
    temperature scaling, top-k (keep the k largest; ties with the k-th are kept too) and top-p
    (sort the tokens by probability, renormalised after top-k, and keep each token whose
    predecessors' total is still below top_p: the smallest prefix reaching top_p, at least one
    token; ties with the last kept token are kept too). temperature must be > 0.
    Returns float32 [B, V] normalised log-probs, -inf on excluded tokens.
    """
    if temperature <= 0:
        raise ValueError(f"sampling_logprobs: temperature must be > 0, got {temperature}")
    x = logits.astype(jnp.float32) / temperature
    vocab = x.shape[-1]
    top_vals = None  # the largest logits in descending order, when known
    if top_k is not None and top_k < vocab:
        top_vals = jax.lax.top_k(x, top_k)[0]
        # min over the k values rather than [..., -1]: XLA rewrites a slice of top_k into a
        # full sort, which is ~20x slower on CPU.
        x = jnp.where(x >= jnp.min(top_vals, axis=-1, keepdims=True), x, -jnp.inf)
    if top_p is not None and top_p < 1.0:
        if top_vals is None:
            top_vals = jax.lax.top_k(x, min(vocab, 64))[0]
        x = jnp.where(x >= _top_p_threshold(x, top_p, top_vals), x, -jnp.inf)
    return jax.nn.log_softmax(x, axis=-1)


def _top_p_threshold(x: jax.Array, top_p: float, cand: jax.Array) -> jax.Array:
    """Smallest logit kept by top-p. x float32 [B, V] (-inf = excluded); cand [B, C] the C
    largest entries of x in descending order. Returns [B, 1].

    The kept set is the prefix of the descending order up to the first token whose inclusive
    mass reaches top_p. A full sort of the vocabulary is slow (XLA's CPU sort especially), so
    the prefix is looked for among the candidates; rows whose candidates do not reach top_p
    fall back to an exact bisection over the probabilities.
    """
    lse = jax.nn.logsumexp(x, axis=-1, keepdims=True)
    inclusive = jax.lax.associative_scan(jnp.add, jnp.exp(cand - lse), axis=-1)
    reached = inclusive >= top_p
    covered = jnp.any(reached, axis=-1, keepdims=True)
    first = jnp.argmax(reached, axis=-1)[:, None]
    fast = jnp.take_along_axis(cand, first, axis=-1)
    return jax.lax.cond(jnp.all(covered), lambda: fast,
                        lambda: jnp.where(covered, fast, _bisect_top_p(x, lse, top_p)))


def _bisect_top_p(x: jax.Array, lse: jax.Array, top_p: float) -> jax.Array:
    """Exact top-p threshold without sorting: the largest probability t with
    mass(p >= t) >= top_p, found by bisection over the float32 bit patterns of the
    probabilities (monotone for p >= 0, so 32 halvings are exact). Returns logits [B, 1]."""
    p = jnp.exp(x - lse)
    bits = jax.lax.bitcast_convert_type(p, jnp.int32)
    lo = jnp.zeros(bits.shape[:-1] + (1,), jnp.int32)  # mass(p >= +0) = 1 >= top_p
    hi = jnp.max(bits, axis=-1, keepdims=True) + 1     # mass(p >= hi) = 0 < top_p

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(jnp.where(bits >= mid, p, 0.0), axis=-1, keepdims=True) >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return jnp.min(jnp.where(bits >= lo, x, jnp.inf), axis=-1, keepdims=True)


def sample_categorical(logprobs: jax.Array, uniforms: jax.Array) -> jax.Array:
    """Draws one index per row from exp(logprobs) by two-level inversion of the CDF.

    logprobs: float32 [B, V] normalised log-probs (-inf allowed); uniforms: float32 [B, 2] in
    [0, 1). Returns int32 [B]. The vocabulary is cut into blocks of ~sqrt(V); a block is drawn
    by its mass, then a token inside it. Exact like the Gumbel-max trick, but it needs 2 random
    numbers per row instead of V, which on CPU is the difference between ~6 ms and ~0.2 ms per
    step at V = 32k, B = 8 (threefry dominates there).
    """
    b, v = logprobs.shape
    blk = 1
    while blk * blk < v:
        blk *= 2
    nb = -(-v // blk)
    p = jnp.pad(jnp.exp(logprobs.astype(jnp.float32)), ((0, 0), (0, nb * blk - v)))
    p = p.reshape(b, nb, blk)
    block = _invert_cdf(jnp.sum(p, axis=-1), uniforms[:, 0])
    inner = jnp.take_along_axis(p, block[:, None, None], axis=1)[:, 0]
    return block * blk + _invert_cdf(inner, uniforms[:, 1])


def _invert_cdf(w: jax.Array, u: jax.Array) -> jax.Array:
    """Index i with probability w_i / sum(w): the first i whose cumulative weight exceeds
    u * total. w float32 [B, n] >= 0 with a positive entry; u [B] in [0, 1). Returns int32 [B].
    """
    cdf = jnp.cumsum(w, axis=-1)
    idx = jnp.sum(cdf <= u[:, None] * cdf[:, -1:], axis=-1)
    # u * total can round up to the total; never go past the last positive entry.
    last = w.shape[-1] - 1 - jnp.argmax(w[:, ::-1] > 0, axis=-1)
    return jnp.minimum(idx, last).astype(jnp.int32)


def _first_argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax(x, axis=-1) as int32 (first maximal index; a NaN counts as the maximum).

    x float [B, n]. A max-reduce then a min-reduce over the matching indices: XLA's CPU
    argmax (one variadic value-and-index reduce) is ~6x slower, a tenth of a decode step.
    """
    hit = (x == jnp.max(x, axis=-1, keepdims=True)) | jnp.isnan(x)
    n = x.shape[-1]
    return jnp.min(jnp.where(hit, jnp.arange(n, dtype=jnp.int32), n), axis=-1)


def _step_uniforms(row_keys: jax.Array, start: int, stop: int) -> jax.Array:
    """float32 [stop - start, B, 2]: the two uniforms row b draws at step t, for t in
    [start, stop), from fold_in(row_keys[b], t). Per-row keys folded with the step: a row's
    sample does not depend on which other rows share its batch (mesh padding, bucket) nor on
    the decode phases, only on (key, row, step).

    Drawn for a whole decode phase before its loop ((stop - start) * B * 8 bytes): one
    vectorised threefry instead of two small ones per step, which cost ~50 us a step on CPU at
    B = 32 (the values are the same).
    """
    steps = jnp.arange(start, stop, dtype=jnp.int32)
    return jax.vmap(lambda t: token_uniforms(row_keys, jnp.full(row_keys.shape, t)))(steps)


def token_uniforms(row_keys: jax.Array, index: jax.Array) -> jax.Array:
    """float32 [B, 2]: the two uniforms row b draws for its token number index[b] (row_keys [B]
    keys, index int32 [B]); the one rule of every engine, so a row's tokens depend on (its key,
    token index) only, not on its batch, slot or step."""
    return jax.vmap(lambda k, t: jax.random.uniform(jax.random.fold_in(k, t), (2,)))(
        row_keys, index.astype(jnp.int32))


def row_keys(key: jax.Array | None, n: int) -> jax.Array:
    """The per-row keys [n] of this process's n rows: split(key, n), key first folded with the
    process index in a multi-process run (so the processes' rows differ); key None (greedy):
    jax.random.key(0); raw uint32 keys (jax.random.PRNGKey) are accepted."""
    if key is None:
        key = jax.random.key(0)
    elif not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if jax.process_count() > 1:
        key = jax.random.fold_in(key, jax.process_index())
    return jax.random.split(key, n)


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """transformers' RepetitionPenaltyLogitsProcessor: the logit of every token in `seen` is
    divided by `penalty` when positive and multiplied by it otherwise (penalty > 1 makes seen
    tokens less likely, whatever the sign).

    logits float32 [B, V]; seen bool [B, V] (the tokens of the row's prompt and response so
    far). Returns float32 [B, V].
    """
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def _seen_tokens(ids: jax.Array, valid: jax.Array, vocab: int) -> jax.Array:
    """bool [B, V]: which ids occur in each row. ids int32 [B, T]; valid bool [B, T] (False:
    padding, not counted; it goes to an extra column that is dropped)."""
    rows = jnp.arange(ids.shape[0])[:, None]
    seen = jnp.zeros((ids.shape[0], vocab + 1), bool)
    return seen.at[rows, jnp.where(valid, ids, vocab)].set(True)[:, :vocab]


def _pick(logits: jax.Array, uniforms: jax.Array | None, seen: jax.Array | None,
          params: "_Settings") -> tuple[jax.Array, jax.Array, jax.Array]:
    """Chooses one token per row. logits float32 [B, V]; uniforms float32 [B, 2] in [0, 1)
    (this step's rows of _step_uniforms; None when greedy); seen bool [B, V] the tokens the
    repetition penalty applies to (None when it is off).

    Returns (token int32 [B], sampled-distribution log-prob [B], policy log-prob [B]).
    """
    logits = logits.astype(jnp.float32)
    policy = jax.nn.log_softmax(logits, axis=-1)
    if seen is not None:  # on the raw logits, before temperature / top-k / top-p (transformers)
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0.0:
        token = _first_argmax(logits)
        plp = jnp.take_along_axis(policy, token[:, None], axis=-1)[:, 0]
        if seen is None:
            return token, plp, plp
        dist = jax.nn.log_softmax(logits, axis=-1)
        return token, jnp.take_along_axis(dist, token[:, None], axis=-1)[:, 0], plp
    dist = sampling_logprobs(logits, temperature=params.temperature, top_k=params.top_k,
                             top_p=params.top_p)
    token = sample_categorical(dist, uniforms)
    lp = jnp.take_along_axis(dist, token[:, None], axis=-1)[:, 0]
    plp = jnp.take_along_axis(policy, token[:, None], axis=-1)[:, 0]
    return token, lp, plp


# ----------------------------------------------------------------------------- the program


# Decode steps covered by the first phase's cache; each later phase doubles the steps (see
# _phase_ends). Small enough that short responses attend over a short cache, large enough that
# the phase switches (one host sync each) are rare.
FIRST_PHASE = 64


@dataclasses.dataclass(frozen=True)
class _Settings:
    """Static (compile-time) settings of one generation program."""

    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    pad_id: int
    repetition_penalty: float = 1.0  # 1.0: off (no [B, V] bookkeeping at all)


@flax.struct.dataclass
class _Decoding:
    """The decode loop's state; B rows, M = max_new_tokens.

    step:     int32 []      index of the next token to produce
    prev:     int32 [B]     the last token produced (fed to the model next)
    done:     bool  [B]     finished rows (EOS, or padding rows)
    eos_hit:  bool  [B]     rows that ended with an EOS
    lengths:  int32 [B]     tokens produced per row
    tokens:   int32 [B, M]; logprobs, policy_logprobs float32 [B, M]: see SamplerOutput
    cache:    the model's KV cache with bucket + phase end - 1 slots
    seen:     bool [B, V] tokens of each row's prompt and response so far (the repetition
              penalty's), or None when the penalty is off
    """

    step: jax.Array
    prev: jax.Array
    done: jax.Array
    eos_hit: jax.Array
    lengths: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    policy_logprobs: jax.Array
    cache: object
    seen: jax.Array | None


def _phase_ends(max_new_tokens: int, first: int) -> list[int]:
    """Token counts at which the decode phases end: first, 2 * first, 4 * first, ... then
    max_new_tokens (always the last). Phase k produces tokens [ends[k-1], ends[k]) over a cache
    of bucket + ends[k] - 1 slots, so a step attends over at most twice the slots it needs."""
    ends = []
    end = max(1, first)
    while end < max_new_tokens:
        ends.append(end)
        end *= 2
    return ends + [max_new_tokens]


def _shard_cache(cache, mesh):
    """Shards the cache's batch axis over the mesh's batch axes (no-op without a mesh).

    Cache arrays have the batch on axis 1 by the model contract ([L, B, S, ...] for a Cache,
    [K, B, ...] for a DecodeCache); leaves of rank < 2 are left alone.
    """
    if mesh is None:
        return cache
    spec = NamedSharding(mesh, P(None, shd.batch_axes(mesh)))
    return jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, spec) if x.ndim >= 2 else x, cache)


def _new_cache(model, batch: int, length: int, mesh, old=None):
    """A zero cache of `length` slots (the model's decode layout when it has one), holding the
    slots of `old` (a smaller cache of the same model) at the front when given.

    Growing writes old into a fresh zero cache, whatever the layout: the slot axis is the only
    one whose size differs, so an update at offset 0 puts every old slot where it was.
    """
    init_cache = getattr(model, "init_decode_cache", model.init_cache)
    cache = init_cache(batch, length)
    if old is not None:
        cache = jax.tree.map(lambda z, o: jax.lax.dynamic_update_slice(z, o.astype(z.dtype),
                                                                       (0,) * z.ndim), cache, old)
    return _shard_cache(cache, mesh)


def _kv_mask(prompt_lengths: jax.Array, bucket: int, cache_len: int) -> jax.Array:
    """bool [B, cache_len]: False on each row's left padding. Causality is the model's job
    (slot <= cache_index + t); the mask only hides left padding, so it serves prefill and
    every decode step."""
    return jnp.arange(cache_len)[None, :] >= (bucket - prompt_lengths)[:, None]


def _is_eos(tok: jax.Array, eos_ids: jax.Array) -> jax.Array:
    return jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)


def _decode(graphdef, state, dec: _Decoding, prompt_lengths, row_keys, eos_ids, bucket: int,
            start: int, stop: int, settings: _Settings) -> _Decoding:
    """Produces tokens start .. stop-1 (fewer when every row finishes first) with a
    jax.lax.while_loop; dec.cache must have bucket + stop - 1 slots and dec.step == start."""
    kv_mask = _kv_mask(prompt_lengths, bucket, bucket + stop - 1)
    uniforms = None if settings.temperature == 0.0 else _step_uniforms(row_keys, start, stop)
    pad_tok = jnp.int32(settings.pad_id)

    def cond(carry):
        dec = carry[0]
        return (dec.step < stop) & ~jnp.all(dec.done)

    def body(carry):
        # The parameters travel in the carry and the model is rebuilt here, so the model's
        # NNX transforms (remat, scan) run at this loop's trace level, not the jit's.
        dec, state = carry
        model = nnx.merge(graphdef, state)
        i = dec.step
        # Feed token i-1 (slot bucket+i-1, position len+i-1) to get the logits of token i.
        pos = (prompt_lengths + i - 1)[:, None].astype(jnp.int32)
        logits, cache = model.forward_cached(dec.prev[:, None], pos, dec.cache, bucket + i - 1,
                                             kv_mask)
        tok, lp, plp = _pick(logits[:, 0], None if uniforms is None else uniforms[i - start],
                             dec.seen, settings)
        live = ~dec.done
        tok = jnp.where(live, tok, pad_tok)
        seen = None if dec.seen is None else dec.seen.at[jnp.arange(tok.shape[0]), tok].set(True)
        new_eos = live & _is_eos(tok, eos_ids)
        dec = _Decoding(
            step=i + 1, prev=tok, done=dec.done | new_eos, eos_hit=dec.eos_hit | new_eos,
            lengths=dec.lengths + live.astype(jnp.int32),
            tokens=jax.lax.dynamic_update_slice(dec.tokens, tok[:, None], (0, i)),
            logprobs=jax.lax.dynamic_update_slice(
                dec.logprobs, jnp.where(live, lp, 0.0)[:, None], (0, i)),
            policy_logprobs=jax.lax.dynamic_update_slice(
                dec.policy_logprobs, jnp.where(live, plp, 0.0)[:, None], (0, i)),
            cache=cache, seen=seen)
        return dec, state

    return jax.lax.while_loop(cond, body, (dec, state))[0]


@functools.partial(jax.jit, static_argnames=("graphdef", "settings", "mesh", "stop"))
def _prefill_program(graphdef, state, prompt_ids, prompt_lengths, row_keys, done0, eos_ids,
                     *, settings: _Settings, mesh, stop: int) -> tuple[_Decoding, jax.Array]:
    """Prefill, then the first decode phase (tokens 0 .. stop-1).

    prompt_ids int32 [B, P] left-padded; prompt_lengths int32 [B]; row_keys [B] keys;
    done0 bool [B] (rows that are padding); eos_ids int32 [E] (E may be 0).
    Returns (decoding state, bool [] whether some row is still live).
    """
    model = nnx.merge(graphdef, state)
    batch, bucket = prompt_ids.shape
    m = settings.max_new_tokens
    pad = bucket - prompt_lengths  # number of left-padding slots per row
    # The cache holds the bucket and every token of this phase but the last (never fed back).
    cache_len = bucket + stop - 1
    kv_mask = _kv_mask(prompt_lengths, bucket, cache_len)
    positions = jnp.maximum(jnp.arange(bucket)[None, :] - pad[:, None], 0).astype(jnp.int32)
    cache = _new_cache(model, batch, cache_len, mesh)

    # Prefill in two calls: only the last prompt position's logits are needed, and the unused
    # [B, P-1, V] logits of the first call are dead code that XLA removes (a slice of one
    # [B, P, V] result is not pushed into the unembedding matmul, so one call would build it).
    _, cache = model.forward_cached(prompt_ids[:, :-1], positions[:, :-1], cache, jnp.int32(0),
                                    kv_mask)
    logits, cache = model.forward_cached(prompt_ids[:, -1:], positions[:, -1:], cache,
                                         jnp.int32(bucket - 1), kv_mask)
    uniforms = None if settings.temperature == 0.0 else _step_uniforms(row_keys, 0, 1)[0]
    # The penalty counts the real prompt tokens, not the left padding (as transformers, which
    # ignores each row's padding_lengths), then every generated token.
    seen = (None if settings.repetition_penalty == 1.0 else
            _seen_tokens(prompt_ids, kv_mask[:, :bucket], logits.shape[-1]))
    tok, lp, plp = _pick(logits[:, 0], uniforms, seen, settings)

    pad_tok = jnp.int32(settings.pad_id)
    live = ~done0
    tok = jnp.where(live, tok, pad_tok)
    eos_hit = live & _is_eos(tok, eos_ids)
    if seen is not None:
        seen = seen.at[jnp.arange(batch), tok].set(True)
    dec = _Decoding(
        step=jnp.int32(1), prev=tok, done=done0 | eos_hit, eos_hit=eos_hit,
        lengths=live.astype(jnp.int32),
        tokens=jnp.full((batch, m), pad_tok, jnp.int32).at[:, 0].set(tok),
        logprobs=jnp.zeros((batch, m), jnp.float32).at[:, 0].set(jnp.where(live, lp, 0.0)),
        policy_logprobs=jnp.zeros((batch, m), jnp.float32).at[:, 0].set(
            jnp.where(live, plp, 0.0)),
        cache=cache, seen=seen)
    dec = _decode(graphdef, state, dec, prompt_lengths, row_keys, eos_ids, bucket, 1, stop,
                  settings)
    return dec, ~jnp.all(dec.done)


@functools.partial(jax.jit, static_argnames=("graphdef", "settings", "mesh", "bucket", "start",
                                             "stop"))
def _phase_program(graphdef, state, dec: _Decoding, prompt_lengths, row_keys, eos_ids, *,
                   settings: _Settings, mesh, bucket: int, start: int,
                   stop: int) -> tuple[_Decoding, jax.Array]:
    """A later decode phase: grows the cache from bucket + start - 1 to bucket + stop - 1
    slots and produces tokens start .. stop-1. Arguments and result as _prefill_program's."""
    model = nnx.merge(graphdef, state)
    dec = dec.replace(cache=_new_cache(model, dec.tokens.shape[0], bucket + stop - 1, mesh,
                                       old=dec.cache))
    dec = _decode(graphdef, state, dec, prompt_lengths, row_keys, eos_ids, bucket, start, stop,
                  settings)
    return dec, ~jnp.all(dec.done)


def _replicated_bool(x: jax.Array) -> bool:
    """The value of a replicated bool scalar (in a multi-process run too: every process holds
    a copy, so each reads its own and all take the same branch)."""
    return bool(np.asarray(x.addressable_shards[0].data))


@functools.partial(jax.jit, static_argnames=("max_new_tokens",))
def _outputs(lengths: jax.Array, eos_hit: jax.Array, *,
             max_new_tokens: int) -> tuple[jax.Array, jax.Array]:
    """(response_mask bool [B, M], finish_reason int32 [B]) from lengths int32 [B] and
    eos_hit bool [B] of a finished decoding."""
    mask = jnp.arange(max_new_tokens)[None, :] < lengths[:, None]
    return mask, jnp.where(eos_hit, FINISH_EOS, FINISH_LENGTH).astype(jnp.int32)


# ----------------------------------------------------------------------------- public entry


def stop_ids(model_config=None, tokenizer=None, extra: Sequence[int] = (),
             checkpoint: str | None = None) -> list[int]:
    """The token ids that end a response, for training, evaluation and the tools alike: the
    union of the tokenizer's eos_token_id, the model config's eos_token_id (an int or a list,
    e.g. Qwen's <|im_end|> and <|endoftext|>), the eos_token_id of `checkpoint`'s
    generation_config.json when there is one, and `extra`; sorted, deduplicated.

    Raises ValueError naming the file when generation_config.json is not valid JSON.
    """
    import json
    import os

    def ids(x):
        return [] if x is None else [int(i) for i in (x if isinstance(x, (list, tuple)) else [x])]

    out = set(ids(getattr(tokenizer, "eos_token_id", None)))
    out |= set(ids(getattr(model_config, "eos_token_id", None)))
    out |= set(ids(list(extra)))
    file = os.path.join(os.fspath(checkpoint), "generation_config.json") if checkpoint else ""
    if file and os.path.isfile(file):
        with open(file) as f:
            try:
                out |= set(ids(json.load(f).get("eos_token_id")))
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    return sorted(out)


def prompt_bucket(max_prompt_len: int, min_bucket: int = 16) -> int:
    """Bucket length for prompts of at most `max_prompt_len` tokens: the next power of two,
    at least `min_bucket`. Bounds the number of compiled programs to log2(longest prompt)."""
    if max_prompt_len < 1:
        raise ValueError(f"prompt_bucket: max_prompt_len must be >= 1, got {max_prompt_len}")
    return max(min_bucket, 1 << (max_prompt_len - 1).bit_length())


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray,
                                                                                    np.ndarray]:
    """Left-pads token-id lists. Returns (ids int32 [len(prompts), length], lengths int32 [n])."""
    ids = np.full((len(prompts), length), pad_id, np.int32)
    lengths = np.zeros((len(prompts),), np.int32)
    for i, p in enumerate(prompts):
        if len(p) > length:
            raise ValueError(f"left_pad: prompt {i} has {len(p)} tokens > length {length}")
        if len(p):
            ids[i, length - len(p):] = p
        lengths[i] = len(p)
    return ids, lengths


def _check_prompts(prompts, vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("generate: prompts must be a non-empty list of token-id lists")
    out = []
    for i, p in enumerate(prompts):
        arr = np.asarray(p)
        if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"generate: prompts[{i}] must be a non-empty list of ints, got "
                             f"shape {arr.shape} dtype {arr.dtype}")
        if arr.min() < 0 or arr.max() >= vocab_size:
            raise ValueError(f"generate: prompts[{i}] has token ids outside [0, {vocab_size}): "
                             f"min {arr.min()}, max {arr.max()}")
        out.append(arr.tolist())
    return out


def generate(model, prompts: Sequence[Sequence[int]], *, num_samples: int = 1,
             max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, eos_ids: int | Sequence[int] | None = None,
             pad_id: int = 0, key: jax.Array | None = None, mesh: jax.sharding.Mesh | None = None,
             min_bucket: int = 16, repetition_penalty: float = 1.0) -> SamplerOutput:
    """Samples `num_samples` responses for each prompt with a KV cache.

    model: a scope_jax.models.Transformer (anything with `config.vocab_size`, `init_cache` and
      `forward_cached` per the model contract).
    prompts: list of token-id lists of any (non-zero) lengths.
    max_new_tokens: response budget M; rows that do not emit an EOS stop at M ('length').
    temperature: 0 -> greedy (argmax; top_k / top_p are irrelevant and ignored); > 0 -> sample
      from softmax(logits / temperature) restricted by top_k then top_p (see sampling_logprobs).
    eos_ids: id or ids that end a response (included in the response); None: only the budget
      stops a row.
    pad_id: written after a row finished and used to left-pad prompts (always masked out).
    key: PRNG key, required when temperature > 0; the same key gives the same output.
    mesh: when given, rows are split over its 'data' and 'fsdp' axes (those it has; padded with
      dummy rows to a multiple of their size) and the program is traced under jax.set_mesh so
      the model's activation sharding constraints apply; params keep the sharding they have.
      In a multi-process run each process passes its own prompts (the same count on every
      process); the result then holds global arrays (process 0's rows first; group ids index
      the global prompts) and `local_rows` / `response_lists` give a process its own rows.
    min_bucket: smallest prompt bucket; buckets are powers of two >= the longest prompt.
    repetition_penalty: transformers' repetition penalty (> 0; 1.0 = off, no overhead): at
      every step the logits of the tokens in the row's prompt (its real tokens, not padding)
      and response so far are divided by it when positive and multiplied by it otherwise,
      before temperature / top-k / top-p, for greedy decoding too. `logprobs` include it,
      `policy_logprobs` do not (module docstring).

    Returns SamplerOutput with N = len(prompts) * num_samples rows, the samples of prompt j in
    rows j*num_samples .. (j+1)*num_samples-1. See the module docstring for which log-probs a
    loss should use (policy_logprobs).
    """
    if not hasattr(model, "forward_cached") or not hasattr(model, "init_cache"):
        raise TypeError(f"generate: model {type(model).__name__} lacks forward_cached/init_cache")
    vocab = int(model.config.vocab_size)
    prompts = _check_prompts(prompts, vocab)
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"generate: num_samples must be an int >= 1, got {num_samples!r}")
    temperature = float(temperature)
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"generate: temperature must be finite and >= 0, got {temperature}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"generate: top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"generate: top_p must be None or in (0, 1], got {top_p!r}")
    if not 0 <= pad_id < vocab:
        raise ValueError(f"generate: pad_id {pad_id} outside [0, {vocab})")
    repetition_penalty = float(repetition_penalty)
    if not np.isfinite(repetition_penalty) or repetition_penalty <= 0:
        raise ValueError(f"generate: repetition_penalty must be finite and > 0, got "
                         f"{repetition_penalty}")
    if temperature > 0 and key is None:
        raise ValueError("generate: temperature > 0 needs a PRNG key (key=jax.random.key(seed))")
    eos = [] if eos_ids is None else ([eos_ids] if np.ndim(eos_ids) == 0 else list(eos_ids))
    if any(not 0 <= int(e) < vocab for e in eos):
        raise ValueError(f"generate: eos_ids {eos} has ids outside [0, {vocab})")

    rows = [p for p in prompts for _ in range(num_samples)]
    n = len(rows)
    shards = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in shd.batch_axes(mesh)]))
    processes = jax.process_count()
    longest = max(len(p) for p in rows)
    if processes > 1:  # this process's prompts; rows of all processes form one global batch
        if mesh is None:
            raise ValueError("generate: a multi-process run needs mesh= (rows are split over it)")
        if n % (shards // processes):
            raise ValueError(f"generate: {n} rows on this process are not a multiple of its "
                             f"{shards // processes} row shards")
        # Every process must compile the same program: agree on the prompt bucket.
        longest = int(shd.max_over_hosts(longest))
        shards = shards // processes
    n_padded = -(-n // shards) * shards
    rows = rows + [[pad_id]] * (n_padded - n)  # dummy rows, finished from the start
    bucket = prompt_bucket(longest, min_bucket)
    ids, lengths = left_pad(rows, bucket, pad_id)
    done0 = np.arange(n_padded) >= n
    keys = row_keys(key, n)  # row i's key depends on (key, process, i) only, not on padding
    keys = jnp.concatenate([keys, jnp.repeat(keys[:1], n_padded - n)])

    args = [ids, lengths, done0]
    if mesh is not None:
        row_sharding = shd.batch_sharding(mesh)
        if processes > 1:
            args = shd.to_global(args, mesh)
            keys = jax.random.wrap_key_data(shd.to_global(np.asarray(jax.random.key_data(keys)), mesh))
        else:
            args = [jax.device_put(a, row_sharding) for a in args]
            keys = jax.device_put(keys, row_sharding)
    ids_d, lengths_d, done_d = args
    greedy = temperature == 0.0
    settings = _Settings(  # greedy ignores top-k / top-p: keep them out of the compile key
        max_new_tokens=int(max_new_tokens), temperature=temperature,
        top_k=None if greedy or top_k is None else int(top_k),
        top_p=None if greedy or top_p is None or float(top_p) == 1.0 else float(top_p),
        pad_id=int(pad_id), repetition_penalty=repetition_penalty)
    graphdef, state = nnx.split(model)
    eos_d = jnp.asarray(eos, jnp.int32)
    ends = _phase_ends(settings.max_new_tokens, FIRST_PHASE)
    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
        dec, live = _prefill_program(graphdef, state, ids_d, lengths_d, keys, done_d, eos_d,
                                     settings=settings, mesh=mesh, stop=ends[0])
        for start, stop in zip(ends, ends[1:]):
            # One host sync per phase: a phase is compiled and run only when a row needs it.
            if not _replicated_bool(live):
                break
            dec, live = _phase_program(graphdef, state, dec, lengths_d, keys, eos_d,
                                       settings=settings, mesh=mesh, bucket=bucket, start=start,
                                       stop=stop)
        mask, finish = _outputs(dec.lengths, dec.eos_hit,
                                max_new_tokens=settings.max_new_tokens)
    tokens, out_len, lps, plps = dec.tokens, dec.lengths, dec.logprobs, dec.policy_logprobs
    if processes > 1:
        # Global arrays: process 0's rows, then process 1's, ...; group ids index the global
        # prompts. local_rows(x) gives this process's rows back.
        first = jax.process_index() * n
        return SamplerOutput(
            tokens=tokens, response_mask=mask, lengths=out_len, finish_reason=finish,
            logprobs=lps, policy_logprobs=plps, prompt_ids=ids_d, prompt_lengths=lengths_d,
            group_ids=shd.to_global((first + np.arange(n, dtype=np.int32)) // num_samples, mesh))
    return SamplerOutput(
        tokens=tokens[:n], response_mask=mask[:n], lengths=out_len[:n],
        finish_reason=finish[:n], logprobs=lps[:n], policy_logprobs=plps[:n],
        prompt_ids=jnp.asarray(ids[:n]), prompt_lengths=jnp.asarray(lengths[:n]),
        group_ids=jnp.asarray(np.arange(n, dtype=np.int32) // num_samples))
