"""Packing several rollouts per row (verl's remove-padding, MaxText's packing), planned on the host.

A rollout is its real tokens only: the prompt without its left padding, then the response
without its right padding. The packer lays those sequences end to end in rows of `capacity`
tokens (first-fit-decreasing), each with its own segment id (0 = padding), and the model
attends within each segment only (Transformer.hidden(segment_ids=...)), restarting RoPE
positions at 0 for each, so each rollout's log-probs are those of its own row.

Packing happens WITHIN each batch shard: the rollouts a shard holds go into packed rows of that
shard, so no collective moves tokens and each host packs its own rows. Before packing, the
host's rollouts are dealt over its shards in snake order of length (the same number per shard
as before), so that every shard needs about the same number of packed rows, then swapped
between shards where that lets a shard that needs a row more fit (swap_to_fit): the step's
packed row count is the largest shard's, and the others' extra rows are padding.

The step takes one packed row per batch shard per micro-batch (the memory unit: one row of
`capacity` tokens per chip), so the plan's micro-batch count is the packed rows per shard,
rounded up to count_bucket (a bounded set of shapes, so compiles stay few).

Layout (all shard-major, so splitting the leading axis over the batch shards is local):
  packed rows   [S * n, C]     row s * n + j: shard s, micro-batch j
  loss slots    [S * n * K]    slot (s * n + j) * K + k: the k-th rollout of that packed row,
                               K the most rollouts any packed row holds (count_bucket'ed);
                               missing ones are dummies (real False), masked out of the loss.

The host planner (count_bucket .. pack_tokens, numpy) and the glue to the step and the scoring
passes: `pack_batch` plans a step's rollouts once (each host its own rows) into a `PackedBatch`
(the host `Plan` and the device `Packed` rows) that the scoring passes and the train step
share; `micro_batches` gives the jitted code its per-micro-batch views; `unpack_slots` puts
per-slot results back in the rows' order; `permute` deals a batch's rows as the plan does.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from scope_jax import sharding as shd


def count_bucket(n: int) -> int:
    """n rounded up to a bounded set: exact up to 8, then a multiple of 2^(floor(log2 n) - 3),
    i.e. 8 counts per doubling and at most 1/8 (12.5%) added."""
    if n <= 8:
        return max(int(n), 1)
    step = 1 << (int(n).bit_length() - 4)
    return -(-int(n) // step) * step


def first_fit_decreasing(lengths, capacity: int) -> list[list[int]]:
    """Bins of total length <= capacity: each item (longest first) into the first bin it fits.

    Args:
      lengths: int [N], each in [1, capacity].
    Returns:
      bins as lists of item indices (each index exactly once), in order of creation.
    """
    lengths = np.asarray(lengths, np.int64)
    if lengths.size and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"packing: sequence lengths must be in [1, capacity={capacity}]; got "
                         f"{int(lengths.min())}..{int(lengths.max())}")
    bins: list[list[int]] = []
    free: list[int] = []
    for i in np.argsort(-lengths, kind="stable"):
        n = int(lengths[i])
        for b, room in enumerate(free):
            if n <= room:
                bins[b].append(int(i))
                free[b] -= n
                break
        else:
            bins.append([int(i)])
            free.append(capacity - n)
    return bins


def snake_order(lengths, shards: int) -> np.ndarray:
    """A permutation of the rows that gives each of `shards` contiguous blocks the same number
    of rows and about the same total length: rows sorted longest first are dealt 0, 1, ...,
    S - 1, S - 1, ..., 0, 0, 1, ... Returns int [N]: new row i is old row order[i]."""
    lengths = np.asarray(lengths)
    n = len(lengths)
    if n % shards:
        raise ValueError(f"packing: {n} rows do not split over {shards} batch shards")
    per = n // shards
    by_length = np.argsort(-lengths, kind="stable")
    rank = np.arange(n)
    lap, pos = rank // shards, rank % shards
    shard = np.where(lap % 2 == 0, pos, shards - 1 - pos)  # snake: balances the sums
    order = np.empty(n, np.int64)
    order[shard * per + lap] = by_length
    return order


def swap_to_fit(lengths, shards: int, capacity: int, budget: int = 640_000) -> np.ndarray:
    """A permutation of the rows that swaps rollouts between shards (each keeps its N / S rows)
    so that fewer shards need more packed rows than the fullest shard's lower bound T =
    max_s ceil(load_s / capacity): the step's micro-batch count is the most rows any shard
    needs, so one shard that first-fit-decreasing packs into T + 1 rows costs every shard a
    row. For each such shard A, the first swap of one of A's rollouts with a shorter one of a
    shard B (tried in order of B's room under T rows) after which both pack into T rows.

    Args:
      lengths: int [N], shard-major (shard s holds rows s * N / S ...), e.g. after snake_order.
      budget: bounds the host's time: at most budget / (N / S) swaps are tried, each
        re-packing two shards (issue 11's mix: under a second for 64 or 16 shards of 2,048).
    Returns:
      int [N]: new row i is old row perm[i] (the identity where no swap helps).
    """
    lengths = np.asarray(lengths, np.int64).copy()
    per = len(lengths) // shards
    perm = np.arange(len(lengths))
    budget //= per
    block = lambda s: slice(s * per, (s + 1) * per)
    rows = lambda s: len(first_fit_decreasing(lengths[block(s)], capacity))
    need = np.array([rows(s) for s in range(shards)])
    target = max(-(-int(lengths[block(s)].sum()) // capacity) for s in range(shards))
    for a in np.flatnonzero(need > target):
        if budget <= 0:
            break
        room = {b: target * capacity - int(lengths[block(b)].sum())
                for b in range(shards) if need[b] <= target}
        for b in sorted(room, key=room.get, reverse=True):
            pairs = sorted(((i, j) for i in range(a * per, (a + 1) * per) for j in range(b * per, (b + 1) * per)
                            if 0 < lengths[i] - lengths[j] <= room[b]),
                           key=lambda ij: lengths[ij[1]] - lengths[ij[0]])  # A's biggest relief first
            for i, j in pairs[:budget]:
                budget -= 1
                lengths[[i, j]] = lengths[[j, i]]
                if rows(a) <= target and rows(b) <= target:
                    perm[[i, j]] = perm[[j, i]]
                    need[a] = target
                    break
                lengths[[i, j]] = lengths[[j, i]]  # no good: undo
            if need[a] <= target or budget <= 0:
                break
    return perm


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where each rollout goes (see the module docstring for the layout).

    order:   int [N]         the rows' permutation before packing (new row i = old row order[i]).
    rollout: int32 [S, n, K] each slot's rollout, as its index among its shard's N / S rows
                             (after `order`); 0 for dummies.
    real:    bool [S, n, K]  False for dummy slots.
    start:   int32 [S, n, K] column of the slot's first token in its packed row.
    lengths: int [N]         real tokens of each rollout (after `order`).
    capacity: C, tokens per packed row.
    """

    order: np.ndarray
    rollout: np.ndarray
    real: np.ndarray
    start: np.ndarray
    lengths: np.ndarray
    capacity: int

    @property
    def micro_batches(self) -> int:
        return self.rollout.shape[1]

    @property
    def padding(self) -> float:
        """Share of the packed rows' token positions that are padding."""
        s, n, _ = self.rollout.shape
        return 1.0 - float(self.lengths.sum()) / (s * n * self.capacity)


def plan(lengths, shards: int, capacity: int, micro_batches: int = 0, slots: int = 0) -> Plan:
    """Packs rollouts of `lengths` real tokens each (rows in batch order, split over `shards`
    contiguous blocks as the batch sharding splits them) into packed rows of `capacity`.

    Args:
      lengths: int [N], real prompt + response tokens of each rollout, N a multiple of shards.
      shards: batch shards (of this host's rows).
      capacity: tokens per packed row (prompt bucket + max_new_tokens holds any rollout).
      micro_batches, slots: at least this many (n, K): every host of a multi-host step must
        use the same, the largest any host needs.
    """
    lengths = np.asarray(lengths, np.int64)
    order = snake_order(lengths, shards)
    order = order[swap_to_fit(lengths[order], shards, capacity)]
    lengths = lengths[order]
    per = len(lengths) // shards
    bins = [first_fit_decreasing(lengths[s * per:(s + 1) * per], capacity) for s in range(shards)]
    n = max(count_bucket(max(len(b) for b in bins)), micro_batches)
    k = max(count_bucket(max(len(x) for b in bins for x in b)), slots)
    rollout = np.zeros((shards, n, k), np.int32)
    real = np.zeros((shards, n, k), bool)
    start = np.zeros((shards, n, k), np.int32)
    for s, shard_bins in enumerate(bins):
        for j, items in enumerate(shard_bins):
            offsets = np.cumsum([0] + [lengths[s * per + i] for i in items])[:-1]
            rollout[s, j, :len(items)] = items
            real[s, j, :len(items)] = True
            start[s, j, :len(items)] = offsets
    return Plan(order=order, rollout=rollout, real=real, start=start, lengths=lengths,
                capacity=int(capacity))


def pack_tokens(p: Plan, input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
    """The packed rows of a batch already permuted by p.order.

    Args:
      input_ids, attention_mask: [N, T] (each row's real tokens one contiguous span, as the
        trainer's left-padded prompt + right-padded response).
    Returns:
      (ids int32 [S * n, C], segment_ids int32 [S * n, C]); the k-th rollout of a row has
      segment id k + 1.
    """
    ids, mask = np.asarray(input_ids), np.asarray(attention_mask).astype(bool)
    s, n, k = p.rollout.shape
    per = len(ids) // s
    first = np.argmax(mask, axis=1)
    out = np.zeros((s * n, p.capacity), np.int32)
    seg = np.zeros((s * n, p.capacity), np.int32)
    for shard, j, slot in zip(*np.nonzero(p.real)):
        row = shard * per + p.rollout[shard, j, slot]
        length, begin = int(p.lengths[row]), int(p.start[shard, j, slot])
        out[shard * n + j, begin:begin + length] = ids[row, first[row]:first[row] + length]
        seg[shard * n + j, begin:begin + length] = slot + 1
    return out, seg


# --------------------------------------------------------------------------------------------
# The glue: one plan per step, shared by the scoring passes and the train step.
# --------------------------------------------------------------------------------------------


@flax.struct.dataclass
class Packed:
    """A batch's tokens packed several rollouts per row: S batch shards, n micro-batches of one
    packed row per shard, C tokens per row, K loss slots per row. Shard-major: row s * n + j is
    shard s's row of micro-batch j.

    input_ids:   int32 [S * n, C]  the rollouts' real tokens end to end
    segment_ids: int32 [S * n, C]  k + 1 on the row's k-th rollout, 0 on padding
    rollout:     int32 [S * n, K]  each slot's rollout: its row among its shard's B / S rows
                                   (in the plan's order)
    real:        bool  [S * n, K]  False on dummy slots (masked out of the loss)
    predict:     int32 [S * n, K]  column whose next-token log-prob is response token 0
    shards:      S (static), which the step checks against its mesh
    """

    input_ids: jax.Array
    segment_ids: jax.Array
    rollout: jax.Array
    real: jax.Array
    predict: jax.Array
    shards: int = flax.struct.field(pytree_node=False, default=1)


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """One step's packing: `plan`, this host's Plan (numpy, host side), and `packed`, the
    global Packed rows (split over the batch shards with a mesh, plain arrays without)."""

    plan: Plan
    packed: Packed


def pack_local(ids: np.ndarray, mask: np.ndarray, num_response: int, shards: int,
               global_rows: int, capacity: int) -> tuple[Plan, Packed]:
    """This host's rows packed for a step or scoring pass on `shards` batch shards.

    Args:
      ids, mask: this host's rows [N, T] (prompt bucket + num_response positions).
      global_rows: rows of the whole batch (N of all hosts).
    Returns:
      (the Plan, this host's Packed as numpy, whose `rollout` indices count the rows in the
      plan's order). Every process of a multi-host run must call it (the hosts agree on the
      plan's micro-batch and slot counts: the largest any needs).
    """
    mask = mask.astype(bool)
    local_shards = shards * len(mask) // global_rows
    p = plan(mask.sum(1), local_shards, capacity)
    if jax.process_count() > 1:
        n, k = (int(x) for x in shd.max_over_hosts(p.rollout.shape[1:]))
        p = plan(mask.sum(1), local_shards, capacity, micro_batches=n, slots=k)
    ids, mask = ids[p.order], mask[p.order]
    tokens, segments = pack_tokens(p, ids, mask)
    s, n, k = p.rollout.shape
    prompt_lengths = mask[:, :-num_response].sum(1)
    shard_rows = np.arange(s)[:, None, None] * (len(mask) // s) + p.rollout  # [S, n, K]
    predict = p.start + prompt_lengths[shard_rows] - 1
    return p, Packed(input_ids=tokens, segment_ids=segments, rollout=p.rollout.reshape(s * n, k),
                     real=p.real.reshape(s * n, k), predict=predict.astype(np.int32).reshape(s * n, k),
                     shards=shards)


def _put(tree, mesh):
    """Host rows -> device arrays: global and split over the batch shards with a mesh."""
    if mesh is None or mesh.empty:
        return jax.tree.map(jnp.asarray, tree)
    return jax.device_put(shd.to_global(tree, mesh), shd.batch_sharding(mesh))


def pack_batch(input_ids, attention_mask, num_response: int, mesh, capacity: int) -> PackedBatch:
    """Plans and packs a step's rows (input_ids, attention_mask [B, T], row-sharded or numpy)
    into packed rows of `capacity` tokens for the batch shards of `mesh` (None or an empty
    mesh: one shard). Each process packs its own rows over its own shards (no row leaves its
    shard); the processes agree on the plan's shape (n, K) first."""
    shards = 1 if mesh is None or mesh.empty else shd.batch_shards(mesh)
    ids, mask = shd.local_rows(input_ids), shd.local_rows(attention_mask)
    p, packed = pack_local(ids, mask, num_response, shards, input_ids.shape[0], capacity)
    return PackedBatch(plan=p, packed=_put(packed, mesh))


def unpack_slots(pb: PackedBatch, slots, mesh):
    """Per-slot results [S * n * K, M] (shard-major, as the packed passes give them) -> [B, M]
    in the rows' original order (before the plan's permutation); rows no slot fills stay 0."""
    p = pb.plan
    s, n, k = p.rollout.shape
    slots = shd.local_rows(slots).reshape(s, n, k, -1)
    per = len(p.order) // s
    out = np.zeros((len(p.order), slots.shape[-1]), np.float32)
    shard, j, slot = np.nonzero(p.real)
    # slot -> its row in the plan's order -> the row it came from
    out[p.order[shard * per + p.rollout[shard, j, slot]]] = slots[shard, j, slot]
    return _put(out, mesh)


def permute(tree, pb: PackedBatch, mesh):
    """A batch's rows ([B, ...] leaves) in the plan's order, as the step reads them (each host
    permutes its own rows within its shards; the update does not depend on the rows' order)."""
    local = jax.tree.map(lambda x: shd.local_rows(x)[pb.plan.order], tree)
    return _put(local, mesh)


def micro_batches(tree, packed: Packed, shards: int):
    """Per-micro-batch views of a packed step's inputs, all shard-local (no collective).

    Args:
      tree: rollout-layout leaves [B, ...] (the batch, its row constants), B over S shards.
      packed: the batch's Packed (made for `shards` batch shards).
    Returns:
      (slots, rows): slots = tree's leaves gathered per loss slot, [n, S * K, ...] (slot
      s * K + k of micro-batch j: the k-th rollout of shard s's row j); rows = (input_ids,
      segment_ids [n, S, C], real, predict [n, S, K]).
    """
    if packed.shards != shards:
        raise ValueError(f"packed rows were planned for {packed.shards} batch shards; the step "
                         f"runs on {shards} (the mesh's data x fsdp)")
    s, (rows, k) = shards, packed.rollout.shape
    n = rows // s
    index = packed.rollout.reshape(s, n * k)

    def slots(x):  # each shard picks among its own B / S rows
        picked = jax.vmap(lambda a, i: a[i])(x.reshape(s, x.shape[0] // s, *x.shape[1:]), index)
        return picked.reshape(s, n, k, *x.shape[1:]).swapaxes(0, 1).reshape(n, s * k, *x.shape[1:])

    per_row = lambda x: x.reshape(s, n, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(slots, tree), tuple(per_row(x) for x in (
        packed.input_ids, packed.segment_ids, packed.real, packed.predict))


def abstract_packed(rows: int, capacity: int, slots: int, shards: int, mesh=None) -> Packed:
    """ShapeDtypeStructs of a Packed: `rows` packed rows of `capacity` tokens, `slots` loss slots
    per row (K), planned for `shards` batch shards (split over mesh's batch axes when given)."""
    sh = None if mesh is None else shd.batch_sharding(mesh)
    sd = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
    return Packed(input_ids=sd((rows, capacity), jnp.int32), segment_ids=sd((rows, capacity), jnp.int32),
                  rollout=sd((rows, slots), jnp.int32), real=sd((rows, slots), jnp.bool_),
                  predict=sd((rows, slots), jnp.int32), shards=shards)
