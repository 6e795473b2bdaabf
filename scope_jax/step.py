"""The train step: one jitted, donated update from a `Rollouts` batch, in micro-batches.

    step = build_step(cfg, graphdef, optimizer, state_shardings(...), mesh)
    state, metrics = step(state, batch)              # or (state, batch, packed) with config.packing

`make_train_step` is the pure update (strided row micro-batches, or with config.packing the
packed rows of scope_jax.packing, the same loss kernels either way); `build_step` jits it with
its shardings; `lower_step` lowers exactly that jit without weights (the dry run,
tools/scale_check.py, the tests). The losses are scope_jax.algorithms' for config.algo; the
log-probs are scope_jax.scoring's.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from scope_jax import algorithms, losses, packing, sampling
from scope_jax import sharding as shd
from scope_jax.models import abstract_model
from scope_jax.scoring import response_logprobs, slot_logprobs


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


def make_train_step(cfg, graphdef, optimizer) -> Callable:
    """(state, batch[, packed]) -> (state, metrics), pure; jit it with the state donated.

    Gradients are accumulated over micro-batches with the full batch's weights, advantages and
    denominators, so the update equals the one-shot update on the whole batch. Without
    `packed`: cfg.micro_batches strided row slices (see sharding.strided_micro_batches). With a Packed
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

    def step(state: TrainState, batch: Rollouts, packed: packing.Packed | None = None):
        aux = full_batch_constants(cfg, batch)
        row_aux = {k: v for k, v in aux.items() if k in ("weights", "advantages") and v is not None}
        shared = {k: v for k, v in aux.items() if k not in row_aux}

        def body(acc, xs):
            mb, mb_aux, rows = xs
            val, grads = jax.value_and_grad(micro_loss)(state.params, mb, {**shared, **mb_aux}, rows)
            return jax.tree.map(jnp.add, acc, (val, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
        if packed is None:
            micro = (*shd.strided_micro_batches((batch, row_aux), n_micro), None)
        else:
            shards = shd.batch_shards(jax.sharding.get_abstract_mesh())
            slots, rows = packing.micro_batches((batch, row_aux), packed, shards)
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


def state_shardings(optimizer, param_shardings, mesh, params) -> TrainState:
    """TrainState of NamedShardings: the optimizer's per-parameter leaves (Adam's moments)
    take their parameter's sharding, its other leaves (counts) are replicated."""
    replicated = NamedSharding(mesh, P())
    opt = jax.eval_shape(optimizer.init, params)
    opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, opt, param_shardings,
                                   transform_non_params=lambda _: replicated)
    return TrainState(params=param_shardings, opt_state=opt_sh, step=replicated)


def build_step(cfg, graphdef, optimizer, state_sh: TrainState, mesh) -> Callable:
    """The jitted update train() runs: the state donated, fixed shardings in and out (so step 1
    reuses step 0's executable). Call it, and lower it, under jax.set_mesh(mesh), which makes
    the model's activation sharding constraints take effect. With config.packing it takes
    (state, batch, packed), the Packed rows split over the batch shards like the rollouts."""
    rows = shd.batch_sharding(mesh)
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
    mesh = shd.make_mesh(cfg.mesh) if mesh is None else mesh
    rollouts = cfg.prompts_per_step * cfg.num_samples if cfg.get("packing") else rows
    shd.check_partition(cfg.micro_batches, mesh, rollouts)
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
        shards = shd.batch_shards(mesh)
        if rows % shards:
            raise ValueError(f"lower_step: {rows} packed rows do not split over the {shards} batch "
                             f"shards (one row per shard per micro-batch)")
        prompt = sampling.prompt_bucket(cfg.data.max_prompt_len)
        args = (state, abstract_batch(rollouts, prompt + response_len, response_len),
                packing.abstract_packed(rows, seq_len, packing.count_bucket(-(-rollouts // rows)), shards))
    with jax.set_mesh(mesh):
        return build_step(cfg, graphdef, optimizer, state_sh, mesh).lower(*args)


