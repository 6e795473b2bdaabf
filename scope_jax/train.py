"""SCOPE and its baselines end to end: sample -> verify -> score -> update -> checkpoint.

    python -m tools.train --config configs/toy.py --config.algo=scope --config.workdir=runs/x

The pure part is `make_train_step` (one jitted, donated update from a `Rollouts` batch, in
strided micro-batches); `build_step` jits it with its shardings and `lower_step` lowers exactly
that without weights (dry runs, tools/scale_check.py, the tests). The rest of this file is the
short host loop (`train`) that wires the sampler, the verifier, the teacher and Orbax around it,
with the mesh in effect. Algorithms (config.algo):

    scope  correct rollouts -> MLE weighted by student PPL; wrong -> OPD weighted by teacher PPL
    opd    every rollout -> OPD with uniform weights (num_samples=1 is the paper's baseline)
    grpo   group-normalised rewards, PPO clip, k3 KL to the initial student
    kd     off-policy: SFT on the teacher's own (verified) samples

Resume order: the run's newest checkpoint in {workdir}/checkpoints that verifies (checksums,
finite leaves; a failing one is moved to checkpoints/corrupt/, see scope_jax.checkpoint), else
the initial Hugging Face checkpoint (config.student). {workdir}/config.json must describe the
same run. Data order and PRNG keys are pure functions of (seed, step), so a resumed run repeats
exactly what an uninterrupted one would have done. A run that ends on non-finite steps or with
a non-finite model raises (no export).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from scope_jax import algorithms, checkpoint, compat, losses, sampling, tracking
from scope_jax import config as config_lib
from scope_jax import sharding as shd
from scope_jax import teacher as teachers

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The batch layout and the train state.
# --------------------------------------------------------------------------------------------


@flax.struct.dataclass
class Rollouts:
    """One training batch; B rollouts, P prompt bucket, M response budget.

    input_ids:        int32 [B, P + M]  left-padded prompt followed by the response
    attention_mask:   bool  [B, P + M]  real prompt and response tokens
    response_mask:    bool  [B, M]      response tokens that count in the loss
    old_logprobs:     f32   [B, M]      behaviour policy (pi_old) log-probs of the response tokens
    teacher_logprobs: f32   [B, M]      teacher log-probs (zeros when the algorithm needs none)
    ref_logprobs:     f32   [B, M]      reference-policy log-probs (GRPO's KL; zeros otherwise)
    correct:          bool  [B]         verifier labels
    group_ids:        int32 [B]         prompt of each rollout
    """

    input_ids: jax.Array
    attention_mask: jax.Array
    response_mask: jax.Array
    old_logprobs: jax.Array
    teacher_logprobs: jax.Array
    ref_logprobs: jax.Array
    correct: jax.Array
    group_ids: jax.Array


@flax.struct.dataclass
class Packed:
    """A Rollouts batch's tokens packed several rollouts per row (scope_jax.packing): S batch
    shards, n micro-batches of one packed row per shard, C tokens per row, K loss slots per
    row. Shard-major: row s * n + j is shard s's row of micro-batch j.

    input_ids:   int32 [S * n, C]  the rollouts' real tokens end to end
    segment_ids: int32 [S * n, C]  k + 1 on the row's k-th rollout, 0 on padding
    rollout:     int32 [S * n, K]  each slot's rollout: its row among its shard's B / S rows
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


@flax.struct.dataclass
class TrainState:
    """params: the student's parameters as a pure dict; opt_state: optax state; step: int32 []."""

    params: Any
    opt_state: Any
    step: jax.Array


def make_optimizer(cfg) -> optax.GradientTransformation:
    """AdamW (the paper: lr 5e-5 constant, weight decay 0.01) after global-norm clipping.

    optim.warmup_steps > 0 ramps the rate linearly from 0 (Adam's first steps move every
    parameter by about lr whatever the gradient's size, which a tiny model feels).
    """
    o = cfg.optim
    lr = o.lr if not o.warmup_steps else optax.linear_schedule(0.0, o.lr, int(o.warmup_steps))
    return optax.chain(
        optax.clip_by_global_norm(o.grad_clip),
        optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))


# --------------------------------------------------------------------------------------------
# Pure functions: log-probs, losses, the step.
# --------------------------------------------------------------------------------------------


def response_logprobs(model, input_ids, attention_mask, num_response: int, chunk_size: int = 512,
                      temperature: float = 1.0):
    """log softmax(logits / temperature) of each response token under `model`, float32 [B, M].

    The hidden state at position P + t - 1 predicts response token t; only the M hidden
    states that predict response tokens go through the vocabulary-tiled log-softmax.
    """
    hidden = model.hidden(input_ids, attention_mask=attention_mask)
    p = input_ids.shape[1] - num_response
    return _token_logprobs(model, hidden[:, p - 1: p - 1 + num_response], input_ids[:, p:],
                           chunk_size, temperature)


def packed_logprobs(model, input_ids, segment_ids, chunk_size: int = 512,
                    temperature: float = 1.0):
    """float32 [R, C]: at each position of packed rows (scope_jax.packing), the log-prob of the
    row's next token given the position's own sequence (segments attend within themselves).
    The last position of a sequence scores the next sequence's first token: meaningless, and
    never read (the loss reads the positions that predict response tokens)."""
    hidden = model.hidden(input_ids, segment_ids=segment_ids)
    targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    return _token_logprobs(model, hidden, targets, chunk_size, temperature)


def slot_logprobs(model, input_ids, segment_ids, predict, num_response: int,
                  chunk_size: int = 512, temperature: float = 1.0):
    """Response log-probs of the rollouts packed in one row per batch shard, float32 [S, K, M].

    Args:
      input_ids, segment_ids: int32 [S, C], one packed row per shard (Packed's layout).
      predict: int32 [S, K], each slot's column whose next token is response token 0.
    Position predict + t holds response token t's log-prob for t below the response's length;
    later positions (clipped to the row) hold other tokens' log-probs, which the masks drop.
    The gather picks within each row, so it stays on the row's shard.
    """
    row_lp = packed_logprobs(model, input_ids, segment_ids, chunk_size, temperature)  # [S, C]
    at = jnp.minimum(predict[..., None] + jnp.arange(num_response, dtype=jnp.int32),
                     input_ids.shape[1] - 1)
    return jax.vmap(lambda lp, i: lp[i])(row_lp, at)


def _token_logprobs(model, h, targets, chunk_size: int, temperature: float):
    """h [B, L, H] hidden states, targets int [B, L] -> float32 [B, L] log softmax(logits / T).

    The lm_head has no bias, so dividing the hidden states by the temperature divides the logits.
    """
    # The rows are split over the batch axes and repeated over 'tensor': split the positions
    # over 'tensor' too, and give each chip the whole (gathered) lm_head, so that no chip
    # repeats another's vocabulary-sized work (the vocabulary tiles slice the lm_head freely).
    h = shd.constrain(h, ("batch", "logprob_length", None))
    targets = shd.constrain(targets, ("batch", "logprob_length"))
    if temperature != 1.0:
        h = h / jnp.asarray(temperature, h.dtype)
    w = shd.constrain(model.lm_head_weight(), (None, None))
    return shd.constrain(losses.token_logprobs(h, w, targets, chunk_size=chunk_size),
                         ("batch", "logprob_length"))


def policy_temperature(cfg) -> float:
    """The temperature of the policy pi_theta / pi_old that the losses see.

    The rollouts are drawn from softmax(logits / T) (T = sampling.temperature), and the paper's
    pi_old is the behaviour policy that drew them, so the student's log-probs (old, current
    and GRPO's reference) are taken at T, as verl (the released code) does by dividing the
    logits by the rollout temperature. config.logprob_temperature overrides it (1.0: the raw
    policy). KD trains on the teacher's samples by NLL, at 1.0. Greedy sampling (T = 0) uses 1.0.
    """
    return algorithms.get(cfg.algo).temperature(cfg)


def make_loss(cfg) -> Callable:
    """loss(logprobs, batch, aux) -> (loss, metrics) for cfg.algo; aux holds full-batch constants."""
    return algorithms.get(cfg.algo).loss(cfg)


def loss_mask(cfg, b: Rollouts) -> jax.Array:
    """bool [B, M]: the response tokens the loss counts (KD with kd_only_correct: only the
    verified rollouts'); the loss and its full-batch denominators must use the same mask."""
    return algorithms.get(cfg.algo).loss_mask(cfg, b)


def full_batch_constants(cfg, b: Rollouts) -> dict:
    """What micro-batches must share: the whole batch's loss denominators and the algorithm's
    per-rollout weights or advantages (scope_jax.algorithms)."""
    mask = loss_mask(cfg, b)
    aux = {"normalizers": losses.loss_normalizers(mask, b.correct, b.group_ids),
           "weights": None, "advantages": None}
    aux.update(algorithms.get(cfg.algo).constants(cfg, b, mask))
    return aux


def _strided_micro_batches(tree, n: int):
    """[B, ...] leaves -> [n, B / n, ...]: micro-batch j holds rows j, j + n, j + 2n, ...

    Strided, not contiguous (as MaxText): the rows of a batch are split over the batch shards
    in contiguous blocks, so a contiguous slice would sit on a few shards while the others
    idle; rows j, j + n, ... spread each micro-batch over every shard, and the reshape below
    is local to each shard (no collective). check_partition makes B / n a multiple of the
    batch shards so that every shard gets the same number of rows.
    """
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), tree)


def batch_shards(mesh) -> int:
    """How many ways the rollout rows are split: the product of the mesh's batch axes."""
    return int(math.prod(mesh.shape[a] for a in sampling.BATCH_AXES if a in mesh.shape))


def check_partition(cfg, mesh, rows: int) -> None:
    """Refuses, with what to set, a batch the step cannot split evenly over micro-batches and
    batch shards (each micro-batch must give every batch shard the same number of rows)."""
    n, shards = int(cfg.micro_batches), batch_shards(mesh)
    if n < 1:
        raise ValueError(f"config.micro_batches={n}: must be >= 1")
    if rows % n:
        raise ValueError(f"config.micro_batches={n} does not divide the batch of {rows} rollouts "
                         f"(prompts_per_step x num_samples); choose a divisor of {rows}")
    if (rows // n) % shards:
        ok = [m for m in range(1, rows + 1) if rows % m == 0 and (rows // m) % shards == 0]
        raise ValueError(
            f"config.micro_batches={n} gives {rows // n} rows per micro-batch, not a multiple of "
            f"the {shards} batch shards (mesh data x fsdp = {dict(mesh.shape)}), so some chips "
            f"would idle or hold the whole micro-batch; use micro_batches in {ok}")


def _packed_micro_batches(tree, packed: Packed, shards: int):
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


def make_train_step(cfg, graphdef, optimizer) -> Callable:
    """(state, batch[, packed]) -> (state, metrics), pure; jit it with the state donated.

    Gradients are accumulated over micro-batches with the full batch's weights, advantages and
    denominators, so the update equals the one-shot update on the whole batch. Without
    `packed`: cfg.micro_batches strided row slices (see _strided_micro_batches). With a Packed
    (config.packing): its n micro-batches of one packed row per batch shard; the log-probs of
    each row's tokens are gathered back per rollout into the loss kernels' [rollouts, M]
    layout (dummy slots masked), so the loss kernels and their constants are the same.
    A step whose loss or gradient norm is not finite leaves params and optimizer state as they
    were (metrics["skipped"] = 1); the host loop counts such steps.
    """
    loss_fn = make_loss(cfg)
    n_micro = int(cfg.micro_batches)
    chunk = int(cfg.model.logprob_chunk)
    temperature = policy_temperature(cfg)
    rows_sharded = lambda tree: jax.tree.map(
        lambda x: shd.constrain(x, ("batch",) + (None,) * (x.ndim - 1)), tree)

    def micro_loss(params, mb: Rollouts, aux, rows):
        # Each micro-batch stays split over the batch shards (rows), whatever XLA infers.
        mb = rows_sharded(mb)
        model = nnx.merge(graphdef, params)
        m = mb.response_mask.shape[1]
        if rows is None:
            lp = response_logprobs(model, mb.input_ids, mb.attention_mask, m, chunk, temperature)
            return loss_fn(lp, mb, aux)[0]
        ids, segments, real, predict = rows_sharded(rows)  # [S, C], [S, C], [S, K], [S, K]
        lp = slot_logprobs(model, ids, segments, predict, m, chunk, temperature).reshape(-1, m)
        mb = mb.replace(response_mask=mb.response_mask & real.reshape(-1)[:, None])
        return loss_fn(lp, mb, aux)[0]

    def step(state: TrainState, batch: Rollouts, packed: Packed | None = None):
        aux = full_batch_constants(cfg, batch)
        row_aux = {k: v for k, v in aux.items() if k in ("weights", "advantages") and v is not None}
        shared = {k: v for k, v in aux.items() if k not in row_aux}

        def body(acc, xs):
            mb, mb_aux, rows = xs
            val, grads = jax.value_and_grad(micro_loss)(state.params, mb, {**shared, **mb_aux}, rows)
            return jax.tree.map(jnp.add, acc, (val, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
        if packed is None:
            micro = (*_strided_micro_batches((batch, row_aux), n_micro), None)
        else:
            shards = batch_shards(jax.sharding.get_abstract_mesh())
            slots, rows = _packed_micro_batches((batch, row_aux), packed, shards)
            micro = (*slots, rows)
        (loss, grads), _ = jax.lax.scan(body, zeros, micro)
        # Routing metrics (weights, ESS, PPLs, prompt kinds) over the whole batch; they do not
        # depend on the current log-probs, so evaluate them at pi_old.
        metrics = loss_fn(batch.old_logprobs, batch, aux)[1]
        grad_norm = optax.tree.norm(grads)
        updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        # The updated parameters too (lr=1e30 gives a finite loss and gradient, then 1e30 weights):
        # a norm that overflows float32 (|w| >~ 1e19) counts, as no forward pass survives it.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(new_params))
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        metrics.update(loss=loss, grad_norm=grad_norm, skipped=1.0 - finite.astype(jnp.float32),
                       # over the global batch, so every host logs the same numbers
                       reward=jnp.mean(batch.correct.astype(jnp.float32)),
                       response_length=jnp.mean(batch.response_mask.sum(-1).astype(jnp.float32)))
        new_state = TrainState(params=keep(new_params, state.params), opt_state=keep(new_opt, state.opt_state),
                               step=state.step + 1)
        return new_state, metrics

    return step


def _pack_local(ids: np.ndarray, mask: np.ndarray, num_response: int, shards: int,
                global_rows: int, capacity: int):
    """This host's rows packed for a step or scoring pass on `shards` batch shards.

    Args:
      ids, mask: this host's rows [N, T] (prompt bucket + num_response positions).
      global_rows: rows of the whole batch (N of all hosts).
    Returns:
      (the packing.Plan, this host's Packed as numpy, whose `rollout` indices count the rows in
      the plan's order). Every process of a multi-host run must call it
      (the hosts agree on the plan's micro-batch and slot counts: the largest any needs).
    """
    from scope_jax import packing

    mask = mask.astype(bool)
    local_shards = shards * len(mask) // global_rows
    p = packing.plan(mask.sum(1), local_shards, capacity)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        need = multihost_utils.process_allgather(np.asarray(p.rollout.shape[1:], np.int32))
        n, k = (int(x) for x in np.max(need.reshape(-1, 2), axis=0))
        p = packing.plan(mask.sum(1), local_shards, capacity, micro_batches=n, slots=k)
    ids, mask = ids[p.order], mask[p.order]
    tokens, segments = packing.pack_tokens(p, ids, mask)
    s, n, k = p.rollout.shape
    prompt_lengths = mask[:, :-num_response].sum(1)
    shard_rows = np.arange(s)[:, None, None] * (len(mask) // s) + p.rollout  # [S, n, K]
    predict = p.start + prompt_lengths[shard_rows] - 1
    return p, Packed(input_ids=tokens, segment_ids=segments, rollout=p.rollout.reshape(s * n, k),
                     real=p.real.reshape(s * n, k), predict=predict.astype(np.int32).reshape(s * n, k),
                     shards=shards)


def _global(tree, mesh):
    """This host's rows (numpy) -> global row-sharded arrays (as they are in one process)."""
    if jax.process_count() == 1:
        return tree
    rows = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(rows, x), tree)


def pack_rollouts(batch: Rollouts, mesh, capacity: int) -> tuple[Rollouts, Packed, dict]:
    """Plans and packs a batch on the host (scope_jax.packing) for a step on `mesh`, packed
    rows of `capacity` tokens. Each process packs its own rows over its own batch shards (no
    row leaves its shard); the processes agree on the plan's shape (n, K) first.

    Returns:
      (the batch with each host's rows permuted as the plan deals them over its shards (the
      same rows per shard; the update does not depend on the rows' order), its Packed,
      {"seq_len": capacity, "padding": this host's share of padding in its packed rows}).
      Arrays are global (row-sharded) with several processes, numpy with one.
    """
    local = jax.tree.map(sampling.local_rows, batch)  # this host's rows (all of them in one process)
    p, packed = _pack_local(local.input_ids, local.attention_mask, local.response_mask.shape[1],
                            batch_shards(mesh), batch.correct.shape[0], capacity)
    local = jax.tree.map(lambda x: x[p.order], local)
    return (*_global((local, packed), mesh), {"seq_len": float(capacity), "padding": p.padding})


def state_shardings(optimizer, param_shardings, mesh, params) -> TrainState:
    """TrainState of NamedShardings: the optimizer's per-parameter leaves (Adam's moments)
    take their parameter's sharding, its other leaves (counts) are replicated."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    replicated = NamedSharding(mesh, P())
    opt = jax.eval_shape(optimizer.init, params)
    opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, opt, param_shardings,
                                   transform_non_params=lambda _: replicated)
    return TrainState(params=param_shardings, opt_state=opt_sh, step=replicated)


def batch_sharding(mesh):
    """Rollout rows split over the mesh's batch axes (as the sampler splits them)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    return NamedSharding(mesh, P(sampling.BATCH_AXES))


def build_step(cfg, graphdef, optimizer, state_sh: TrainState, mesh) -> Callable:
    """The jitted update train() runs: the state donated, fixed shardings in and out (so step 1
    reuses step 0's executable). Call it, and lower it, under jax.set_mesh(mesh), which makes
    the model's activation sharding constraints take effect. With config.packing it takes
    (state, batch, packed), the Packed rows split over the batch shards like the rollouts."""
    rows = batch_sharding(mesh)
    inputs = (state_sh, rows, rows) if cfg.get("packing") else (state_sh, rows)
    return jax.jit(make_train_step(cfg, graphdef, optimizer), donate_argnums=0,
                   in_shardings=inputs, out_shardings=(state_sh, None))


def abstract_batch(rows: int, seq_len: int, response_len: int) -> Rollouts:
    """ShapeDtypeStructs of a Rollouts batch: rows x seq_len tokens, the last response_len of
    which are the response positions."""
    if not 0 < response_len < seq_len:
        raise ValueError(f"response_len={response_len} must be in [1, seq_len={seq_len})")
    sd = jax.ShapeDtypeStruct
    return Rollouts(
        input_ids=sd((rows, seq_len), jnp.int32), attention_mask=sd((rows, seq_len), jnp.bool_),
        response_mask=sd((rows, response_len), jnp.bool_),
        old_logprobs=sd((rows, response_len), jnp.float32),
        teacher_logprobs=sd((rows, response_len), jnp.float32),
        ref_logprobs=sd((rows, response_len), jnp.float32),
        correct=sd((rows,), jnp.bool_), group_ids=sd((rows,), jnp.int32))


def abstract_packed(rows: int, capacity: int, slots: int, shards: int) -> Packed:
    """ShapeDtypeStructs of a Packed: rows packed rows of capacity tokens, `slots` loss slots
    per row (K), planned for `shards` batch shards."""
    sd = jax.ShapeDtypeStruct
    return Packed(input_ids=sd((rows, capacity), jnp.int32), segment_ids=sd((rows, capacity), jnp.int32),
                  rollout=sd((rows, slots), jnp.int32), real=sd((rows, slots), jnp.bool_),
                  predict=sd((rows, slots), jnp.int32), shards=shards)


def abstract_model(cfg, role: str, mesh, num_layers: int | None = None):
    """(graphdef, params as sharded ShapeDtypeStructs, param shardings) of cfg.<role>'s
    architecture (its config.json, else cfg.arch.<role>; num_layers overrides the depth),
    built without weights."""
    from scope_jax.models import ModelConfig, Transformer

    m = cfg.model
    arch = _hf_config(cfg, role)
    if num_layers is not None:
        arch = dict(arch, num_hidden_layers=int(num_layers))
    mc = ModelConfig.from_hf(arch, source=f"config.arch.{role}")
    dtype = _dtype(m.dtype if role == "student" else m.teacher_dtype)
    pdt = _dtype(m.param_dtype) if role == "student" else dtype
    remat = m.remat_policy if role == "student" else False
    abstract = nnx.eval_shape(lambda: Transformer(mc, dtype=dtype, param_dtype=pdt, rngs=nnx.Rngs(0),
                                                  remat=remat))
    graphdef, state = nnx.split(abstract)
    params = nnx.to_pure_dict(state)
    shardings = nnx.to_pure_dict(shd.model_shardings(abstract, mesh))
    params = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), params, shardings)
    return graphdef, params, shardings


def lower_step(cfg, *, rows: int, seq_len: int, response_len: int | None = None,
               mesh=None) -> jax.stages.Lowered:
    """Lowers, without weights, exactly the jitted update train() runs on cfg.mesh.

    Same jit (build_step), shardings, mesh context and micro-batching; the student's
    architecture comes from cfg.student's config.json or cfg.arch.student.

    Args:
      rows: rows of the step's token batch: without config.packing the rollouts (train()
        passes prompts_per_step x num_samples); with it the packed rows (batch shards x
        packed micro-batches), the rollouts being prompts_per_step x num_samples, each
        holding ceil(rollouts / rows) loss slots (count_bucket'ed).
      seq_len: tokens per row as the step sees them: prompt bucket + trimmed response, or
        with config.packing the packed rows' capacity.
      response_len: response positions of each rollout (default: min(max_new_tokens, seq_len
        - 1)).
      mesh: default shd.make_mesh(cfg.mesh).
    Returns:
      jax.stages.Lowered; .compile() gives memory_analysis() / cost_analysis() per device.
    """
    from scope_jax import packing

    mesh = shd.make_mesh(cfg.mesh) if mesh is None else mesh
    rollouts = cfg.prompts_per_step * cfg.num_samples if cfg.get("packing") else rows
    check_partition(cfg, mesh, rollouts)
    graphdef, params, param_sh = abstract_model(cfg, "student", mesh)
    optimizer = make_optimizer(cfg)
    state_sh = state_shardings(optimizer, param_sh, mesh, params)
    opt = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                       jax.eval_shape(optimizer.init, params), state_sh.opt_state)
    state = TrainState(params=params, opt_state=opt,
                       step=jax.ShapeDtypeStruct((), jnp.int32, sharding=state_sh.step))
    response_len = min(int(cfg.sampling.max_new_tokens), seq_len - 1) if response_len is None else response_len
    args = (state, abstract_batch(rows, seq_len, response_len))
    if cfg.get("packing"):
        shards = batch_shards(mesh)
        if rows % shards:
            raise ValueError(f"lower_step: {rows} packed rows do not split over the {shards} batch "
                             f"shards (one row per shard per micro-batch)")
        prompt = sampling.prompt_bucket(cfg.data.max_prompt_len)
        args = (state, abstract_batch(rollouts, prompt + response_len, response_len),
                abstract_packed(rows, seq_len, packing.count_bucket(-(-rollouts // rows)), shards))
    with jax.set_mesh(mesh):
        return build_step(cfg, graphdef, optimizer, state_sh, mesh).lower(*args)


def make_score(cfg) -> Callable:
    """score(graphdef, params, input_ids, attention_mask, num_response, temperature) ->
    float32 [B, num_response]: response_logprobs of a no-gradient pass (pi_old, the teacher,
    GRPO's reference), jitted (graphdef, num_response and temperature static).

    The rows go through in cfg.micro_batches strided micro-batches, as the train step takes
    them, so a scoring pass holds one micro-batch's activations, not the whole batch's.
    With config.packing the rows are packed first, as the step packs them (on the host: each
    process its own rows, over its own batch shards; call it under the rows' mesh): one
    packed row per batch shard per micro-batch; the log-probs come back in the rows' order
    (values at positions past a response's end are meaningless, as without packing).
    """
    chunk, n = int(cfg.model.logprob_chunk), int(cfg.micro_batches)

    def score(graphdef, params, ids, mask, num_response, temperature):
        model = nnx.merge(graphdef, params)

        def one(xs):
            ids_mb, mask_mb = (shd.constrain(x, ("batch", None)) for x in xs)
            return response_logprobs(model, ids_mb, mask_mb, num_response, chunk, temperature)

        out = jax.lax.map(one, _strided_micro_batches((ids, mask), n))  # [n, B / n, M]
        return out.swapaxes(0, 1).reshape(ids.shape[0], num_response)  # back to row order

    def packed_score(graphdef, params, packed: Packed, num_response, temperature):
        """-> float32 [S * n * K, M]: each loss slot's response log-probs, shard-major."""
        model = nnx.merge(graphdef, params)
        shards = batch_shards(jax.sharding.get_abstract_mesh())
        _, (ids, segments, _, predict) = _packed_micro_batches({}, packed, shards)

        def one(xs):  # one packed row per shard: [S, C], [S, C], [S, K] -> [S, K, M]
            ids_mb, seg_mb, predict_mb = (shd.constrain(x, ("batch", None)) for x in xs)
            return slot_logprobs(model, ids_mb, seg_mb, predict_mb, num_response, chunk, temperature)

        out = jax.lax.map(one, (ids, segments, predict))  # [n, S, K, M]
        return out.swapaxes(0, 1).reshape(-1, num_response)

    if not cfg.get("packing"):
        return jax.jit(score, static_argnums=(0, 4, 5))
    packed_jit = jax.jit(packed_score, static_argnums=(0, 3, 4))

    def score_packed(graphdef, params, ids, mask, num_response, temperature):
        mesh = jax.sharding.get_mesh()  # the caller's (under_mesh); empty: one device
        put = ((lambda x: jax.tree.map(jnp.asarray, x)) if mesh.empty
               else lambda x: jax.device_put(_global(x, mesh), batch_sharding(mesh)))
        local_ids, local_mask = sampling.local_rows(ids), sampling.local_rows(mask)
        p, packed = _pack_local(local_ids, local_mask, num_response, batch_shards(mesh),
                                ids.shape[0], int(cfg.packing))
        slots = sampling.local_rows(packed_jit(graphdef, params, put(packed), num_response, temperature))
        s, n_mb, k = p.rollout.shape
        slots = slots.reshape(s, n_mb, k, num_response)
        per = len(local_ids) // s
        out = np.zeros((len(local_ids), num_response), np.float32)
        shard, j, slot = np.nonzero(p.real)
        # slot -> its row in the plan's order -> the row it came from
        out[p.order[shard * per + p.rollout[shard, j, slot]]] = slots[shard, j, slot]
        return put(out)

    return score_packed


def lower_score(cfg, role: str, *, rows: int, seq_len: int, response_len: int, mesh=None,
                num_layers: int | None = None) -> jax.stages.Lowered:
    """Lowers, without weights, the scoring pass train() runs for cfg.<role> ("teacher" or
    "student": pi_old and GRPO's reference) on rows x seq_len tokens (see make_score),
    unpacked (with config.packing train() packs the rows on the host first, into micro-batches
    of one packed row per batch shard)."""
    mesh = shd.make_mesh(cfg.mesh) if mesh is None else mesh
    check_partition(cfg, mesh, rows)
    graphdef, params, _ = abstract_model(cfg, role, mesh, num_layers)
    rows_sh = batch_sharding(mesh)
    ids = jax.ShapeDtypeStruct((rows, seq_len), jnp.int32, sharding=rows_sh)
    mask = jax.ShapeDtypeStruct((rows, seq_len), jnp.bool_, sharding=rows_sh)
    with jax.set_mesh(mesh):
        unpacked = cfg.copy_and_resolve_references()
        unpacked.packing = 0
        return make_score(unpacked).lower(graphdef, params, ids, mask, response_len, 1.0)


def response_bucket(length: int, cap: int, minimum: int = 16) -> int:
    """The response positions a step keeps when its longest response has `length` tokens: the
    smallest of 2^k and 1.5 * 2^k that holds it (at least `minimum`, at most `cap`), so the
    train step compiles for about two shapes per doubling of the response length."""
    b = minimum
    while b < length:
        b = b * 3 // 2 if b & (b - 1) == 0 else b // 3 * 4  # 2^k -> 1.5 * 2^k -> 2^(k+1)
    return min(b, cap)


# --------------------------------------------------------------------------------------------
# The host loop.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Stop:
    """Set by SIGTERM or SIGINT (Ctrl-C): the loop writes a checkpoint after the current step and
    exits (SIGINT: raising Interrupted). A second SIGINT raises KeyboardInterrupt at once."""

    requested: bool = False
    signum: int = 0

    def __call__(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt("second interrupt: stopped at once, without waiting for the step")
        log.warning("signal %d: checkpointing after this step, then exiting", signum)
        self.requested, self.signum = True, signum


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT after writing its checkpoint; the message says which."""


def _dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _load_models(cfg, mesh):
    from scope_jax.models import load_hf

    if cfg.get("teacher_url"):  # refuse what a remote teacher cannot do before reading weights
        teachers.check_remote_config(cfg)
    m = cfg.model
    student = load_hf(cfg.student, dtype=_dtype(m.dtype), param_dtype=_dtype(m.param_dtype), mesh=mesh,
                      remat=m.remat_policy)
    teacher = None
    if algorithms.loads_local_teacher(cfg):  # else it lives on its server (config.teacher_url)
        teacher = load_hf(cfg.teacher, dtype=_dtype(m.teacher_dtype), mesh=mesh)
        # issue 23: a NaN teacher is named at load (its tensor, or its logits), as the student export is
        if jax.process_count() == 1:
            from scope_jax.models.hf import check_finite

            check_finite(teacher, f"teacher {cfg.teacher}")
        else:
            checkpoint.check_finite(nnx.to_pure_dict(nnx.state(teacher)), f"teacher {cfg.teacher}: parameter")
    return student, teacher


def _load_prompts(cfg, tokenizer):
    from scope_jax import data

    examples = []
    for f in ([cfg.data.train_files] if isinstance(cfg.data.train_files, str) else list(cfg.data.train_files)):
        examples.extend(data.load_examples(f, cfg.data.spec or None, on_error=cfg.data.on_error))
    ids, kept = data.encode_prompts(examples, tokenizer, max_prompt_len=cfg.data.max_prompt_len,
                                    instruction=cfg.data.instruction or None, style=cfg.data.style)
    items = [(tok, examples[i].answer) for tok, i in zip(ids, kept)]
    if len(items) < cfg.prompts_per_step:
        raise ValueError(f"only {len(items)} usable prompts, fewer than prompts_per_step={cfg.prompts_per_step}")
    return data.PromptLoader(items, batch_size=cfg.prompts_per_step, seed=cfg.seed)


def _to_host(metrics: dict) -> dict:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def train(cfg) -> dict:
    """Runs cfg.num_steps of cfg.algo; returns the last step's metrics. See the module docstring.

    One writer per workdir: holds {workdir}/run.lock for the whole run (checkpoint.WorkdirLock;
    raises checkpoint.WorkdirLocked when another trainer holds it)."""
    config_lib.validate(cfg)  # before the workdir exists
    shd.initialize_distributed()
    os.makedirs(cfg.workdir, exist_ok=True)
    with checkpoint.WorkdirLock(cfg.workdir):
        return _train_locked(cfg)


def _train_locked(cfg) -> dict:
    """train() under the workdir's lock (train() validated cfg and made the workdir)."""
    from transformers import AutoTokenizer

    from scope_jax.models import save_hf
    from scope_jax.verifiers import Verifier

    compat.check_tokenizers(cfg)  # student and teacher tokenizers map text to the same ids
    # Before any weights load: the workdir must hold this run (or none), see scope_jax.checkpoint.
    checkpoint.check_identity(cfg.workdir, checkpoint.identity(cfg), force=cfg.resume == "force")
    mesh = shd.make_mesh(cfg.mesh)
    check_partition(cfg, mesh, cfg.prompts_per_step * cfg.num_samples)
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.student)
    loader = _load_prompts(cfg, tokenizer)
    student, teacher = _load_models(cfg, mesh)
    graphdef, params = nnx.split(student)
    params = nnx.to_pure_dict(params)
    # GRPO's reference is the initial student; a copy, because the train state is donated.
    ref_params = jax.tree.map(jnp.copy, params) if algorithms.get(cfg.algo).reference(cfg) else None
    optimizer = make_optimizer(cfg)
    state = TrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))

    ckpt = checkpoint.Checkpointer(os.path.join(cfg.workdir, "checkpoints"), max_to_keep=cfg.max_to_keep,
                                   async_save=cfg.async_checkpointing)
    restored = ckpt.restore_latest(state)  # verified: checksums and finite leaves
    if restored is None:
        checkpoint.check_finite(params, f"{cfg.student}: the initial student's parameter")
    state = restored if restored is not None else state
    start = int(state.step)
    log.info("%s from step %d (%s)", "resuming" if restored is not None else "starting", start,
             ckpt.directory if restored is not None else cfg.student)
    metrics_out = (checkpoint.Metrics(os.path.join(cfg.workdir, "metrics.jsonl"), start)
                   if jax.process_index() == 0 else None)
    board = tracking.MetricsWriter.for_training(cfg, start) if jax.process_index() == 0 else None  # TensorBoard / W&B

    state_sh = state_shardings(optimizer, nnx.to_pure_dict(shd.model_shardings(student, mesh)), mesh, params)
    state, batch_sh = jax.device_put(state, state_sh), batch_sharding(mesh)
    step_fn = under_mesh(build_step(cfg, graphdef, optimizer, state_sh, mesh), mesh)
    alg = algorithms.get(cfg.algo)
    # Who scores the rollouts: the loaded teacher, or the server at config.teacher_url.
    teacher_scorer = teachers.from_config(cfg, teacher, mesh) if alg.teacher_scores else None
    stop = _Stop()
    previous = signal.signal(signal.SIGTERM, stop)
    previous_int = signal.signal(signal.SIGINT, stop)  # Ctrl-C: as SIGTERM, then Interrupted
    teacher_nan = []  # steps whose teacher log-probs held NaN / inf (issue 23)
    verifier = Verifier(num_workers=cfg.verifier.num_workers, timeout_s=cfg.verifier.timeout_s)
    collector = Collector(
        cfg=cfg, loader=loader, tokenizer=tokenizer, verifier=verifier, graphdef=graphdef,
        score=under_mesh(make_score(cfg), mesh), mesh=mesh,
        # The same stop ids as evaluation (sampling.stop_ids), plus config.sampling.eos_ids.
        eos=sampling.stop_ids(student.config, tokenizer, cfg.sampling.eos_ids or (), checkpoint=cfg.student),
        pad=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        key=jax.random.key(cfg.seed),
        sampler=nnx.split(teacher) if alg.samples_with == "teacher" else None,
        reference=ref_params, teacher_scorer=teacher_scorer)
    # The streak of skipped steps continues across a resume (from the kept metrics rows).
    bad_in_a_row, last = metrics_out.tail_skipped if metrics_out is not None else 0, {}
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        bad_in_a_row = int(multihost_utils.broadcast_one_to_all(np.int32(bad_in_a_row)))
    try:
        progress = _progress(start, cfg.num_steps) if jax.process_index() == 0 else None
        for step in range(start, cfg.num_steps):
            t0 = time.perf_counter()
            try:
                batch, info = collector.collect(step, state.params)
            except teachers.TeacherError as e:
                # The teacher's server is gone: keep every finished step, then stop.
                ckpt.manager.wait_until_finished()
                if int(state.step) not in ckpt.manager.all_steps():
                    ckpt.save(state, wait=True)
                raise teachers.TeacherError(
                    f"{e}\nstep {step} was not trained; checkpoint {int(state.step)} in {ckpt.directory} "
                    "holds every finished step: the same command resumes from it") from e
            t1 = time.perf_counter()
            if alg.teacher_scores and checkpoint.first_nonfinite(batch.teacher_logprobs) is not None:
                teacher_nan.append(step)
                log.error("step %d: the teacher's log-probs hold NaN or inf: teacher %s", step,
                          cfg.teacher_url or cfg.teacher)
            if cfg.packing:  # several rollouts per row; seq_len and padding: the packed rows'
                batch, packed, layout = pack_rollouts(batch, mesh, cfg.packing)
                info.update(layout)
                state, m = step_fn(state, jax.device_put(batch, batch_sh), jax.device_put(packed, batch_sh))
            else:
                state, m = step_fn(state, jax.device_put(batch, batch_sh))
            m = _to_host(m)
            dt = time.perf_counter() - t0
            # accuracy: the verifier's fraction of correct rollouts (the loss's own "accuracy"
            # leaves out empty responses and is 0 by construction for OPD).
            row = {"step": step, **m, **info, "accuracy": m["reward"], "time_s": dt,
                   "rollout_s": t1 - t0, "time/update_s": dt - (t1 - t0),
                   "rollouts_per_s": info["rollouts"] / dt}
            if jax.process_index() == 0:
                metrics_out.write(row)
                board.write(step, row)
                progress(step, row)
            last = row
            bad_in_a_row = bad_in_a_row + 1 if m["skipped"] else 0
            if m["skipped"]:
                log.error("step %d: non-finite loss (%s), gradient norm (%s) or updated parameters; "
                          "update skipped (%d in a row)", step, m["loss"], m["grad_norm"], bad_in_a_row)
                # A run may not end on a streak of skipped steps either (K = the limit, or the
                # whole run when it is shorter): its model failed its last batches.
                limit = cfg.max_nonfinite_steps
                if bad_in_a_row >= (min(limit, cfg.num_steps) if step + 1 == cfg.num_steps else limit):
                    raise checkpoint.NonFiniteError(
                        f"{bad_in_a_row} non-finite step(s) in a row, up to step {step} of {cfg.num_steps} "
                        f"(max_nonfinite_steps={cfg.max_nonfinite_steps}); no export written. "
                        + (f"The teacher's log-probs were non-finite in step(s) {teacher_nan}: the teacher "
                           f"{cfg.teacher_url or cfg.teacher} (teacher_temperature={cfg.teacher_temperature}) failed, "
                           "not the student. " if teacher_nan else "")
                        + f"{_last_good(ckpt, step + 1 - bad_in_a_row, step)}")
            done = step + 1
            if stop.requested or done % cfg.checkpoint_every == 0 or done == cfg.num_steps:
                ckpt.save(state, wait=stop.requested)
            if stop.requested:
                log.warning("stopped by signal after step %d; checkpoint %d written", step, done)
                if stop.signum == signal.SIGINT:
                    raise Interrupted(f"interrupted (Ctrl-C) after step {step}: checkpoint {done} written in "
                                      f"{ckpt.directory}; the same command resumes from it")
                break
        else:
            if cfg.export and int(state.step) == cfg.num_steps:
                _check_finite_model(graphdef, state.params, loader, ckpt)
                _export(cfg, graphdef, state.params, tokenizer, save_hf)
    finally:
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous)
        verifier.close()
        if teacher_scorer is not None:
            teacher_scorer.close()
        ckpt.close()
        if board is not None:
            board.close()
    return last


def under_mesh(fn: Callable, mesh) -> Callable:
    """fn called under jax.set_mesh(mesh), where the model's activation sharding constraints
    (scope_jax.sharding.constrain) take effect; without a mesh in context they do nothing."""
    def call(*args):
        with jax.set_mesh(mesh):
            return fn(*args)
    return call


def _last_good(ckpt, first_bad: int, last_bad: int) -> str:
    """Which checkpoint to go back to: checkpoint N holds the state after steps 0..N-1, and a
    skipped step leaves parameters and optimizer state as they were, so every checkpoint N with
    N <= last_bad holds a state from before the first skipped step (first_bad..last_bad skipped)."""
    ckpt.manager.wait_until_finished()
    good = [s for s in ckpt.manager.all_steps() if s <= last_bad]
    if not good:
        return ("No checkpoint holds a state from before the first skipped step: start again from the initial "
                "student, e.g. with a lower optim.lr in a new workdir.")
    n = max(good)
    why = ("the state step {f} started from" if n == first_bad else
           "the state from before the first skipped step {f}" + (" (the skipped steps changed nothing)" if n > first_bad else ""))
    return (f"Newest checkpoint holding {why.format(f=first_bad)}: {ckpt.directory}/{n}; continue from it with other "
            "settings (e.g. a lower optim.lr) and --config.resume=force, or in a new workdir.")


def _check_finite_model(graphdef, params, loader, ckpt) -> None:
    """Raises NonFiniteError unless every parameter, and the logits of one training prompt, are finite."""
    what = f"final model, no export written (checkpoints: {ckpt.directory}): parameter"
    checkpoint.check_finite(params, what)
    if jax.process_count() > 1:  # the logits check runs on one host's model only (not yet global)
        return
    ids = jnp.asarray([loader.batch_at(0)[0][0]], jnp.int32)
    if not bool(jnp.isfinite(nnx.merge(graphdef, params)(ids)).all()):
        raise checkpoint.NonFiniteError(f"{what}s are finite but the logits of the first training prompt are not")


def _progress(start: int, total: int):
    """A tqdm bar showing step, rollouts/s, accuracy and loss (plain log lines if tqdm is absent)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return lambda step, row: log.info("step %d %s", step, row)
    bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, mininterval=0)

    def update(step, row):
        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.3f}",
                        rps=f"{row['rollouts_per_s']:.1f}", refresh=False)
        bar.update(1)
        if step + 1 == total:
            bar.close()

    return update


@dataclasses.dataclass
class Collector:
    """A step's prompts -> a Rollouts batch: generate, verify and score (the old / teacher /
    reference log-probs, as scope_jax.algorithms says the algorithm needs), as a pipeline.

    Built once by train(); `collect(step, params)` runs the stages for one step. The prompts go
    in config.pipeline.chunks chunks, generated one after another. With pipeline.overlap, each
    finished chunk's verification (host processes) and, when the teacher is remote
    (config.teacher_url), its teacher scoring start in worker threads while the next chunk
    generates; the chunks are then assembled into one batch (assemble_chunks) for the student's
    passes (pi_old, GRPO's reference) and a co-located teacher's, which stay on this thread
    (LocalTeacher.remote says why), then the teacher's and the verifier's results are awaited.
    Without overlap the same calls run in series on this thread: generation, then the passes,
    then each chunk's teacher scores and verification. The order of work changes, not the math.

    The returned info has each stage's time summed over chunks ("time/<stage>_s": generate,
    verify, score_old, score_teacher, score_ref) and the time the teacher and the verifier added
    to the critical path after the student's passes ("critical/score_teacher_s": the wait for
    the teacher's scores, all of its time when it is co-located or not overlapped;
    "critical/verify_s": the wait for the verifier's labels).
    """

    cfg: Any
    loader: Any  # data.PromptLoader: (prompt ids, gold) of each step
    tokenizer: Any
    verifier: Any  # verifiers.Verifier pool (thread-safe)
    graphdef: Any  # the student's
    score: Callable  # make_score(cfg) under the mesh
    mesh: Any
    eos: list[int]  # sampling.stop_ids
    pad: int
    key: jax.Array  # the run's base PRNG key (each step folds its index in, each chunk its own)
    sampler: Any = None  # (graphdef, params) of the teacher when it samples (KD)
    reference: Any = None  # GRPO's frozen initial student params
    teacher_scorer: Any = None  # scope_jax.teacher.Teacher when the algorithm needs its scores

    def __post_init__(self):
        if int(self.cfg.pipeline.chunks) > 1 and jax.process_count() > 1:
            raise ValueError(f"config.pipeline.chunks={self.cfg.pipeline.chunks}: chunked collection runs in "
                             "one process only (chunks are assembled from local rows); use 1 on several hosts")

    def collect(self, step: int, params):
        """(Rollouts batch, info dict) of `step`'s prompts under the student's `params`."""
        from scope_jax.sampling import full_sequences, response_lists

        cfg, alg, s, times = self.cfg, algorithms.get(self.cfg.algo), self.cfg.sampling, {}
        chunks, overlap = int(cfg.pipeline.chunks), bool(cfg.pipeline.overlap)

        def timed(name, fn, *args):
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(*args))
            key = f"time/{name}_s"  # each key is written by one thread only
            times[key] = times.get(key, 0.0) + time.perf_counter() - t0
            return out

        items = self.loader.batch_at(step)
        per_chunk = len(items) // chunks  # prompts; config.validate checks that chunks divides them
        golds = [a for _, a in items for _ in range(cfg.num_samples)]
        temp = alg.temperature(cfg)
        policy = nnx.merge(*self.sampler) if alg.samples_with == "teacher" else nnx.merge(self.graphdef, params)
        stream_teacher = alg.teacher_scores and self.teacher_scorer.remote
        step_key = jax.random.fold_in(self.key, step)

        def rollouts(c):
            out = sampling.generate(
                policy, [p for p, _ in items[c * per_chunk:(c + 1) * per_chunk]], num_samples=cfg.num_samples,
                max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k or None,
                top_p=s.top_p or None, eos_ids=self.eos, pad_id=self.pad, key=chunk_key(step_key, c, chunks),
                mesh=self.mesh if self.mesh.size > 1 else None, repetition_penalty=s.repetition_penalty)
            # Each process decodes and verifies its own rollouts (verification spreads over hosts).
            return out, self.tokenizer.batch_decode(response_lists(out), skip_special_tokens=True)

        def teacher_logprobs(ids, mask, m):
            return self.teacher_scorer.score(ids, mask, m).logprobs

        pools = [concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=p) for p in ("verify", "teacher")]
        submit = ((lambda pool, *a: pool.submit(timed, *a)) if overlap
                  else (lambda pool, *a: _Later(timed, *a)))  # in series: run when awaited
        outs, verifying, scoring = [], [], []
        rows = per_chunk * cfg.num_samples
        try:
            for c in range(chunks):
                out, texts = timed("generate", rollouts, c)
                outs.append(out)
                verifying.append(submit(pools[0], "verify", self.verifier.verify_batch, texts,
                                        golds[c * rows:(c + 1) * rows]))
                if stream_teacher:  # scored at the chunk's own response length (place_chunks)
                    cut, _ = _trim_responses(out, s.max_new_tokens)
                    scoring.append(submit(pools[1], "score_teacher", teacher_logprobs, *full_sequences(cut),
                                          cut.tokens.shape[1]))
            out, shape_info = _trim_responses(assemble_chunks(outs, per_chunk, self.pad), s.max_new_tokens)
            ids, mask = full_sequences(out)
            m = out.tokens.shape[1]
            zeros = jnp.zeros(out.tokens.shape, jnp.float32)
            old, teacher_lp, ref_lp = zeros, zeros, zeros
            if alg.old_logprobs:
                # The sampler's policy_logprobs are at temperature 1; at any other policy
                # temperature the behaviour log-probs come from the training forward pass.
                old = (out.policy_logprobs if temp == 1.0 and not cfg.recompute_old_logprobs
                       else timed("score_old", self.score, self.graphdef, params, ids, mask, m, temp))
            if self.reference is not None:
                ref_lp = timed("score_ref", self.score, self.graphdef, self.reference, ids, mask, m, temp)
            t0 = time.perf_counter()
            if stream_teacher:
                teacher_lp = place_chunks([f.result() for f in scoring], m)
            elif alg.teacher_scores:
                teacher_lp = timed("score_teacher", teacher_logprobs, ids, mask, m)
            if alg.teacher_scores:
                times["critical/score_teacher_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            results = [r for f in verifying for r in f.result()]
            times["critical/verify_s"] = time.perf_counter() - t0
        finally:
            for pool in pools:
                pool.shutdown(wait=True, cancel_futures=True)
        correct = _global(np.array([r.reward > 0 for r in results]), self.mesh)  # -> the global [B] labels
        batch = Rollouts(input_ids=ids, attention_mask=mask, response_mask=out.response_mask,
                         old_logprobs=old, teacher_logprobs=teacher_lp, ref_logprobs=ref_lp,
                         correct=jnp.asarray(correct), group_ids=out.group_ids)
        reasons = [r.reason for r in results]
        info = {  # this host's rollouts
            "rollouts": int(len(results)),
            "finished_eos": float(np.mean(sampling.local_rows(out.finish_reason) == sampling.FINISH_EOS)),
            "verifier_timeouts": float(reasons.count("timeout")),
            **shape_info, **times,
        }
        return batch, info


class _Later:
    """fn(*args) run on the calling thread when its result is first asked for: the in-series
    twin of a worker thread's Future, so that both orders of work share one code path."""

    def __init__(self, fn, *args):
        self._fn, self._args = fn, args

    def result(self):
        if self._fn is not None:
            self._value, self._fn = self._fn(*self._args), None
        return self._value


def chunk_key(step_key: jax.Array, chunk: int, chunks: int) -> jax.Array:
    """The sampling key of prompt chunk `chunk` of a step split into `chunks`: the step's key
    itself for one chunk (the key a step had before chunking), else the step's key with the
    chunk's index folded in. The rollouts depend on (step, chunk, chunks) only."""
    return step_key if chunks == 1 else jax.random.fold_in(step_key, chunk)


def assemble_chunks(outs: list, prompts_per_chunk: int, pad_id: int):
    """SamplerOutputs of consecutive prompt chunks -> one SamplerOutput of all their rows in
    order, what sampling them together would have laid out: each chunk's prompts left-padded
    with pad_id to the widest chunk's prompt bucket (prompt_lengths keep the padding out of the
    attention mask), group ids offset by the prompts of the chunks before it. Every chunk's
    responses have the sampler's max_new_tokens positions, so they line up as they are (trim
    the assembled output with _trim_responses). One chunk comes back as it is."""
    if len(outs) == 1:
        return outs[0]
    width = max(o.prompt_ids.shape[1] for o in outs)
    parts = [o.replace(prompt_ids=jnp.pad(o.prompt_ids, ((0, 0), (width - o.prompt_ids.shape[1], 0)),
                                          constant_values=pad_id),
                       group_ids=o.group_ids + c * prompts_per_chunk) for c, o in enumerate(outs)]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)


def place_chunks(parts: list, num_response: int) -> jax.Array:
    """Per-chunk response-aligned scores -> the assembled batch's: parts[c] f32 [B_c, m_c] (a
    chunk's teacher log-probs at its own trimmed response length m_c <= num_response) ->
    f32 [sum B_c, num_response], rows in chunk order, zero past each chunk's m_c (no response
    token of that chunk reaches there). One part of the full width comes back as it is."""
    if len(parts) == 1 and parts[0].shape[1] == num_response:
        return parts[0]
    return jnp.concatenate([jnp.pad(x, ((0, 0), (0, num_response - x.shape[1]))) for x in parts])


def _trim_responses(out, max_new_tokens: int):
    """Cuts the rollouts' response positions to response_bucket(longest response), so the
    scoring passes and the step process what the rollouts hold, not prompt bucket +
    max_new_tokens. Returns (out, {"seq_len": the step's tokens per row, "padding": this host's
    share of padding positions}); seq_len is the same on every host (global longest)."""
    lengths, prompts = sampling.local_rows(out.lengths), sampling.local_rows(out.prompt_lengths)
    longest = int(lengths.max())
    if jax.process_count() > 1:  # every host must cut to the same shape
        from jax.experimental import multihost_utils

        longest = int(np.max(multihost_utils.process_allgather(np.int32(longest))))
    m = response_bucket(longest, int(max_new_tokens))
    out = out.replace(tokens=out.tokens[:, :m], response_mask=out.response_mask[:, :m],
                      logprobs=out.logprobs[:, :m], policy_logprobs=out.policy_logprobs[:, :m])
    seq_len = out.prompt_ids.shape[1] + m
    real = float(lengths.sum() + prompts.sum())
    return out, {"seq_len": float(seq_len), "padding": 1.0 - real / (len(lengths) * seq_len)}


def _export(cfg, graphdef, params, tokenizer, save_hf) -> None:
    """Final Hugging Face checkpoint (config.json + safetensors + tokenizer) in {workdir}/export."""
    path = os.path.join(cfg.workdir, "export")
    if os.path.exists(path):
        shutil.rmtree(path)
    save_hf(nnx.merge(graphdef, params), path)
    tokenizer.save_pretrained(path)
    log.info("exported %s", path)


# --------------------------------------------------------------------------------------------
# Dry run: the whole step's shapes and shardings on the configured mesh, without weights.
# --------------------------------------------------------------------------------------------


def _hf_config(cfg, role: str) -> dict:
    """config.json of cfg.<role>, or the architecture written in cfg.arch.<role>."""
    path = os.path.join(cfg[role], "config.json") if cfg[role] else ""
    if path and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    if "arch" in cfg and role in cfg.arch:
        return cfg.arch[role].to_dict()
    raise FileNotFoundError(f"no {path or role + ' path'} and no config.arch.{role} to build shapes from")


def dry_run(cfg) -> dict:
    """Builds the mesh and the parameter shardings, and lowers the train step train() runs
    (lower_step: no weights are created, nothing is compiled); reports parameters and bytes
    per device. tools/scale_check.py compiles the same step for memory, FLOPs and collectives."""
    mesh = shd.make_mesh(cfg.mesh)
    report = {"mesh": {k: int(v) for k, v in mesh.shape.items()}, "devices": int(mesh.size)}
    for role in ("student", "teacher") if algorithms.loads_local_teacher(cfg) else ("student",):
        _, params, shardings = abstract_model(cfg, role, mesh)
        leaves, shard_leaves = jax.tree.leaves(params), jax.tree.leaves(shardings)
        per_device = sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                         for x, s in zip(leaves, shard_leaves))
        report[role] = {"params": int(sum(math.prod(x.shape) for x in leaves)),
                        "param_bytes_per_device": int(per_device)}
    rows = cfg.prompts_per_step * cfg.num_samples  # global: the step takes the global batch
    p, r = sampling.prompt_bucket(cfg.data.max_prompt_len), int(cfg.sampling.max_new_tokens)
    # Packed: the most packed rows a batch can need, one rollout per row of config.packing tokens.
    lowered = lower_step(cfg, rows=rows, seq_len=cfg.packing or p + r, response_len=r, mesh=mesh)
    new_state, metrics = lowered.out_info
    report["batch"] = {"rollouts": rows, "sequence": cfg.packing or p + r,
                       "micro_batches": int(cfg.micro_batches), "packing": int(cfg.packing)}
    report["train_step"] = {"metrics": sorted(metrics), "state_leaves": len(jax.tree.leaves(new_state))}
    return report
