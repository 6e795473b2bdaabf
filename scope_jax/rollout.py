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

from scope_jax import engine, sampling
from scope_jax.models.model import PagedBatch
from scope_jax.sampling import SamplerOutput

ENGINES = ("static", "continuous")


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
    stops = sampling.stop_ids(model_config, tokenizer, s.eos_ids or (), checkpoint=checkpoint)
    pad = getattr(tokenizer, "pad_token_id", None)
    return Settings(
        max_new_tokens=int(s.max_new_tokens),
        temperature=float(s.temperature if temperature is None else temperature),
        top_k=int(s.top_k) or None, top_p=None if float(s.top_p) >= 1.0 else float(s.top_p),
        repetition_penalty=float(s.repetition_penalty), stop_ids=tuple(stops),
        pad_id=0 if pad is None else int(pad))


class RolloutEngine(Protocol):
    """What every engine offers. generate's rows: prompt j's samples at j*num_samples ..
    (j+1)*num_samples-1; `max_new_tokens` (optional, one int per output row) caps each row
    below settings.max_new_tokens; `key` is needed when settings.temperature > 0, and row i's
    tokens depend on (key, i) only."""

    settings: Settings

    def generate(self, prompts: Sequence[Sequence[int]], *, num_samples: int = 1,
                 key: jax.Array | None = None,
                 max_new_tokens: Sequence[int] | None = None) -> SamplerOutput: ...

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

    def generate(self, prompts, *, num_samples=1, key=None, max_new_tokens=None) -> SamplerOutput:
        s = self.settings
        budgets = row_budgets(max_new_tokens, len(prompts) * num_samples, s.max_new_tokens)
        out = sampling.generate(
            nnx.merge(self.graphdef, self.params), prompts, num_samples=num_samples,
            max_new_tokens=s.max_new_tokens if budgets is None else int(budgets.max()),
            temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, eos_ids=list(s.stop_ids),
            pad_id=s.pad_id, key=key, repetition_penalty=s.repetition_penalty,
            mesh=self.mesh if self.mesh is not None and self.mesh.size > 1 else None)
        return out if budgets is None else cap_rows(out, budgets, s.pad_id)


# ----------------------------------------------------------------------------- continuous


def _pow2(n: int, least: int = 1) -> int:
    """The smallest power of two >= max(n, least): compiled shapes stay few (log2 many)."""
    return max(least, 1 << max(0, int(n) - 1).bit_length())


def _cast(params, dtype):
    """Floating leaves of `params` in `dtype` (the model casts every weight to its compute
    dtype before use, so this changes no result, only the bytes each step reads)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                        else x, params)


def _eos(tok: jax.Array, eos_ids: jax.Array) -> jax.Array:
    return jnp.any(tok[:, None] == eos_ids[None, :], axis=-1)


def _logits_at(model, hidden: jax.Array, rows: jax.Array) -> jax.Array:
    """float32 [R, V]: the logits of hidden [T, H]'s rows `rows` int32 [R] only."""
    return model.logits_from_hidden(hidden[rows][None])[0]


@functools.partial(jax.jit, static_argnames=("graphdef", "settings", "key_impl", "impl"),
                   donate_argnames=("pages", "seen"))
def _prefill_program(params, pages, seen, ids, positions, slots, segment_ids, kv_lens,
                     page_indices, cu_q_lens, num_seqs, key_data, index, into, *, graphdef,
                     settings, key_impl, impl):
    """Prefills the admitted rows' whole contexts and samples one token for each.

    ids, positions, slots, segment_ids int32 [T]: the contexts (prompt + tokens so far) of up
    to S rows laid end to end (padding after them: slot -1, segment 0); every context starts
    at its first token, so attention runs within each one over its own keys (PagedBatch);
    kv_lens int32 [S] their lengths; page_indices int32 [S, 1] (unread: the pages are only
    written); cu_q_lens int32 [S + 1]; num_seqs int32 [1]; key_data [S, ...]
    each row's key; index int32 [S] the token number each samples; into int32 [S] the slot
    each row takes (S for padding: dropped) in `seen` bool [S, V] (None: no penalty).
    Returns (pages, seen, token int32 [S], logprob [S], policy logprob [S]).
    """
    model = nnx.merge(graphdef, params)
    batch = PagedBatch(slots=slots, kv_lens=kv_lens, page_indices=page_indices,
                       cu_q_lens=cu_q_lens, num_seqs=num_seqs, segment_ids=segment_ids,
                       implementation=impl)
    hidden, pages = model.forward_paged(ids, positions, pages, batch)
    logits = _logits_at(model, hidden, jnp.maximum(cu_q_lens[1:] - 1, 0))
    vocab = logits.shape[-1]
    uniforms = (None if settings.temperature == 0.0 else
                sampling.token_uniforms(jax.random.wrap_key_data(key_data, impl=key_impl), index))
    row_seen = None
    if seen is not None:  # the context's tokens (prompt and response so far), as the static sampler
        t = ids.shape[0]
        seq = jnp.searchsorted(cu_q_lens[1:], jnp.arange(t), side="right")
        real = jnp.arange(t) < cu_q_lens[num_seqs[0]]
        row_seen = jnp.zeros((kv_lens.shape[0], vocab + 1), bool).at[
            jnp.where(real, seq, 0), jnp.where(real, ids, vocab)].set(True)[:, :vocab]
    tok, lp, plp = sampling._pick(logits, uniforms, row_seen, settings)
    if seen is not None:
        row_seen = row_seen.at[jnp.arange(tok.shape[0]), tok].set(True)
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
    model = nnx.merge(graphdef, params)
    s, page_size = prev.shape[0], pages[0].shape[1]
    keys = jax.random.wrap_key_data(key_data, impl=key_impl)
    pad = jnp.int32(settings.pad_id)
    zeros = jnp.zeros((s, block), jnp.float32)
    rows = jnp.arange(s)

    def cond(c):
        return (c[0] < block) & jnp.any(c[5])

    def body(c):
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
        return j + 1, pages, seen, prev, generated, live, kv_len, eos_hit | hit, toks, lps, plps

    init = (jnp.int32(0), pages, seen, prev, generated, live, kv_len, jnp.zeros((s,), bool),
            jnp.full((s, block), pad), zeros, zeros)
    out = jax.lax.while_loop(cond, body, init)
    _, pages, seen, _, generated, live, _, eos_hit, toks, lps, plps = out
    return pages, seen, generated, live, eos_hit, toks, lps, plps


class ContinuousEngine:
    """Continuous batching over a paged KV cache (scope_jax.engine.Scheduler decides; this
    runs the device programs).

    `slots` rows decode together in jitted blocks of `block` steps; between blocks the host
    retires finished rows (their pages go back to the pool), evicts rows when the pool runs
    short (they are recomputed later, same tokens), admits pending rows into free slots and
    prefills them (one ragged call, contexts padded to a power-of-two token count). The pool
    holds `kv_tokens` tokens (default: every slot at the longest prompt + the whole budget);
    a prompt occupies its real tokens' pages only. Each row draws its randomness from its own
    key by token number (sampling.token_uniforms), so its tokens do not depend on its slot,
    its neighbours or the admission order.

    generate returns sampling.SamplerOutput as the static engine does (tokens [N,
    settings.max_new_tokens]); `on_finished(rows, part)` (optional) is called after each block
    with the output rows that ended in it and their SamplerOutput rows (numpy), while the
    other rows go on.
    """

    def __init__(self, model, settings: Settings, mesh=None, *, slots: int = 32,
                 page_size: int = 16, block: int = 16, kv_tokens: int | None = None,
                 order: str = "fifo", prefill_tokens: int = 8192, tensor: int = 1,
                 implementation: str | None = None):
        for name, v in (("slots", slots), ("page_size", page_size), ("block", block)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"ContinuousEngine: {name} must be an int >= 1, got {v!r}")
        if kv_tokens is not None and (not isinstance(kv_tokens, (int, np.integer))
                                      or kv_tokens < page_size):
            raise ValueError(f"ContinuousEngine: kv_tokens must be None or an int >= page_size "
                             f"({page_size}), got {kv_tokens!r}")
        if mesh is not None and mesh.size > 1:
            raise NotImplementedError(
                "ContinuousEngine: a mesh of several devices is not supported yet (each host's "
                "engine runs on one device); pass mesh=None or a one-device mesh")
        self.settings, self.mesh = settings, mesh
        self.slots, self.page_size, self.block = int(slots), int(page_size), int(block)
        self.kv_tokens, self.order, self.implementation = kv_tokens, order, implementation
        self.prefill_tokens = int(prefill_tokens)
        self.graphdef, params = nnx.split(model)
        self.config, self.dtype = model.config, model.dtype
        self.params = _cast(params, self.dtype)
        self._pages = None
        self.last_sync: dict[str, float] = {}
        self.last_stats: dict[str, int] = {}

    def sync_weights(self, params) -> None:
        """Takes the student's current params, cast once to the compute dtype; records the
        bytes and seconds it took in self.last_sync."""
        t0 = time.perf_counter()
        self.params = jax.block_until_ready(_cast(params, self.dtype))
        self.last_sync = {"bytes": float(sum(x.nbytes for x in jax.tree.leaves(self.params))),
                          "seconds": time.perf_counter() - t0}

    def _pool(self, num_pages: int):
        """The page pools (allocated once per size; donated through every program)."""
        if self._pages is None or self._pages[0].shape[0] != num_pages:
            model = nnx.merge(self.graphdef, self.params)
            self._pages = model.init_pages(num_pages, self.page_size)
        return self._pages

    def generate(self, prompts, *, num_samples=1, key=None, max_new_tokens=None,
                 on_finished=None) -> SamplerOutput:
        s, cfg = self.settings, self.config
        prompts = sampling._check_prompts(prompts, int(cfg.vocab_size))
        if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
            raise ValueError(f"generate: num_samples must be an int >= 1, got {num_samples!r}")
        if s.temperature > 0 and key is None:
            raise ValueError("generate: temperature > 0 needs a PRNG key (key=jax.random.key(seed))")
        if jax.process_count() > 1:
            raise NotImplementedError("ContinuousEngine: multi-process runs are not supported yet")
        rows = [p for p in prompts for _ in range(num_samples)]
        n, m = len(rows), s.max_new_tokens
        budgets = row_budgets(max_new_tokens, n, m)
        budgets = np.full((n,), m, np.int32) if budgets is None else budgets
        keys = sampling.row_keys(key, n)
        key_impl = jax.random.key_impl(keys)
        key_data = np.asarray(jax.random.key_data(keys))
        longest = max(len(p) for p in rows)
        per_slot = engine.pages_for(longest + m, self.page_size)
        num_pages = (self.kv_tokens // self.page_size if self.kv_tokens is not None
                     else self.slots * per_slot)
        slots = self.slots
        sched = engine.Scheduler(slots=slots, num_pages=num_pages, page_size=self.page_size,
                                 block=self.block, order=self.order)
        for i, p in enumerate(rows):
            sched.add(i, len(p), int(budgets[i]))

        pages = self._pool(num_pages)
        self._pages = None  # donated below; put back at the end
        seen = (None if s.repetition_penalty == 1.0
                else jnp.zeros((slots, int(cfg.vocab_size)), bool))
        eos_ids = jnp.asarray(list(s.stop_ids), jnp.int32)
        stops = set(s.stop_ids)
        settings = sampling._Settings(
            max_new_tokens=m, temperature=float(s.temperature),
            top_k=None if s.temperature == 0.0 else s.top_k,
            top_p=None if s.temperature == 0.0 or s.top_p in (None, 1.0) else float(s.top_p),
            pad_id=int(s.pad_id), repetition_penalty=float(s.repetition_penalty))
        static = dict(graphdef=self.graphdef, settings=settings, key_impl=key_impl,
                      impl=self.implementation)
        toks = [[] for _ in range(n)]
        lps = [[] for _ in range(n)]
        plps = [[] for _ in range(n)]
        eos_hit = np.zeros((n,), bool)
        # Host copy of each slot's state (the scheduler's view; sent to every block).
        table = np.zeros((slots, per_slot), np.int32)
        slot_row = np.full((slots,), -1)
        live = np.zeros((slots,), bool)
        stats = {"blocks": 0, "decode_steps": 0, "prefills": 0, "prefill_tokens": 0}

        def done_rows(finished):
            if on_finished is not None and finished:
                on_finished(list(finished), self._output(finished, rows, toks, lps, plps,
                                                         eos_hit, num_samples, local=True))

        while not sched.done():
            for p in sched.reserve():
                live[p.slot], slot_row[p.slot] = False, -1  # its tokens so far stay here
                assert len(toks[p.row]) == p.generated
            while admitted := sched.admit(self.prefill_tokens):
                pages, seen = self._prefill(admitted, rows, toks, key_data, pages, seen, static)
                tok, lp, plp = self._last_prefill
                stats["prefills"] += 1
                stats["prefill_tokens"] += sum(a.context for a in admitted)
                for i, a in enumerate(admitted):
                    toks[a.row].append(int(tok[i]))
                    lps[a.row].append(float(lp[i]))
                    plps[a.row].append(float(plp[i]))
                    slot_row[a.slot] = a.row
                    hit = int(tok[i]) in stops
                    eos_hit[a.row] = hit
                    live[a.slot] = not hit and len(toks[a.row]) < budgets[a.row]
            for slot, row in sched.live.items():
                pg = sched.pages(slot)
                table[slot, :len(pg)] = pg
                table[slot, len(pg):] = 0
            live_slots = [sl for sl in range(slots) if live[sl]]
            progress = {}
            if live_slots:
                width = _pow2(max(len(sched.pages(sl)) for sl in live_slots))
                gen0 = np.array([len(toks[r]) if r >= 0 else 0 for r in slot_row], np.int32)
                prev = np.array([toks[r][-1] if r >= 0 else 0 for r in slot_row], np.int32)
                kv = np.array([sched.kv_len(r) if r >= 0 else 0 for r in slot_row], np.int32)
                bud = np.array([budgets[r] if r >= 0 else 1 for r in slot_row], np.int32)
                kd = key_data[np.maximum(slot_row, 0)]
                pages, seen, gen1, live1, hit1, btok, blp, bplp = _decode_program(
                    self.params, pages, seen, jnp.asarray(table[:, :width]), jnp.asarray(prev),
                    jnp.asarray(gen0), jnp.asarray(bud), jnp.asarray(kv), jnp.asarray(live),
                    jnp.asarray(kd), eos_ids, block=self.block, **static)
                gen1, live1, hit1, btok, blp, bplp = jax.device_get(
                    (gen1, live1, hit1, btok, blp, bplp))
                stats["blocks"] += 1
                stats["decode_steps"] += int(np.max(gen1 - gen0))
                for sl in live_slots:
                    r, k = slot_row[sl], int(gen1[sl] - gen0[sl])
                    toks[r] += btok[sl, :k].tolist()
                    lps[r] += blp[sl, :k].tolist()
                    plps[r] += bplp[sl, :k].tolist()
                    eos_hit[r] = bool(hit1[sl])
                live[:] = live1 & live
            for slot, row in sched.live.items():
                progress[row] = (len(toks[row]), not live[slot])
            finished = sched.advance(progress)
            for slot in range(slots):
                if slot_row[slot] in finished:
                    slot_row[slot] = -1
            done_rows(finished)
        self._pages = pages
        stats["preemptions"] = sched.preemptions
        self.last_stats = stats
        return self._output(range(n), rows, toks, lps, plps, eos_hit, num_samples, local=False)

    def _prefill(self, admitted, rows, toks, key_data, pages, seen, static):
        """Runs _prefill_program on the admitted rows; keeps (token, logprob, policy logprob)
        numpy [len(admitted)] in self._last_prefill. Returns (pages, seen)."""
        ps, slots = self.page_size, self.slots
        contexts = [rows[a.row] + toks[a.row] for a in admitted]
        total = sum(len(c) for c in contexts)
        t = _pow2(total, 16)
        ids = np.full((t,), self.settings.pad_id, np.int32)
        pos = np.zeros((t,), np.int32)
        flat = np.full((t,), -1, np.int32)
        seg = np.zeros((t,), np.int32)
        table = np.zeros((slots, 1), np.int32)
        kv_lens = np.zeros((slots,), np.int32)
        cu = np.zeros((slots + 1,), np.int32)
        index = np.zeros((slots,), np.int32)
        into = np.full((slots,), slots, np.int32)
        kd = np.zeros((slots,) + key_data.shape[1:], key_data.dtype)
        start = 0
        for i, (a, c) in enumerate(zip(admitted, contexts)):
            j = np.arange(len(c))
            ids[start:start + len(c)] = c
            pos[start:start + len(c)] = j
            flat[start:start + len(c)] = np.asarray(a.pages)[j // ps] * ps + j % ps
            seg[start:start + len(c)] = i + 1
            kv_lens[i], index[i], into[i], kd[i] = len(c), a.generated, a.slot, key_data[a.row]
            start += len(c)
            cu[i + 1:] = start
        pages, seen, tok, lp, plp = _prefill_program(
            self.params, pages, seen, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(flat),
            jnp.asarray(seg), jnp.asarray(kv_lens), jnp.asarray(table), jnp.asarray(cu),
            jnp.asarray([len(admitted)], jnp.int32), jnp.asarray(kd), jnp.asarray(index),
            jnp.asarray(into), **static)
        tok, lp, plp = jax.device_get((tok, lp, plp))
        k = len(admitted)
        self._last_prefill = (tok[:k], lp[:k], plp[:k])
        return pages, seen

    def _output(self, which, rows, toks, lps, plps, eos_hit, num_samples, *, local):
        """SamplerOutput of output rows `which` (numpy when local, else jnp)."""
        s = self.settings
        which = list(which)
        m = s.max_new_tokens
        k = len(which)
        tokens = np.full((k, m), s.pad_id, np.int32)
        lp = np.zeros((k, m), np.float32)
        plp = np.zeros((k, m), np.float32)
        lengths = np.zeros((k,), np.int32)
        for i, r in enumerate(which):
            g = len(toks[r])
            tokens[i, :g], lp[i, :g], plp[i, :g], lengths[i] = toks[r], lps[r], plps[r], g
        bucket = sampling.prompt_bucket(max(len(p) for p in rows))
        ids, plen = sampling.left_pad([rows[r] for r in which], bucket, s.pad_id)
        out = dict(
            tokens=tokens, response_mask=np.arange(m)[None, :] < lengths[:, None],
            lengths=lengths,
            finish_reason=np.where(eos_hit[which], sampling.FINISH_EOS,
                                   sampling.FINISH_LENGTH).astype(np.int32),
            logprobs=lp, policy_logprobs=plp, prompt_ids=ids, prompt_lengths=plen,
            group_ids=np.asarray(which, np.int32) // num_samples)
        if not local:
            out = {k_: jnp.asarray(v) for k_, v in out.items()}
        return SamplerOutput(**out)


def engine_options(cfg) -> dict:
    """make_engine's options for config.rollout.engine (none for the static engine)."""
    r = cfg.rollout
    if r.engine == "static":
        return {}
    return dict(slots=int(r.slots), page_size=int(r.page_size), block=int(r.block),
                kv_tokens=int(r.kv_tokens_per_chip), order=str(r.order),
                prefill_tokens=int(r.prefill_tokens), tensor=int(r.mesh.tensor))


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

