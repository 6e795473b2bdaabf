"""One rollout interface for every caller: training's Collector, evaluation, the toy, the tools.

    settings = rollout.Settings(max_new_tokens=512, temperature=0.6, stop_ids=(2,), pad_id=0)
    engine = rollout.make_engine("static", model, settings, mesh=None)
    engine.sync_weights(params)            # the student's current params (once per step)
    out = engine.generate(prompts, num_samples=8, key=key)   # sampling.SamplerOutput

`Settings` holds everything that decides what a rollout is (budget, temperature, top-k / top-p,
repetition penalty, stop ids, pad id); `settings_from_config` builds it from a training config
in one place, so no caller assembles sampler keyword arguments itself.

Engines (config.rollout.engine):
  * "static": scope_jax.sampling.generate, the whole batch decoded together until its last row
    ends (the reference the other engines are tested against).
  * "continuous": ContinuousEngine, continuous batching over a paged KV cache (slots refilled
    as rows end, scheduled by scope_jax.engine.Scheduler; docs/rollout.md). `lower_rollout`
    lowers its programs at pod scale without weights (tools/scale_check.py).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from scope_jax import engine, sampling
from scope_jax import sharding as shd
from scope_jax.models import ModelConfig, PageContext, PagedBatch, abstract_model, hf_config
from scope_jax.models.attention import write_kv
from scope_jax.sharding import DEFAULT_RULES, make_mesh
from scope_jax.sampling import SamplerOutput

ENGINES = ("static", "continuous")
# How the continuous engine's decode blocks read the pages: None (auto: "gather" on CPU, else
# paged_attention's kernel for the backend), "gather" (_gather_decode_program: the live pages
# read once per block), or a paged attention implementation for every step
# (scope_jax.models.attention.PAGED_IMPLEMENTATIONS).
DECODE_IMPLEMENTATIONS = (None, "gather", "xla", "pallas_tpu", "pallas_gpu")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a rollout is. max_new_tokens: the response budget M (every row's cap);
    temperature 0 = greedy; top_k / top_p None = off; repetition_penalty 1.0 = off;
    stop_ids: the ids that end a response (sampling.stop_ids' rule); pad_id: written after a
    row ends and used to pad prompts (always masked out)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0

    def __post_init__(self):
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))


def settings_from_config(cfg, *, model_config=None, tokenizer=None, temperature: float | None = None,
                         checkpoint: str | None = None) -> Settings:
    """The training run's rollout settings from config.sampling: stop ids by sampling.stop_ids
    (tokenizer, model config, `checkpoint`'s generation_config.json, config.sampling.eos_ids),
    pad id the tokenizer's (0 without one: padding is masked everywhere). `temperature`
    overrides config.sampling.temperature (the algorithm's rollout temperature)."""
    s = cfg.sampling
    return settings_for(  # the one stop and pad rule
        model_config, tokenizer, max_new_tokens=int(s.max_new_tokens),
        temperature=float(s.temperature if temperature is None else temperature),
        top_k=int(s.top_k) or None, top_p=None if float(s.top_p) >= 1.0 else float(s.top_p),
        repetition_penalty=float(s.repetition_penalty), eos_ids=s.eos_ids or (), checkpoint=checkpoint)


class RolloutEngine(Protocol):
    """What every engine offers. generate's rows: prompt j's samples at j*num_samples ..
    (j+1)*num_samples-1; `max_new_tokens` (optional, one int per output row) caps each row
    below settings.max_new_tokens; `key` is needed when settings.temperature > 0, and row i's
    tokens depend on (key, i) only. `on_finished(rows, part)`, optional, receives this
    process's rows as they end (their indices among its rows and their SamplerOutput rows,
    numpy): the continuous engine after each block, the static engine once at the end."""

    settings: Settings

    def generate(self, prompts: Sequence[Sequence[int]], *, num_samples: int = 1,
                 key: jax.Array | None = None, max_new_tokens: Sequence[int] | None = None,
                 on_finished=None) -> SamplerOutput: ...

    def sync_weights(self, params) -> None: ...


def row_budgets(max_new_tokens, rows: int, cap: int) -> np.ndarray | None:
    """Per-row budgets int32 [rows] checked against the settings' cap, or None for none given."""
    if max_new_tokens is None:
        return None
    b = np.asarray(max_new_tokens)
    if b.shape != (rows,) or not np.issubdtype(b.dtype, np.integer):
        raise ValueError(f"generate: max_new_tokens must be {rows} ints (one per output row), "
                         f"got shape {b.shape} dtype {b.dtype}")
    if b.min() < 1 or b.max() > cap:
        raise ValueError(f"generate: per-row max_new_tokens must be in [1, {cap}] "
                         f"(settings.max_new_tokens), got min {b.min()} max {b.max()}")
    return b.astype(np.int32)


def cap_rows(out: SamplerOutput, budgets: np.ndarray, pad_id: int) -> SamplerOutput:
    """`out` with row i cut to budgets[i] tokens (finish 'length' where the cut removed its end):
    the per-row budget of an engine that decodes every row to the same budget."""
    b = jnp.asarray(budgets)
    cut = out.lengths > b
    keep = jnp.arange(out.tokens.shape[1])[None, :] < b[:, None]
    mask = out.response_mask & keep
    pad = jnp.asarray(pad_id, out.tokens.dtype)
    return out.replace(
        tokens=jnp.where(keep, out.tokens, pad), response_mask=mask,
        lengths=jnp.minimum(out.lengths, b),
        finish_reason=jnp.where(cut, sampling.FINISH_LENGTH, out.finish_reason),
        logprobs=jnp.where(mask, out.logprobs, 0.0),
        policy_logprobs=jnp.where(mask, out.policy_logprobs, 0.0))


class StaticEngine:
    """sampling.generate behind the engine interface: the whole batch decodes together (per-row
    budgets cut the rows afterwards; they do not shorten the decode)."""

    def __init__(self, model, settings: Settings, mesh=None):
        self.settings, self.mesh = settings, mesh
        self.graphdef, self.params = nnx.split(model)

    def sync_weights(self, params) -> None:
        self.params = params

    def generate(self, prompts, *, num_samples=1, key=None, max_new_tokens=None,
                 on_finished=None) -> SamplerOutput:
        s = self.settings
        budgets = row_budgets(max_new_tokens, len(prompts) * num_samples, s.max_new_tokens)
        out = sampling.generate(
            nnx.merge(self.graphdef, self.params), prompts, num_samples=num_samples,
            max_new_tokens=s.max_new_tokens if budgets is None else int(budgets.max()),
            temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, eos_ids=list(s.stop_ids),
            pad_id=s.pad_id, key=key, repetition_penalty=s.repetition_penalty,
            mesh=self.mesh if self.mesh is not None and self.mesh.size > 1 else None)
        out = out if budgets is None else cap_rows(out, budgets, s.pad_id)
        if on_finished is not None:  # every row ends together: one part, this process's rows
            local = jax.tree.map(shd.local_rows, out)
            on_finished(list(range(local.tokens.shape[0])), local)
        return out


# ----------------------------------------------------------------------------- continuous


def _pow2(n: int, least: int = 1) -> int:
    """The smallest power of two >= max(n, least): compiled shapes stay few (log2 many)."""
    return max(least, 1 << max(0, int(n) - 1).bit_length())


def _bucket(n: int) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12, ... (2^k and 3 * 2^(k-1)) >= n: a decode block's
    page-table width. Two compiled widths per octave, and at most 1.5x the pages needed."""
    p = _pow2(n)
    return 3 * p // 4 if p >= 4 and 3 * p // 4 >= n else p


def _cast(params, dtype):
    """Floating leaves of `params` in `dtype` (the model casts every weight to its compute
    dtype before use, so this changes no result, only the bytes each step reads)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                        else x, params)


def weight_sync(train_shardings, rollout_layout, dtype):
    """The jitted weight sync on the training mesh: params in `train_shardings` -> the compute
    dtype in `rollout_layout`. The cast happens in the training sharding first, so the
    all-gather moves compute-dtype bytes (bf16: half of float32's)."""
    def sync(params):
        cast = jax.tree.map(jax.lax.with_sharding_constraint, _cast(params, dtype),
                            train_shardings)
        return cast

    return jax.jit(sync, out_shardings=rollout_layout)


def _eos(tok: jax.Array, eos_ids: jax.Array) -> jax.Array:
    return jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)


def _logits_at(model, hidden: jax.Array, rows: jax.Array) -> jax.Array:
    """float32 [R, V]: the logits of hidden [T, H]'s rows `rows` int32 [R] only."""
    return model.logits_from_hidden(hidden[rows][None])[0]


@functools.partial(jax.jit, static_argnames=("graphdef", "settings", "key_impl"),
                   donate_argnames=("pages", "seen"))
def _prefill_program(params, pages, seen, ids, slots, lengths, key_data, index, into, *,
                     graphdef, settings, key_impl):
    """Prefills admitted rows' whole contexts, one per row, and samples one token for each.

    ids, slots int32 [R, L]: row r's context (prompt + tokens so far) in its first lengths[r]
    columns (padding after it: slot -1; a padding row has length 0); each row attends within
    itself over its own keys (PagedBatch's whole-sequence layout), R x L^2 scores, never
    (R L)^2; key_data [R, ...] each row's key; index int32 [R] the token number each samples;
    into int32 [R] the slot each row takes in `seen` bool [S, V] (S for padding: dropped;
    seen None: no penalty).
    Returns (pages, seen, token int32 [R], logprob [R], policy logprob [R]).
    """
    model = nnx.merge(graphdef, params)
    r, length = ids.shape
    cols = jnp.arange(length, dtype=jnp.int32)
    real = cols[None, :] < lengths[:, None]
    batch = PagedBatch(slots=slots, segment_ids=real.astype(jnp.int32))
    hidden, pages = model.forward_paged(ids, jnp.broadcast_to(cols, ids.shape), pages, batch)
    last = jnp.maximum(lengths - 1, 0)
    logits = model.logits_from_hidden(hidden[jnp.arange(r), last][None])[0]
    vocab = logits.shape[-1]
    uniforms = (None if settings.temperature == 0.0 else
                sampling.token_uniforms(jax.random.wrap_key_data(key_data, impl=key_impl), index))
    row_seen = None
    if seen is not None:  # the context's tokens (prompt and response so far), as the static sampler
        row_seen = sampling._seen_tokens(ids, real, vocab)
    tok, lp, plp = sampling._pick(logits, uniforms, row_seen, settings)
    if seen is not None:
        row_seen = row_seen.at[jnp.arange(r), tok].set(True)
        seen = seen.at[into].set(row_seen, mode="drop")
    return pages, seen, tok, lp, plp


@functools.partial(jax.jit, static_argnames=("graphdef", "settings", "key_impl", "impl", "block"),
                   donate_argnames=("pages", "seen"))
def _decode_program(params, pages, seen, page_table, prev, generated, budget, kv_len, live,
                    key_data, eos_ids, *, graphdef, settings, key_impl, impl, block):
    """Up to `block` decode steps of all S slots in one lax loop (it stops early when no slot
    is live); a slot that ends (EOS or budget) stops writing and its later tokens are pad.

    page_table int32 [S, n] (n: a power of two covering every live slot's pages, so attention
    gathers live pages only); prev int32 [S] the token to feed; generated int32 [S] tokens so
    far; budget int32 [S]; kv_len int32 [S] tokens in the cache (= prompt + generated - 1);
    live bool [S]; key_data [S, ...]; eos_ids int32 [E].
    Returns (pages, seen, generated [S], live [S], eos_hit [S], tokens int32 [S, block],
    logprobs, policy_logprobs float32 [S, block]): slot s's new tokens are the first
    generated[s] - generated_before[s] columns.
    """
    s, page_size = prev.shape[0], pages[0].shape[1]
    keys = jax.random.wrap_key_data(key_data, impl=key_impl)
    pad = jnp.int32(settings.pad_id)
    zeros = jnp.zeros((s, block), jnp.float32)
    rows = jnp.arange(s)

    def cond(c):
        return (c[0] < block) & jnp.any(c[5])

    def body(carry):
        c, weights = carry
        # The weights travel in the carry and the model is rebuilt here, so the model's NNX
        # code runs at this loop's trace level (as sampling._decode).
        model = nnx.merge(graphdef, weights)
        j, pages, seen, prev, generated, live, kv_len, eos_hit, toks, lps, plps = c
        page = jnp.take_along_axis(page_table, (kv_len // page_size)[:, None], axis=1)[:, 0]
        batch = PagedBatch(
            slots=jnp.where(live, page * page_size + kv_len % page_size, -1),
            kv_lens=jnp.where(live, kv_len + 1, 1), page_indices=page_table,
            cu_q_lens=jnp.arange(s + 1, dtype=jnp.int32), num_seqs=jnp.full((1,), s, jnp.int32),
            implementation=impl)
        hidden, pages = model.forward_paged(prev, kv_len, pages, batch)
        logits = _logits_at(model, hidden, rows)
        uniforms = (None if settings.temperature == 0.0 else
                    sampling.token_uniforms(keys, generated))
        tok, lp, plp = sampling._pick(logits, uniforms, seen, settings)
        tok = jnp.where(live, tok, pad)
        if seen is not None:
            seen = seen.at[rows, tok].set(seen[rows, tok] | live)
        generated = generated + live
        hit = live & _eos(tok, eos_ids)
        toks = toks.at[:, j].set(tok)
        lps = lps.at[:, j].set(jnp.where(live, lp, 0.0))
        plps = plps.at[:, j].set(jnp.where(live, plp, 0.0))
        kv_len = kv_len + live
        prev = jnp.where(live, tok, prev)
        live = live & ~hit & (generated < budget)
        return (j + 1, pages, seen, prev, generated, live, kv_len, eos_hit | hit, toks, lps,
                plps), weights

    init = (jnp.int32(0), pages, seen, prev, generated, live, kv_len, jnp.zeros((s,), bool),
            jnp.full((s, block), pad), zeros, zeros)
    out = jax.lax.while_loop(lambda carry: cond(carry[0]), body, (init, params))[0]
    _, pages, seen, _, generated, live, _, eos_hit, toks, lps, plps = out
    return pages, seen, generated, live, eos_hit, toks, lps, plps


def _page_context(pages, ctx_pages, ctx_row, ctx_len) -> PageContext:
    """The live rows' context, gathered once: pages per layer [P, ps, 2K, D] -> PageContext
    k, v [K, C, D, n * ps] of C chunks of n pool pages each, ctx_pages int32 [C, n]."""
    ks, vs = [], []
    for p in pages:
        g = p[ctx_pages]  # [C, n, ps, 2K, D]
        c, n, ps, h2, d = g.shape
        g = g.reshape(c, n * ps, h2 // 2, 2, d).transpose(3, 2, 0, 4, 1)  # [2, K, C, D, n*ps]
        ks.append(g[0])
        vs.append(g[1])
    return PageContext(k=tuple(ks), v=tuple(vs), row=ctx_row, length=ctx_len)


@functools.partial(jax.jit, static_argnames=("graphdef", "settings", "key_impl", "block"),
                   donate_argnames=("pages", "seen"))
def _gather_decode_program(params, pages, seen, ctx_pages, ctx_row, ctx_len, write_slots, prev,
                           generated, budget, kv_len, live, key_data, eos_ids, *, graphdef,
                           settings, key_impl, block):
    """_decode_program's block with the pages read once (implementation "gather").

    ctx_pages int32 [C, n], ctx_row, ctx_len int32 [C]: the live slots' context (every token
    before kv_len) in chunks of n pages, the slot each chunk belongs to (>= S: padding; None:
    chunk s is slot s's whole context) and its valid tokens (_gather_args); write_slots
    int32 [S, block]: the flat pool slot of slot s's j-th new token (kv_len[s] + j). The other
    arguments and the results are _decode_program's.

    The context chunks are gathered once per block (a PageContext); each step runs the static
    sampler's decode step (Transformer.forward_cached) over a DecodeCache whose `block` slots
    take the block's new tokens, every slot writing step j's at one common column j (one
    dynamic_update_slice, as sampling._decode), and attends over its own context chunks too
    (attention.attend_pages / attend_rows: the work follows the live context, not slots x
    the longest row).
    The new keys and values are scattered into the pages once, at the block's end. On CPU this
    is several times cheaper per step than reading the pages at every step (XLA's gather); it
    holds a copy of the live context for the block, so the engine uses it where memory is the
    host's.
    """
    s = prev.shape[0]
    keys = jax.random.wrap_key_data(key_data, impl=key_impl)
    pad = jnp.int32(settings.pad_id)
    zeros = jnp.zeros((s, block), jnp.float32)
    rows = jnp.arange(s)
    kv0, gen0 = kv_len, generated
    model = nnx.merge(graphdef, params)
    cache = model.init_decode_cache(s, block, dtype=pages[0].dtype)
    cache = cache.replace(context=_page_context(pages, ctx_pages, ctx_row, ctx_len))
    slots_valid = jnp.ones((s, block), bool)  # causality (column <= j) is the model's

    def body(carry):
        c, weights = carry
        model = nnx.merge(graphdef, weights)  # at the loop's trace level (as sampling._decode)
        j, cache, seen, prev, generated, live, eos_hit, toks, lps, plps = c
        logits, cache = model.forward_cached(prev[:, None], (kv0 + j)[:, None], cache, j,
                                             slots_valid)
        uniforms = (None if settings.temperature == 0.0 else
                    sampling.token_uniforms(keys, generated))
        tok, lp, plp = sampling._pick(logits[:, 0], uniforms, seen, settings)
        tok = jnp.where(live, tok, pad)
        if seen is not None:
            seen = seen.at[rows, tok].set(seen[rows, tok] | live)
        generated = generated + live
        hit = live & _eos(tok, eos_ids)
        toks = jax.lax.dynamic_update_slice(toks, tok[:, None], (0, j))
        lps = jax.lax.dynamic_update_slice(lps, jnp.where(live, lp, 0.0)[:, None], (0, j))
        plps = jax.lax.dynamic_update_slice(plps, jnp.where(live, plp, 0.0)[:, None], (0, j))
        prev = jnp.where(live, tok, prev)
        live = live & ~hit & (generated < budget)
        return (j + 1, cache, seen, prev, generated, live, eos_hit | hit, toks, lps, plps), weights

    init = (jnp.int32(0), cache, seen, prev, generated, live, jnp.zeros((s,), bool),
            jnp.full((s, block), pad), zeros, zeros)
    out = jax.lax.while_loop(lambda c: (c[0][0] < block) & jnp.any(c[0][5]), body,
                             (init, params))[0]
    _, cache, seen, _, generated, live, eos_hit, toks, lps, plps = out
    # slot s wrote one token per step it was live: its first (generated - gen0) columns
    written = jnp.arange(block)[None, :] < (generated - gen0)[:, None]
    flat = jnp.where(written, write_slots, -1).reshape(-1)

    def tokens(x):  # [K, S, D, block] -> [S * block, K, D]
        return x.transpose(1, 3, 0, 2).reshape(s * block, x.shape[0], x.shape[2])

    pages = tuple(write_kv(p, tokens(k), tokens(v), flat)
                  for p, k, v in zip(pages, cache.k, cache.v))
    return pages, seen, generated, live, eos_hit, toks, lps, plps


# Context chunk of the "gather" decode (tokens): XLA:CPU's batched [Q, D] @ [D, L] products
# run at about a dense decode step's speed per key from L = 64 up, and at half of it at 16.
GATHER_CHUNK = 64


def _gather_args(table: np.ndarray, owned: np.ndarray, live: np.ndarray, kv: np.ndarray,
                 block: int, ps: int) -> tuple:
    """_gather_decode_program's page arguments (numpy) for the live slots: ctx_pages int32
    [C, n], ctx_row int32 [C] or None, ctx_len int32 [C]; write_slots int32 [S, block] (the
    flat pool slot of each new token, -1 past a slot's pages).

    Two layouts of the context, whichever reads fewer keys (per-row on a tie, as at equal
    lengths: fewer ops per step, attention.attend_rows):
      * chunks: each live row's context in chunks of n = GATHER_CHUNK // ps pages (at least
        1), C a _bucket of the chunks the rows need, ctx_row the slot of each (S: padding);
      * per row: C = S, slot s's context in row s, n pages for the longest one (GATHER_CHUNK
        times a _bucket), ctx_row None.

    table int32 [S, W]: each slot's pages in order (0 past its own), owned int32 [S]: how many
    it owns; live bool [S]; kv int32 [S]: each slot's context length. Vectorised over slots:
    this runs between every two decode blocks."""
    s = live.shape[0]
    n = max(1, GATHER_CHUNK // ps)
    chunk = n * ps
    per_row = np.where(live, -(-kv // chunk), 0)  # [S] chunks each slot's context needs
    k = int(per_row.sum())
    c = _bucket(max(1, k))
    widest = _bucket(max(1, int(per_row.max(initial=0))))
    width = max(table.shape[1], widest * n)
    padded = np.zeros((s, width), np.int32)
    padded[:, :table.shape[1]] = table
    pos = kv[:, None] + np.arange(block)[None, :]  # [S, block] each new token's position
    ok = live[:, None] & (pos < owned[:, None] * ps)
    page = padded[np.arange(s)[:, None], np.minimum(pos // ps, width - 1)]
    write = np.where(ok, page * ps + pos % ps, -1).astype(np.int32)
    if s * widest <= c:
        return padded[:, :widest * n], None, np.where(live, kv, 0).astype(np.int32), write
    row = np.repeat(np.arange(s, dtype=np.int32), per_row)  # [k] the slot of each chunk
    index = np.arange(k) - np.repeat(np.cumsum(per_row) - per_row, per_row)  # chunk in its row
    ctx_pages = np.zeros((c, n), np.int32)
    ctx_row = np.full((c,), s, np.int32)
    ctx_len = np.zeros((c,), np.int32)
    ctx_pages[:k] = padded[row[:, None], index[:, None] * n + np.arange(n)[None, :]]
    ctx_row[:k] = row
    ctx_len[:k] = np.minimum(chunk, kv[row] - chunk * index)
    return ctx_pages, ctx_row, ctx_len, write


def rollout_rules(tensor: int) -> tuple:
    """The rollout weight layout as logical-axis rules: DEFAULT_RULES without the data and
    fsdp axes (nothing is split across a host's engines), and without 'tensor' too when each
    chip is its own engine (tensor == 1: the weights replicated)."""
    drop = {"data", "fsdp"} | ({"tensor"} if tensor == 1 else set())

    def keep(axes):
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        axes = tuple(a for a in axes if a not in drop)
        return None if not axes else (axes[0] if len(axes) == 1 else axes)

    return tuple((name, keep(axes)) for name, axes in DEFAULT_RULES)


def engine_groups(mesh, tensor: int) -> list:
    """This process's engine groups, one mesh each ('tensor' of `tensor` chips, data and fsdp of
    size 1): its devices of `mesh` (all local devices without one) in mesh order, `tensor`
    consecutive ones per group (consecutive along the training mesh's tensor axis, so
    tensor == mesh.tensor keeps each head shard where training has it). Nothing crosses
    groups, hence hosts, while decoding."""
    if mesh is None:
        devices = jax.local_devices()
    else:
        devices = [d for d in np.asarray(mesh.devices).reshape(-1)
                   if d.process_index == jax.process_index()]
    if not devices or len(devices) % tensor:
        raise ValueError(f"rollout.mesh.tensor={tensor} must divide this process's "
                         f"{len(devices)} devices")
    return [make_mesh({"tensor": tensor}, devices=devices[i:i + tensor])
            for i in range(0, len(devices), tensor)]


def _pages_sharding(group, num_kv_heads: int):
    """The page pools' sharding on an engine group: KV heads split over 'tensor' when they
    divide (combined heads 2h, 2h + 1 stay together), else replicated."""
    t = group.shape["tensor"]
    return NamedSharding(group, P(None, None, "tensor", None) if t > 1 and num_kv_heads % t == 0
                         else P())


class ContinuousEngine:
    """Continuous batching over a paged KV cache (scope_jax.engine.Scheduler decides; this
    runs the device programs).

    Each engine group (engine_groups: one chip, or `tensor` chips of one host splitting the
    heads) holds its own copy of the weights in the compute dtype (sync_weights), its own page
    pool and its own Scheduler; a process's rows are split over its groups, which run side by
    side (their blocks are dispatched before any is waited on) and never communicate. On
    CPU, where fake devices share the host's cores, one group serves (`groups` overrides).

    In a group, `slots` rows decode together in jitted blocks of `block` steps; between blocks
    the host retires finished rows (their pages go back to the pool), evicts rows when the
    pool runs short (recomputed later, same tokens), admits pending rows into free slots in
    `order` ("longest": largest per-row budget first; "fifo") and prefills them (one context
    per row, calls of at most `prefill_tokens` padded tokens: prefill_calls). The pool holds
    `kv_tokens` tokens (default: every slot at the longest prompt plus the whole budget); a
    prompt occupies its real tokens' pages only. How a decode block reads the pages is
    `implementation` (DECODE_IMPLEMENTATIONS): the paged attention kernel at every step over
    each live slot's pages (page tables cut to a _bucket of the longest live row's; the
    default off CPU), or "gather" (the default on CPU): the live context gathered once per
    block in chunks, so a step's attention work follows the live tokens. Each row draws its
    randomness from its own key by token number (sampling.token_uniforms), so its tokens do
    not depend on its group, slot, neighbours, the admission order or the implementation
    (up to float rounding).

    generate returns sampling.SamplerOutput as the static engine does (tokens [N,
    settings.max_new_tokens]); `on_finished(rows, part)` (optional) is called after each
    block with this process's output rows that ended in it and their SamplerOutput rows
    (numpy), while the other rows go on.
    """

    def __init__(self, model, settings: Settings, mesh=None, *, slots: int = 32,
                 page_size: int = 16, block: int = 16, kv_tokens: int | None = None,
                 order: str = "longest", prefill_tokens: int = 8192, tensor: int = 1,
                 groups: int | None = None, implementation: str | None = None):
        for name, v in (("slots", slots), ("page_size", page_size), ("block", block),
                        ("prefill_tokens", prefill_tokens), ("tensor", tensor)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"ContinuousEngine: {name} must be an int >= 1, got {v!r}")
        if kv_tokens is not None and (not isinstance(kv_tokens, (int, np.integer))
                                      or kv_tokens < page_size):
            raise ValueError(f"ContinuousEngine: kv_tokens must be None or an int >= page_size "
                             f"({page_size}), got {kv_tokens!r}")
        self.settings, self.mesh = settings, mesh
        self.slots, self.page_size, self.block = int(slots), int(page_size), int(block)
        if implementation not in DECODE_IMPLEMENTATIONS:
            raise ValueError(f"ContinuousEngine: implementation {implementation!r}: expected "
                             f"one of {DECODE_IMPLEMENTATIONS}")
        if implementation is None and jax.default_backend() == "cpu":
            implementation = "gather"  # XLA:CPU's page gather per step costs more than a block's
        self.kv_tokens, self.order, self.implementation = kv_tokens, order, implementation
        self.prefill_tokens, self.tensor = int(prefill_tokens), int(tensor)
        self.groups = engine_groups(mesh, self.tensor)
        if groups is not None:
            self.groups = self.groups[:groups]
        elif jax.default_backend() == "cpu":
            self.groups = self.groups[:1]
        self.graphdef, params = nnx.split(model)
        self.config, self.dtype = model.config, model.dtype
        rules = rollout_rules(self.tensor)
        self._layouts = [nnx.to_pure_dict(shd.model_shardings(model, g, rules))
                         for g in self.groups]
        # The rollout layout on the training mesh: what a multi-host sync reshards to first.
        self._train_layout = (None if mesh is None else
                              nnx.to_pure_dict(shd.model_shardings(model, mesh, rules)))
        self._pages: dict[int, tuple] = {}
        self.last_sync: dict[str, float] = {}
        self.last_stats: dict[str, int] = {}
        self.sync_weights(params)

    def sync_weights(self, params) -> None:
        """Casts the student's params to the compute dtype and places a copy on every engine
        group (the rollout layout); once per step, never inside decoding. With params spread
        over several processes, they are first resharded on the training mesh to the rollout
        layout (the step's one all-gather) and each group takes its own process's shards.
        Records {"bytes": the cast params' bytes (one copy), "seconds"} in self.last_sync."""
        t0 = time.perf_counter()
        if isinstance(params, nnx.State):  # as nnx.split gives them; the layouts are plain dicts
            params = nnx.to_pure_dict(params)
        if all(x.is_fully_addressable for x in jax.tree.leaves(params)):
            cast = _cast(params, self.dtype)
            self.params = [jax.device_put(cast, lay) for lay in self._layouts]
        else:
            cast = weight_sync(jax.tree.map(lambda x: x.sharding, params), self._train_layout,
                               self.dtype)(params)
            self.params = [jax.tree.map(_local_copy, cast, lay) for lay in self._layouts]
        jax.block_until_ready(self.params)
        self.last_sync = {"bytes": float(sum(x.nbytes for x in jax.tree.leaves(cast))),
                          "seconds": time.perf_counter() - t0}

    def _pool(self, g: int, num_pages: int):
        """Group g's page pools (allocated once per size; donated through every program)."""
        pages = self._pages.pop(g, None)
        if pages is None or pages[0].shape[0] != num_pages:
            pages = None
            model = nnx.merge(self.graphdef, self.params[g])
            sh = _pages_sharding(self.groups[g], self.config.num_kv_heads)
            pages = jax.jit(lambda: model.init_pages(num_pages, self.page_size),
                            out_shardings=(sh,) * self.config.num_layers)()
        return pages

    def generate(self, prompts, *, num_samples=1, key=None, max_new_tokens=None,
                 on_finished=None) -> SamplerOutput:
        s, cfg = self.settings, self.config
        prompts = sampling._check_prompts(prompts, int(cfg.vocab_size))
        if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
            raise ValueError(f"generate: num_samples must be an int >= 1, got {num_samples!r}")
        if s.temperature > 0 and key is None:
            raise ValueError("generate: temperature > 0 needs a PRNG key (key=jax.random.key(seed))")
        rows = [p for p in prompts for _ in range(num_samples)]
        n, m = len(rows), s.max_new_tokens
        budgets = row_budgets(max_new_tokens, n, m)
        budgets = np.full((n,), m, np.int32) if budgets is None else budgets
        keys = sampling.row_keys(key, n)
        run = _Run(rows=rows, budgets=budgets, key_data=np.asarray(jax.random.key_data(keys)),
                   key_impl=jax.random.key_impl(keys), num_samples=num_samples,
                   tokens=np.full((n, m), s.pad_id, np.int32), lps=np.zeros((n, m), np.float32),
                   plps=np.zeros((n, m), np.float32), count=np.zeros((n,), np.int32),
                   eos_hit=np.zeros((n,), bool), on_finished=on_finished)
        # The process's rows, contiguous chunks over its groups; the groups' blocks interleave.
        chunks = np.array_split(np.arange(n), len(self.groups))
        loops = [self._group_loop(g, ids.tolist(), run) for g, ids in enumerate(chunks) if len(ids)]
        stats = {}
        while loops:
            for loop in list(loops):
                try:
                    next(loop)
                except StopIteration as stop:
                    loops.remove(loop)
                    for k, v in stop.value.items():
                        stats[k] = stats.get(k, 0) + v
        self.last_stats = stats
        return self._global(self._output(range(n), run), run)

    def _group_loop(self, g: int, row_ids: list[int], run: "_Run"):
        """Generates rows `row_ids` on group g; a generator that yields once a decode block is
        dispatched (so the next group's can be before this one is waited on). Returns the
        group's counters."""
        s, group = self.settings, self.groups[g]
        m, ps = s.max_new_tokens, self.page_size
        slots = min(self.slots, _pow2(len(row_ids)))
        longest = max(len(run.rows[r]) for r in row_ids)
        per_slot = engine.pages_for(longest + m, ps)
        num_pages = (self.kv_tokens // ps if self.kv_tokens is not None else slots * per_slot)
        sched = engine.Scheduler(slots=slots, num_pages=num_pages, page_size=ps,
                                 block=self.block, order=self.order)
        for r in row_ids:
            sched.add(r, len(run.rows[r]), int(run.budgets[r]))
        replicated = NamedSharding(group, P())

        def put(*xs):  # one transfer call for a program's host arrays
            return jax.device_put(tuple(None if x is None else np.asarray(x) for x in xs),
                                  replicated)

        pages = self._pool(g, num_pages)
        seen = (None if s.repetition_penalty == 1.0 else
                jax.device_put(np.zeros((slots, int(self.config.vocab_size)), bool), replicated))
        eos_ids, = put(np.asarray(list(s.stop_ids), np.int32))
        stops = set(s.stop_ids)
        gather = self.implementation == "gather"
        static = dict(graphdef=self.graphdef, settings=_program_settings(s), key_impl=run.key_impl)
        table = np.zeros((slots, per_slot), np.int32)
        owned = np.zeros((slots,), np.int32)  # pages each slot holds
        slot_row = np.full((slots,), -1)
        live = np.zeros((slots,), bool)
        count = run.count
        stats = {"blocks": 0, "decode_steps": 0, "prefills": 0, "prefill_tokens": 0}
        while not sched.done():
            for p in sched.reserve():
                live[p.slot], slot_row[p.slot] = False, -1  # its tokens so far stay in `run`
            while admitted := sched.admit(self.prefill_tokens):
                for call in prefill_calls([a.context for a in admitted], self.prefill_tokens):
                    part = [admitted[i] for i in call]
                    args = _prefill_args(part, run, ps, s.pad_id)
                    with jax.set_mesh(group):
                        pages, seen, tok, lp, plp = _prefill_program(
                            self.params[g], pages, seen, *put(*args), **static)
                    tok, lp, plp = jax.device_get((tok, lp, plp))
                    stats["prefills"] += 1
                    stats["prefill_tokens"] += sum(a.context for a in part)
                    for i, a in enumerate(part):
                        run.append(a.row, tok[i:i + 1], lp[i:i + 1], plp[i:i + 1])
                        slot_row[a.slot] = a.row
                        run.eos_hit[a.row] = int(tok[i]) in stops
                        live[a.slot] = (not run.eos_hit[a.row]
                                        and count[a.row] < run.budgets[a.row])
            if live.any():
                r = np.maximum(slot_row, 0)
                gen0 = count[r] * (slot_row >= 0)
                prev = run.tokens[r, np.maximum(gen0 - 1, 0)]
                kv = run.prompt_lens[r] + count[r] - 1
                rest = (prev, gen0, run.budgets[r].astype(np.int32), kv, live, run.key_data[r])
                owned[:] = 0
                for slot in sched.live:
                    pg = sched.pages(slot)
                    table[slot, :len(pg)], table[slot, len(pg):], owned[slot] = pg, 0, len(pg)
                if gather:
                    where = _gather_args(table, owned, live, kv, self.block, ps)
                else:
                    width = _bucket(int(owned[live].max()))
                    where = (table[:, :width],)
                args = (self.params[g], pages, seen, *put(*where, *rest), eos_ids)
                with jax.set_mesh(group):
                    if gather:
                        pages, seen, *res = _gather_decode_program(*args, block=self.block,
                                                                   **static)
                    else:
                        pages, seen, *res = _decode_program(*args, block=self.block,
                                                            impl=self.implementation, **static)
                yield  # the other groups dispatch their blocks before this one is read
                gen1, live1, hit1, btok, blp, bplp = jax.device_get(res)
                stats["blocks"] += 1
                stats["decode_steps"] += int(np.max(gen1 - gen0))
                for sl in np.flatnonzero(live):
                    k = int(gen1[sl] - gen0[sl])
                    run.append(slot_row[sl], btok[sl, :k], blp[sl, :k], bplp[sl, :k])
                    run.eos_hit[slot_row[sl]] = bool(hit1[sl])
                live &= live1
            finished = sched.advance({row: (int(count[row]), not live[slot])
                                      for slot, row in sched.live.items()})
            slot_row[np.isin(slot_row, finished)] = -1
            if run.on_finished is not None and finished:
                run.on_finished(list(finished), self._output(finished, run, local=True))
        self._pages[g] = pages
        stats["preemptions"] = sched.preemptions
        return stats

    def _output(self, which, run: "_Run", *, local=False) -> SamplerOutput:
        """SamplerOutput of this process's output rows `which` (numpy)."""
        s = self.settings
        which = list(which)
        m, k = s.max_new_tokens, len(which)
        tokens, lp, plp, lengths = (x[which] for x in (run.tokens, run.lps, run.plps, run.count))
        ids, plen = sampling.left_pad([run.rows[r] for r in which], run.bucket, s.pad_id)
        return SamplerOutput(
            tokens=tokens, response_mask=np.arange(m)[None, :] < lengths[:, None],
            lengths=lengths,
            finish_reason=np.where(run.eos_hit[which], sampling.FINISH_EOS,
                                   sampling.FINISH_LENGTH).astype(np.int32),
            logprobs=lp, policy_logprobs=plp, prompt_ids=ids, prompt_lengths=plen,
            group_ids=(run.first + np.asarray(which, np.int32)) // run.num_samples)

    def _global(self, out: SamplerOutput, run: "_Run") -> SamplerOutput:
        """The whole output as jax arrays: this process's rows in one process; with several,
        global arrays over the mesh's batch axes, process 0's rows first (as the static
        sampler's; sampling.local_rows gives a process its own rows back)."""
        if jax.process_count() == 1:
            return jax.tree.map(jnp.asarray, out)
        return shd.to_global(out, self.mesh)


@dataclasses.dataclass
class _Run:
    """One generate call's rows and what they produced so far (host side, all groups)."""

    rows: list
    budgets: np.ndarray
    key_data: np.ndarray
    key_impl: object
    num_samples: int
    tokens: np.ndarray  # int32 [N, M] each row's tokens so far (pad after them)
    lps: np.ndarray     # float32 [N, M] their log-probs (0 after them)
    plps: np.ndarray    # float32 [N, M] their policy log-probs
    count: np.ndarray   # int32 [N] tokens so far
    eos_hit: np.ndarray
    on_finished: object = None
    bucket: int = 0  # prompt_ids' width (agreed by every process)
    first: int = 0   # this process's first row in the global output

    def __post_init__(self):
        longest = max(len(p) for p in self.rows)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            longest = int(np.max(multihost_utils.process_allgather(np.int32(longest))))
            self.first = jax.process_index() * len(self.rows)
        self.bucket = sampling.prompt_bucket(longest)
        self.prompt_lens = np.asarray([len(p) for p in self.rows], np.int32)

    def append(self, row, tok, lp, plp):
        """Row `row`'s next len(tok) tokens and their log-probs."""
        c, k = self.count[row], len(tok)
        self.tokens[row, c:c + k], self.lps[row, c:c + k], self.plps[row, c:c + k] = tok, lp, plp
        self.count[row] = c + k

    def context(self, row) -> list[int]:
        """Row `row`'s prompt and tokens so far."""
        return self.rows[row] + self.tokens[row, :self.count[row]].tolist()


def _local_copy(x: jax.Array, sharding) -> jax.Array:
    """`x` (already in the rollout layout on the training mesh) as an array on `sharding`'s
    devices, built from this process's shards of it (no transfer)."""
    shards = {sh.device: sh.data for sh in x.addressable_shards}
    return jax.make_array_from_single_device_arrays(
        x.shape, sharding, [shards[d] for d in sharding.addressable_devices_indices_map(x.shape)])


def _program_settings(s: Settings) -> "sampling._Settings":
    """The compile-time settings of the engine's programs (greedy ignores top-k / top-p)."""
    greedy = s.temperature == 0.0
    return sampling._Settings(
        max_new_tokens=s.max_new_tokens, temperature=float(s.temperature),
        top_k=None if greedy else s.top_k,
        top_p=None if greedy or s.top_p in (None, 1.0) else float(s.top_p),
        pad_id=int(s.pad_id), repetition_penalty=float(s.repetition_penalty))


def prefill_calls(contexts: Sequence[int], prefill_tokens: int) -> list[list[int]]:
    """The prefill calls of one admission: indices into `contexts` (token counts), longest
    first, grouped so that each call's padded shape (rows rounded up to a power of two x its
    longest context rounded up to a power of two, at least 16) stays within prefill_tokens;
    a context longer than that goes alone. Shapes stay few and bounded: a long recomputed
    context never pads the short ones to its length."""
    order = sorted(range(len(contexts)), key=lambda i: -contexts[i])
    calls: list[list[int]] = []
    for i in order:
        if calls and _pow2(len(calls[-1]) + 1) * _pow2(contexts[calls[-1][0]], 16) <= prefill_tokens:
            calls[-1].append(i)
        else:
            calls.append([i])
    return calls


def _prefill_args(admitted, run: _Run, ps: int, pad_id: int) -> tuple:
    """_prefill_program's array arguments (numpy) for the admitted rows' whole contexts
    (prompt + tokens so far), one per row: [R, L] with R and L powers of two (L >= 16)."""
    contexts = [run.context(a.row) for a in admitted]
    r, length = _pow2(len(admitted)), _pow2(max(len(c) for c in contexts), 16)
    ids = np.full((r, length), pad_id, np.int32)
    flat = np.full((r, length), -1, np.int32)
    lengths = np.zeros((r,), np.int32)
    index = np.zeros((r,), np.int32)
    into = np.full((r,), np.iinfo(np.int32).max, np.int32)  # out of range: dropped
    kd = np.zeros((r,) + run.key_data.shape[1:], run.key_data.dtype)
    for i, (a, c) in enumerate(zip(admitted, contexts)):
        j = np.arange(len(c))
        ids[i, :len(c)] = c
        flat[i, :len(c)] = np.asarray(a.pages)[j // ps] * ps + j % ps
        lengths[i], index[i], into[i], kd[i] = len(c), a.generated, a.slot, run.key_data[a.row]
    return ids, flat, lengths, kd, index, into


def lower_rollout(cfg, *, mesh=None) -> dict:
    """Lowers, without weights, the programs the continuous engine compiles for a training
    step of `cfg`: {"prefill", "decode_block", "weight_sync"} -> jax.stages.Lowered.

    The student's architecture comes from cfg.student's config.json or cfg.arch.student (as
    train.lower_step; override its depth there); compute dtype config.model.dtype. The
    rollout layout is config.rollout.mesh: the decode block and the prefill are lowered for
    one engine group (its first `tensor` chips of `mesh`, default make_mesh(config.mesh)), with
    the weights in that layout and a page pool of config.rollout.kv_tokens_per_chip tokens;
    slots = min(config.rollout.slots, the rollouts per group rounded up to a power of two);
    the decode block at its widest page table (one row of data.max_prompt_len +
    sampling.max_new_tokens tokens) in the paged program the pod runs (not the CPU's "gather"
    one), the prefill at its widest first-admission call (prompts at data.max_prompt_len, as
    many rows as prefill_calls puts in config.rollout.prefill_tokens). The weight sync is the jit that casts the student's params in the training sharding on `mesh`
    to the compute dtype in the rollout layout there (the step's one weight all-gather).
    """
    mesh = shd.make_mesh(cfg.mesh) if mesh is None else mesh
    r = cfg.rollout
    t = rollout_tensor(cfg)
    if mesh.size % t:
        raise ValueError(f"config.rollout.mesh.tensor={t} must divide the mesh's {mesh.size} chips")
    graphdef, params, train_shardings = abstract_model(cfg, "student", mesh)
    arch = hf_config(cfg, "student")
    mc = ModelConfig.from_hf(arch, source="config.arch.student")
    dtype = jnp.dtype(cfg.model.dtype)
    rules = rollout_rules(t)
    model = nnx.merge(graphdef, params)  # abstract: shapes and metadata only
    group = shd.make_mesh({"tensor": t}, devices=np.asarray(mesh.devices).reshape(-1)[:t])
    sd = jax.ShapeDtypeStruct

    def abstract(tree, layout):
        return jax.tree.map(lambda x, sh: sd(x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating)
                                             else x.dtype, sharding=sh), tree, layout)

    train_layout = nnx.to_pure_dict(shd.model_shardings(model, mesh, rules))
    sync = weight_sync(train_shardings, train_layout, dtype)
    with jax.set_mesh(mesh):
        lowered = {"weight_sync": sync.lower(params)}
    rparams = abstract(params, nnx.to_pure_dict(shd.model_shardings(model, group, rules)))
    settings = settings_from_config(cfg, model_config=mc)
    rollouts = int(cfg.prompts_per_step) * int(cfg.num_samples)
    slots = min(int(r.slots), _pow2(-(-rollouts // (mesh.size // t))))
    ps = int(r.page_size)
    num_pages = int(r.kv_tokens_per_chip) // ps
    width = engine.pages_for(int(cfg.data.max_prompt_len) + settings.max_new_tokens, ps)
    kv_sh = _pages_sharding(group, mc.num_kv_heads)
    pages = tuple(sd((num_pages, ps, 2 * mc.num_kv_heads, mc.head_dim), dtype, sharding=kv_sh)
                  for _ in range(mc.num_layers))
    rep = NamedSharding(group, P())
    key_impl = jax.random.key_impl(jax.random.key(0))
    key_shape = jax.random.key_data(jax.random.key(0)).shape

    def arr(shape, dt=jnp.int32):
        return sd(shape, dt, sharding=rep)

    seen = None if settings.repetition_penalty == 1.0 else arr((slots, mc.vocab_size), jnp.bool_)
    static = dict(graphdef=graphdef, settings=_program_settings(settings), key_impl=key_impl)
    keys = arr((slots,) + key_shape, jnp.uint32)
    vec = arr((slots,))
    # the widest first-admission prefill: prompts at the longest, as many rows as prefill_calls
    # lets one call take
    prompt = _pow2(int(cfg.data.max_prompt_len), 16)
    prefill_rows = max(1, min(slots, 1 << max(0, (int(r.prefill_tokens) // prompt).bit_length() - 1)))
    with jax.set_mesh(group):
        lowered["decode_block"] = _decode_program.lower(
            rparams, pages, seen, arr((slots, width)), vec, vec, vec, vec, arr((slots,), jnp.bool_),
            keys, arr((len(settings.stop_ids),)), block=int(r.block), impl=None, **static)
        rows = arr((prefill_rows, prompt))
        rvec = arr((prefill_rows,))
        lowered["prefill"] = _prefill_program.lower(
            rparams, pages, seen, rows, rows, rvec, arr((prefill_rows,) + key_shape, jnp.uint32),
            rvec, rvec, **static)
    return lowered


def rollout_tensor(cfg) -> int:
    """config.rollout.mesh.tensor resolved: -1 is the training mesh's tensor axis."""
    t = int(cfg.rollout.mesh.tensor)
    return int(cfg.mesh.get("tensor", 1)) if t == -1 else t


def engine_options(cfg) -> dict:
    """make_engine's options for config.rollout.engine (none for the static engine)."""
    r = cfg.rollout
    if r.engine == "static":
        return {}
    return dict(slots=int(r.slots), page_size=int(r.page_size), block=int(r.block),
                kv_tokens=int(r.kv_tokens_per_chip), order=str(r.order),
                prefill_tokens=int(r.prefill_tokens), tensor=rollout_tensor(cfg))


def engine_from_config(cfg, model, settings: Settings, mesh=None) -> RolloutEngine:
    """make_engine(config.rollout.engine, ...) with config.rollout's options."""
    return make_engine(cfg.rollout.engine, model, settings, mesh, **engine_options(cfg))


def make_engine(kind: str, model, settings: Settings, mesh=None, **options) -> RolloutEngine:
    """The rollout engine `kind` (one of ENGINES) for `model` (its current weights; replace them
    with sync_weights) under `settings`, on `mesh` (None: one device). `options` go to the
    continuous engine (slots, page_size, block, kv_tokens, order, implementation; see
    ContinuousEngine); the static engine takes none."""
    if kind == "static":
        if options:
            raise ValueError(f"make_engine: the static engine takes no options, got {sorted(options)}")
        return StaticEngine(model, settings, mesh)
    if kind == "continuous":
        return ContinuousEngine(model, settings, mesh, **options)
    raise ValueError(f"rollout engine {kind!r}: expected one of {ENGINES}")


# --------------------------------------------------------------------------------------------
# The one generate-and-verify path (the Collector, evaluation, the toy, tools/premise.py).
# --------------------------------------------------------------------------------------------


class Done:
    """An already computed value behind a Future's result(): generate_and_verify's default
    `submit` (verification on the calling thread, in order)."""

    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value

    def done(self) -> bool:
        return True


def _run_now(fn, *args):
    return Done(fn(*args))


@dataclasses.dataclass
class Verified:
    """One generate_and_verify call: `out` the engine's SamplerOutput (every row it generated,
    filler rows included); `texts` this process's responses of the real prompts, decoded with
    special tokens skipped (row j * num_samples + s: prompt j's sample s); `pending`.result()
    their VerifyResults in the same order (a Future when verification runs elsewhere)."""

    out: SamplerOutput
    texts: list[str]
    pending: object

    def results(self) -> list:
        return self.pending.result()


def generate_and_verify(engine: RolloutEngine, prompts: Sequence[Sequence[int]], golds: Sequence,
                        verifier, tokenizer, *, num_samples: int = 1, key: jax.Array | None = None,
                        submit=_run_now, on_finished=None) -> Verified:
    """Samples `num_samples` responses to each prompt with `engine` (its Settings: budget,
    temperature, stop ids, pad id), decodes them and verifies each against its prompt's gold.

    Args:
      prompts: token id lists; the first len(golds) are real, any after them are filler
        (copies that keep a batch's shape fixed): generated, never decoded or verified.
      golds: one gold answer per real prompt (as the verifier takes them).
      verifier: an object with verify_batch(texts, golds) -> list[VerifyResult]
        (scope_jax.verifiers.Verifier, InlineVerifier).
      submit: submit(fn, *args) -> an object whose result() is fn(*args): where verification
        runs (default: now, on this thread; a thread pool's submit overlaps it with the rest
        of generation).
      on_finished: also called with the engine's finished parts (rows, SamplerOutput part),
        after their verification is submitted (the Collector's teacher scoring).
    Rows are verified as the engine hands them out (engine.generate's on_finished: the
    continuous engine after every block, with the rows that ended in it, while the others go
    on; the static engine once, at the end). In a multi-process run each process passes its
    own prompts and golds, and decodes and verifies its own rows.
    """
    if len(golds) > len(prompts):
        raise ValueError(f"generate_and_verify: {len(golds)} golds for {len(prompts)} prompts")
    real = len(golds) * num_samples
    row_golds = [g for g in golds for _ in range(num_samples)]
    texts: list = [None] * real
    parts = []

    def finished(rows, part):
        mine = [(i, r) for i, r in enumerate(rows) if r < real]
        if mine:
            responses = sampling.response_lists(part)
            decoded = tokenizer.batch_decode([responses[i] for i, _ in mine],
                                             skip_special_tokens=True)
            for (_, r), t in zip(mine, decoded):
                texts[r] = t
            ids = [r for _, r in mine]
            parts.append((ids, submit(verifier.verify_batch, decoded, [row_golds[r] for r in ids])))
        if on_finished is not None:
            on_finished(rows, part)

    out = engine.generate(prompts, num_samples=num_samples, key=key, on_finished=finished)
    return Verified(out=out, texts=texts, pending=_InRowOrder(parts, real))


class _InRowOrder:
    """Verification submitted in parts (row indices, a Future of their results) behind one
    result(): every row's VerifyResult in row order."""

    def __init__(self, parts: list, rows: int):
        self._parts, self._rows = parts, rows

    def result(self) -> list:
        out = [None] * self._rows
        for rows, pending in self._parts:
            for r, res in zip(rows, pending.result()):
                out[r] = res
        return out

    def done(self) -> bool:
        return all(p.done() for _, p in self._parts)


def settings_for(model_config, tokenizer, *, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                 eos_ids: Sequence[int] = (), checkpoint: str | None = None) -> Settings:
    """Settings for a caller without a training config (evaluation, the toy, the tools), under
    the same rules as settings_from_config: stop ids by sampling.stop_ids (tokenizer, model
    config, `checkpoint`'s generation_config.json, `eos_ids`), pad id the tokenizer's, else 0."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return Settings(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                    top_k=top_k or None, top_p=top_p, repetition_penalty=float(repetition_penalty),
                    stop_ids=tuple(sampling.stop_ids(model_config, tokenizer, eos_ids, checkpoint=checkpoint)),
                    pad_id=0 if pad is None else int(pad))
