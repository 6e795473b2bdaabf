"""Token log-probs and the no-gradient scoring passes: pi_old, the teacher, GRPO's reference.

    score = make_score(cfg)                          # the pass train() runs (packed or not)
    lp = score(graphdef, params, ids, mask, m, T)    # f32 [B, m], under the rows' mesh
    lp = score(graphdef, params, ids, mask, m, T, packed=pb)   # with the step's PackedBatch

`response_logprobs` (rows of left-padded prompt + response) and `slot_logprobs` (packed rows,
scope_jax.packing) are what the train step differentiates and what the scoring passes run
without gradient; `make_score` micro-batches them as the step does, and `lower_score` lowers,
without weights, exactly the jitted pass `make_score` runs for a config (the packed one when
config.packing is on), for the dry run and tools/scale_check.py.

Temperature: log softmax(logits / T) is taken on the float32 logits (losses.token_logprobs
divides each float32 vocabulary tile), never by dividing bf16 hidden states first, which
rounds every hidden unit (per-token error 6.5e-3 mean at H = 1536 against 3.8e-6).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from scope_jax import losses, packing
from scope_jax import sharding as shd
from scope_jax.models import abstract_model


def response_logprobs(model, input_ids, attention_mask, num_response: int, chunk_size: int = 512,
                      temperature: float = 1.0):
    """log softmax(logits / temperature) of each response token under `model`, float32 [B, M].

    input_ids, attention_mask: [B, P + M], the response in the last M columns. The hidden
    state at position P + t - 1 predicts response token t; only the M hidden states that
    predict response tokens go through the vocabulary-tiled log-softmax.
    """
    hidden = model.hidden(input_ids, attention_mask=attention_mask)
    p = input_ids.shape[1] - num_response
    return token_logprobs(model, hidden[:, p - 1: p - 1 + num_response], input_ids[:, p:],
                          chunk_size, temperature)


def packed_logprobs(model, input_ids, segment_ids, chunk_size: int = 512,
                    temperature: float = 1.0):
    """float32 [R, C]: at each position of packed rows (scope_jax.packing), the log-prob of the
    row's next token given the position's own sequence (segments attend within themselves).
    The last position of a sequence scores the next sequence's first token: meaningless, and
    never read (the loss reads the positions that predict response tokens)."""
    hidden = model.hidden(input_ids, segment_ids=segment_ids)
    targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    return token_logprobs(model, hidden, targets, chunk_size, temperature)


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


def token_logprobs(model, h, targets, chunk_size: int, temperature: float):
    """h [B, L, H] hidden states, targets int [B, L] -> float32 [B, L] log softmax(logits / T),
    the logits of model's lm_head, divided by T in float32 (see the module docstring)."""
    # The rows are split over the batch axes and repeated over 'tensor': split the positions
    # over 'tensor' too, and give each chip the whole (gathered) lm_head, so that no chip
    # repeats another's vocabulary-sized work (the vocabulary tiles slice the lm_head freely).
    h = shd.constrain(h, ("batch", "logprob_length", None))
    targets = shd.constrain(targets, ("batch", "logprob_length"))
    w = shd.constrain(model.lm_head_weight(), (None, None))
    return shd.constrain(losses.token_logprobs(h, w, targets, chunk_size=chunk_size, temperature=temperature),
                         ("batch", "logprob_length"))


def _settings(cfg, chunk_size: int) -> tuple[int, int, int]:
    """(vocabulary tile, micro-batches, packed row capacity or 0) of a config, or of none."""
    if cfg is None:
        return int(chunk_size), 1, 0
    return int(cfg.model.logprob_chunk), int(cfg.micro_batches), int(cfg.get("packing") or 0)


def make_score_pass(cfg=None, *, chunk_size: int = 512) -> Callable:
    """The jitted device pass of make_score (what lower_score lowers):

      unpacked: (graphdef, params, ids, mask [B, T], num_response, temperature) -> f32 [B, M],
        the rows in config.micro_batches strided micro-batches, as the train step takes them,
        so a pass holds one micro-batch's activations, not the whole batch's;
      packed (config.packing): (graphdef, params, packed: packing.Packed, num_response,
        temperature) -> f32 [S * n * K, M], each loss slot's log-probs (shard-major), one
        packed row per batch shard per micro-batch, as the step takes them.
    graphdef, num_response and temperature are static. Call it under the rows' mesh.
    cfg None: one micro-batch, unpacked, vocabulary tiles of chunk_size.
    """
    chunk, n, capacity = _settings(cfg, chunk_size)

    def score(graphdef, params, ids, mask, num_response, temperature):
        model = nnx.merge(graphdef, params)

        def one(xs):
            ids_mb, mask_mb = (shd.constrain(x, ("batch", None)) for x in xs)
            return response_logprobs(model, ids_mb, mask_mb, num_response, chunk, temperature)

        out = jax.lax.map(one, shd.strided_micro_batches((ids, mask), n))  # [n, B / n, M]
        return out.swapaxes(0, 1).reshape(ids.shape[0], num_response)  # back to row order

    def packed_score(graphdef, params, packed: packing.Packed, num_response, temperature):
        model = nnx.merge(graphdef, params)
        shards = shd.batch_shards(jax.sharding.get_abstract_mesh())
        _, (ids, segments, _, predict) = packing.micro_batches({}, packed, shards)

        def one(xs):  # one packed row per shard: [S, C], [S, C], [S, K] -> [S, K, M]
            ids_mb, seg_mb, predict_mb = (shd.constrain(x, ("batch", None)) for x in xs)
            return slot_logprobs(model, ids_mb, seg_mb, predict_mb, num_response, chunk, temperature)

        out = jax.lax.map(one, (ids, segments, predict))  # [n, S, K, M]
        return out.swapaxes(0, 1).reshape(-1, num_response)

    if capacity:
        return jax.jit(packed_score, static_argnums=(0, 3, 4))
    return jax.jit(score, static_argnums=(0, 4, 5))


def make_score(cfg=None, *, chunk_size: int = 512) -> Callable:
    """score(graphdef, params, input_ids, attention_mask, num_response, temperature,
    packed=None) -> float32 [B, num_response]: response_logprobs of a no-gradient pass
    (pi_old, the teacher, GRPO's reference) through make_score_pass(cfg).

    With config.packing the rows go packed: `packed` is the step's packing.PackedBatch (the
    Collector plans it once per step and shares it with every pass and the step); without
    one the rows are planned here (each process its own rows, over its own batch shards).
    The log-probs come back in the rows' order (values past a response's end are meaningless,
    as without packing). Call it under the rows' mesh (sharding.under_mesh).
    """
    capacity = _settings(cfg, chunk_size)[2]
    device_pass = make_score_pass(cfg, chunk_size=chunk_size)
    if not capacity:
        def score(graphdef, params, ids, mask, num_response, temperature, packed=None):
            return device_pass(graphdef, params, ids, mask, num_response, temperature)
        return score

    def score_packed(graphdef, params, ids, mask, num_response, temperature, packed=None):
        mesh = jax.sharding.get_mesh()  # the caller's (under_mesh); empty: one device
        if packed is None:
            packed = packing.pack_batch(ids, mask, num_response, mesh, capacity)
        slots = device_pass(graphdef, params, packed.packed, num_response, temperature)
        return packing.unpack_slots(packed, slots, mesh)

    return score_packed


def lower_score(cfg, role: str, *, rows: int, seq_len: int, response_len: int, mesh=None,
                num_layers: int | None = None) -> jax.stages.Lowered:
    """Lowers, without weights, the scoring pass train() runs for cfg.<role> ("teacher" or
    "student": pi_old and GRPO's reference): make_score_pass(cfg) on cfg.mesh.

    Unpacked: rows x seq_len tokens, the last response_len the responses. With config.packing
    (as lower_step): `rows` packed rows of seq_len (= config.packing) tokens, over which the
    step's prompts_per_step x num_samples rollouts are dealt (count_bucket'ed slots per row).
    """
    mesh = shd.make_mesh(cfg.mesh) if mesh is None else mesh
    graphdef, params, _ = abstract_model(cfg, role, mesh, num_layers)
    rows_sh = shd.batch_sharding(mesh)
    capacity = _settings(cfg, 512)[2]
    if capacity:
        shards = shd.batch_shards(mesh)
        if rows % shards:
            raise ValueError(f"lower_score: {rows} packed rows do not split over the {shards} batch "
                             f"shards (one row per shard per micro-batch)")
        rollouts = cfg.prompts_per_step * cfg.num_samples
        args = (packing.abstract_packed(rows, seq_len, packing.count_bucket(-(-rollouts // rows)), shards, mesh),)
    else:
        shd.check_partition(cfg.micro_batches, mesh, rows)
        args = (jax.ShapeDtypeStruct((rows, seq_len), jnp.int32, sharding=rows_sh),
                jax.ShapeDtypeStruct((rows, seq_len), jnp.bool_, sharding=rows_sh))
    with jax.set_mesh(mesh):
        return make_score_pass(cfg).lower(graphdef, params, *args, response_len, 1.0)
