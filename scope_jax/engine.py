"""Continuous batching over a paged KV cache: the host-side scheduler (pure Python, no JAX).

The engine (scope_jax.rollout.ContinuousEngine) keeps S slots on the device and a pool of
KV pages of `page_size` tokens each; a slot's page-table row lists the pages its row's context
lives in. This module decides, between jitted blocks of `block` decode steps, which row sits in
which slot and which pages it owns. It knows nothing of models: the replay
(tools/bench_rollout.py, and `replay` below) drives the same class with per-row lengths.

API (one Scheduler per generate call):

    sched = Scheduler(slots=S, num_pages=P, page_size=ps, block=k, order="fifo")
    sched.add(row, prompt_len, budget)   # every row first; ValueError if it can never fit
    while not sched.done():
        preempted = sched.reserve()      # pages for the next block of every live row;
                                         # evicts the most recently admitted rows if short
        while admitted := sched.admit(max_tokens):  # Admission(row, slot, context, generated)
            ... prefill the admitted rows' `context` tokens (prompt + tokens so far), which
                samples token number `generated` of each ...
        ... run one decode block ...
        finished = sched.advance({row: (generated, done), ...})   # for every live row

Invariants:
  * A live row that has produced g tokens holds the KV of its prompt and of its first g - 1
    tokens (the last one is fed at the next step): kv_len = prompt_len + g - 1.
  * Before a block, each live row owns the pages for min(kv_len + block, prompt_len + budget)
    tokens, so a block never writes outside its pages.
  * A row is admitted only when a slot is free and the pool has the pages for its context plus
    one block: admission waits when the pool is full, it never overcommits.
  * A row that needs more pages than the whole pool (prompt_len + budget tokens) is refused
    by `add` with a ValueError; every other row is eventually served (nothing is dropped).
  * Preemption (recompute, as vLLM's): the most recently admitted live row gives its pages and
    slot back and goes to the front of the queue with its tokens so far; it is re-prefilled
    with prompt + those tokens. A row's randomness depends on (row key, token index) only, so
    its tokens do not change.

Admission order: "fifo" (rows in the order added) or "longest" (largest budget first, ties in
the order added), after rows preempted earlier, which always go first.
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Mapping, Sequence

ORDERS = ("fifo", "longest")


def pages_for(tokens: int, page_size: int) -> int:
    """Pages needed to hold `tokens` tokens."""
    return -(-tokens // page_size)


@dataclasses.dataclass
class _Row:
    row: int
    prompt_len: int
    budget: int
    generated: int = 0      # tokens produced so far (kept across a preemption)
    slot: int = -1          # -1: not live
    pages: list[int] = dataclasses.field(default_factory=list)
    admitted_at: int = -1   # admission counter (the most recent is preempted first)

    @property
    def kv_len(self) -> int:
        """Tokens of this row in the cache while live: its prompt and all tokens but the last."""
        return self.prompt_len + self.generated - 1

    @property
    def total(self) -> int:
        """Tokens the row can ever hold: prompt and its whole budget."""
        return self.prompt_len + self.budget


@dataclasses.dataclass(frozen=True)
class Admission:
    """A row placed in a slot: prefill its `context` tokens (prompt + its `generated` tokens
    so far, the latter non-zero only after a preemption); the prefill samples token number
    `generated`. `pages` are the pages the slot now owns (in page-table order)."""

    row: int
    slot: int
    context: int
    generated: int
    pages: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Preemption:
    """A live row evicted from `slot` with `generated` tokens kept; it waits at the front of
    the queue and is re-prefilled later."""

    row: int
    slot: int
    generated: int


class Scheduler:
    """Slots, pages and the admission queue of one generate call (see the module docstring).

    slots: S, rows decoded together; num_pages: the pool; page_size: tokens per page;
    block: decode steps per jitted block; order: ORDERS.
    """

    def __init__(self, *, slots: int, num_pages: int, page_size: int, block: int,
                 order: str = "fifo"):
        for name, v in (("slots", slots), ("num_pages", num_pages), ("page_size", page_size),
                        ("block", block)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"Scheduler: {name} must be an int >= 1, got {v!r}")
        if order not in ORDERS:
            raise ValueError(f"Scheduler: order {order!r}: expected one of {ORDERS}")
        self.slots, self.num_pages, self.page_size, self.block = slots, num_pages, page_size, block
        self.order = order
        self._rows: dict[int, _Row] = {}
        self._added: list[int] = []                       # rows not yet admitted once
        self._front: collections.deque[int] = collections.deque()  # preempted rows, first out
        self._sorted = True
        self._free_slots = list(range(slots - 1, -1, -1))  # pop() gives slot 0 first
        self._free_pages = list(range(num_pages - 1, -1, -1))
        self._live: dict[int, int] = {}                   # slot -> row
        self._admissions = 0
        self.preemptions = 0

    # -- queue ---------------------------------------------------------------------------------

    def add(self, row: int, prompt_len: int, budget: int) -> None:
        """Queues `row` (any hashable int id, unique) with its prompt length and token budget.
        Raises ValueError if prompt_len + budget tokens exceed the whole pool."""
        if row in self._rows:
            raise ValueError(f"Scheduler.add: row {row} added twice")
        if prompt_len < 1 or budget < 1:
            raise ValueError(f"Scheduler.add: row {row} needs prompt_len >= 1 and budget >= 1, "
                             f"got {prompt_len}, {budget}")
        need = pages_for(prompt_len + budget, self.page_size)
        if need > self.num_pages:
            raise ValueError(
                f"row {row}: prompt {prompt_len} + budget {budget} tokens need {need} pages of "
                f"{self.page_size} tokens, more than the whole pool ({self.num_pages} pages = "
                f"{self.num_pages * self.page_size} tokens); raise rollout.kv_tokens_per_chip "
                f"or lower the budget")
        self._rows[row] = _Row(row, prompt_len, budget)
        self._added.append(row)
        self._sorted = False

    def _pending(self) -> Iterable[int]:
        if not self._sorted:
            if self.order == "longest":  # stable: ties keep the order added
                self._added.sort(key=lambda r: -self._rows[r].budget)
            self._added.reverse()  # pop() from the end
            self._sorted = True
        yield from self._front
        yield from reversed(self._added)

    def _pop_pending(self, row: int) -> None:
        if self._front and self._front[0] == row:
            self._front.popleft()
        else:
            assert self._added[-1] == row
            self._added.pop()

    # -- state ---------------------------------------------------------------------------------

    def done(self) -> bool:
        """Every row finished."""
        return not self._live and not self._front and not self._added

    @property
    def live(self) -> dict[int, int]:
        """slot -> row of the live rows (a copy)."""
        return dict(self._live)

    @property
    def free_pages(self) -> int:
        return len(self._free_pages)

    def pages(self, slot: int) -> list[int]:
        """The pages the row in `slot` owns, in order (empty for a free slot)."""
        row = self._live.get(slot)
        return [] if row is None else list(self._rows[row].pages)

    def kv_len(self, row: int) -> int:
        return self._rows[row].kv_len

    def generated(self, row: int) -> int:
        return self._rows[row].generated

    # -- between blocks ------------------------------------------------------------------------

    def _need(self, r: _Row, tokens: int) -> int:
        """Extra pages `r` needs to hold `tokens` tokens (capped at its whole budget)."""
        return max(0, pages_for(min(tokens, r.total), self.page_size) - len(r.pages))

    def _grant(self, r: _Row, extra: int) -> None:
        r.pages.extend(self._free_pages.pop() for _ in range(extra))

    def reserve(self) -> list[Preemption]:
        """Gives every live row the pages for its next block; when the pool runs short, evicts
        the most recently admitted live rows (front of the queue, pages and slot freed) until
        the older ones fit. Returns the evictions, oldest admission first."""
        out = []
        for r in sorted((self._rows[x] for x in self._live.values()), key=lambda r: r.admitted_at):
            if r.slot < 0:  # evicted below for an older row
                continue
            extra = self._need(r, r.kv_len + self.block)
            while extra > len(self._free_pages):
                victim = max((self._rows[x] for x in self._live.values()),
                             key=lambda v: v.admitted_at)
                out.append(self._evict(victim))
                if victim is r:
                    break
            if r.slot >= 0:
                self._grant(r, extra)
        self.preemptions += len(out)
        return out[::-1]

    def _evict(self, r: _Row) -> Preemption:
        p = Preemption(r.row, r.slot, r.generated)
        self._release(r)
        self._front.appendleft(r.row)  # most recent eviction first
        return p

    def _release(self, r: _Row) -> None:
        self._free_pages.extend(reversed(r.pages))
        r.pages = []
        del self._live[r.slot]
        self._free_slots.append(r.slot)
        r.slot = -1

    def admit(self, max_tokens: int | None = None) -> list[Admission]:
        """Places pending rows into free slots, in queue order, while the pool has the pages
        for a row's context plus one block; stops at the first row that does not fit (no
        overtaking: the queue order is kept). max_tokens: at most this many context tokens
        in all (one prefill call's size), except that a first row longer than it goes alone;
        call again for the next prefill."""
        out, tokens = [], 0
        for row in list(self._pending()):
            if not self._free_slots:
                break
            r = self._rows[row]
            context = r.prompt_len + r.generated
            extra = self._need(r, context + self.block)
            if extra > len(self._free_pages):
                break
            if max_tokens is not None and out and tokens + context > max_tokens:
                break
            tokens += context
            self._pop_pending(row)
            r.slot = self._free_slots.pop()
            r.admitted_at = self._admissions
            self._admissions += 1
            self._grant(r, extra)
            self._live[r.slot] = row
            out.append(Admission(row, r.slot, context, r.generated, tuple(r.pages)))
            r.generated += 1  # the prefill samples one token (advance may correct `done`)
        return out

    def advance(self, progress: Mapping[int, tuple[int, bool]]) -> list[int]:
        """Records, after a block, each live row's tokens produced so far and whether it ended
        (EOS or budget); frees the finished rows' slots and pages. `progress` must cover every
        live row. Returns the rows that finished."""
        live_rows = set(self._live.values())
        if set(progress) != live_rows:
            raise ValueError(f"Scheduler.advance: progress for rows {sorted(progress)} but the "
                             f"live rows are {sorted(live_rows)}")
        finished = []
        for row, (generated, done) in progress.items():
            r = self._rows[row]
            if not r.generated <= generated <= r.budget:
                raise ValueError(f"Scheduler.advance: row {row} went from {r.generated} to "
                                 f"{generated} tokens (budget {r.budget})")
            if pages_for(r.prompt_len + generated - 1, self.page_size) > len(r.pages):
                raise ValueError(f"Scheduler.advance: row {row} wrote past its pages")
            r.generated = generated
            if done or generated == r.budget:
                self._release(r)
                finished.append(row)
        return finished


# ----------------------------------------------------------------------------- replay


@dataclasses.dataclass
class ReplayStats:
    """What one replay of a length trace cost, counted per decode step.

    decode_steps: steps run (blocks stop early when every live row has ended);
    useful_row_steps: row-steps that produced a token (decode only; prefill samples one);
    row_steps: slots x decode_steps (the work a fixed-size batch does);
    kv_live: sum over steps and live rows of the tokens attended to (context + the new one);
    kv_read: the same rounded up to whole pages (what a paged kernel reads);
    prefill_tokens: tokens prefilled (recomputation after preemptions included);
    prefills: prefill calls (rounds with an admission); blocks; preemptions.
    """

    decode_steps: int = 0
    useful_row_steps: int = 0
    row_steps: int = 0
    kv_live: int = 0
    kv_read: int = 0
    prefill_tokens: int = 0
    prefills: int = 0
    blocks: int = 0
    preemptions: int = 0


def replay(prompt_lens: Sequence[int], lengths: Sequence[int], budgets: Sequence[int] | None = None,
           *, slots: int, num_pages: int, page_size: int, block: int,
           order: str = "fifo", prefill_tokens: int | None = None) -> ReplayStats:
    """Runs the Scheduler on a trace: row i has a prompt of prompt_lens[i] tokens and ends
    after lengths[i] generated tokens (EOS included; <= budgets[i], default lengths[i]), as
    the engine would run it, minus the model (prefill calls of at most `prefill_tokens`
    context tokens, as the engine's). Returns ReplayStats."""
    budgets = list(lengths) if budgets is None else list(budgets)
    if not len(prompt_lens) == len(lengths) == len(budgets):
        raise ValueError("replay: prompt_lens, lengths and budgets differ in length")
    sched = Scheduler(slots=slots, num_pages=num_pages, page_size=page_size, block=block,
                      order=order)
    for i, (p, n, b) in enumerate(zip(prompt_lens, lengths, budgets)):
        if not 1 <= n <= b:
            raise ValueError(f"replay: row {i} length {n} outside [1, budget {b}]")
        sched.add(i, int(p), int(b))
    stats = ReplayStats()
    while not sched.done():
        stats.preemptions += len(sched.reserve())
        while admitted := sched.admit(prefill_tokens):
            stats.prefills += 1
            stats.prefill_tokens += sum(a.context for a in admitted)
        live = sched.live.values()
        if not live:
            raise RuntimeError("replay: no live row and none admitted (scheduler stuck)")
        gen = {r: sched.generated(r) for r in live}
        ctx = {r: sched.kv_len(r) for r in live}
        steps = min(block, max(lengths[r] - gen[r] for r in live))
        for _ in range(steps):
            for r in live:
                if gen[r] < lengths[r]:
                    ctx[r] += 1  # the fed token's KV is written, then attended over
                    stats.kv_live += ctx[r]
                    stats.kv_read += pages_for(ctx[r], page_size) * page_size
                    gen[r] += 1
                    stats.useful_row_steps += 1
        if steps:
            stats.blocks += 1
        stats.decode_steps += steps
        stats.row_steps += steps * slots
        sched.advance({r: (gen[r], gen[r] >= lengths[r]) for r in live})
    return stats
