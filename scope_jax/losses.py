"""SCOPE loss kernels and the baselines' losses: pure, jit-able functions of arrays.

This module imports only jax and numpy, so another trainer can take it on its own.

Layout (one for every per-token array)
--------------------------------------
B rollouts (rows) x T positions. Per-token arrays are [B, T], aligned with next-token
targets: ``logprobs[b, t] = log pi(targets[b, t] | prefix)``. ``response_mask`` [B, T]
(bool or 0/1) marks the response tokens that count; prompt and padding positions are 0 and
their values are never read (they may hold anything, even nan). ``group_ids`` int [B] names
the prompt each rollout answers; rows may come in any order and a group may straddle
devices. A row whose mask is all zero is padding: it gets weight 0 and counts nowhere.

Inputs may be any float dtype; the math is float32. Options given as strings are static
(pass them with functools.partial or static_argnames under jax.jit); tau may be traced.

Group operations use a [B, B] same-group mask: exact for any ordering and any sharding
(XLA inserts the collectives), and for B = 2,048 rollouts (256 prompts x 8) it costs
16 MB and microseconds, which is nothing next to the model.

The method (this docstring is the repository's description of it; the README's "What SCOPE
does" is the short version). Source: Zheng, Ma et al., "SCOPE: Signal-Calibrated On-Policy
Distillation Enhancement with Dual-Path Adaptive Weighting", arXiv:2604.10688; the authors'
verl-based code is github.com/machine981/SCOPE. Where the paper and the released code differ,
the paper is the default and the released behaviour an option.

Notation. For a prompt x the student draws N responses y_1..y_N (N = 8 in the paper),
y_i = (a_i1 .. a_iT_i); a verifier gives R_i in {0, 1}; Omega_c = {i : R_i = 1} (correct),
Omega_w = {i : R_i = 0} (wrong). pi_old is the behaviour policy that drew the rollouts (at
rollout temperature T: softmax(logits / T)), pi_theta the policy being updated, pi_T the
teacher. Only response tokens count (|y| excludes prompt and padding).

    rho_it = pi_theta(a_it | x, a_i<t) / pi_old(a_it | x, a_i<t)          importance ratio
    PPL(y | x) = exp(-(1 / |y|) sum_t log pi(a_t | x, a_<t))              sequence perplexity

Objective. The correct path needs no teacher, the wrong path is distilled from it:

    L_MLE(x, y_i) = - sum_t rho_it                                                  (i in Omega_c)
    L_OPD(x, y_i) =   sum_t rho_it * sg[log pi_theta(a_it | .) - log pi_T(a_it | .)]   (i in Omega_w)

sg[.] is stop-gradient: the bracket is a fixed per-token advantage (the sampled-token estimate
of the reverse KL) and only rho carries the gradient. At theta = theta_old the gradient of
L_MLE is minus the NLL gradient, that of L_OPD the REINFORCE gradient of the reverse KL. The
weights are softmaxes inside each prompt's group, separately over its correct and its wrong
rollouts (tau = 1 in every paper run), constants for the gradient:

    w_i^stu = softmax_{j in Omega_c}( -log pi_old(y_j | x) / (tau |y_j|) ) = PPL_S(y_i)^(1/tau)  / sum_j PPL_S(y_j)^(1/tau)
    w_i^tea = softmax_{j in Omega_w}( +log pi_T(y_j | x)   / (tau |y_j|) ) = PPL_T(y_i)^(-1/tau) / sum_j PPL_T(y_j)^(-1/tau)

    J_SCOPE = E_x[ sum_{i in Omega_c} w_i^stu L_MLE(x, y_i) + sum_{i in Omega_w} w_i^tea L_OPD(x, y_i) ]

So within a prompt each non-empty path's weights sum to 1, an all-correct prompt has only the
MLE path and an all-wrong one only the OPD path; nothing is thresholded, there is no KL
regulariser, SFT term or clipping, and token sums are sums (scope_loss(reduction="paper")).
Worked example (tau = 1): wrong rollouts with teacher PPL 1.361, 1.755, 2.383 get
w^tea = (0.426, 0.330, 0.243) (tau 0.5: 0.519, 0.312, 0.169; tau 2: 0.379, 0.334, 0.287);
correct rollouts with student PPL 1.2, 1.5, 2.0 get w^stu = (0.255, 0.319, 0.426).

The released code's variants (options here): weights rescaled to mean 1 per path
(normalize="mean"); verl's token-mean reduction (reduction="token_mean"); the wrong path as a
KL penalty in the loss (distill="kl", kl="k1" | "k3", or the teacher's top-k reverse KL) or as
the per-token reward -(log pi_old - log pi_T) w^tea of a PPO-clipped loss (distill="ppo", clip
0.2); sign flags per path for ablations (student_weighting / teacher_weighting = "reversed" or
"uniform"; the released run script weights low student PPL higher, the opposite of the paper).

The paper's setup (configs/paper_*.py carry it). Students DeepSeek-R1-Distill-Qwen-1.5B
(teacher Skywork-OR1-7B) and Qwen3-1.7B-Base (teacher Qwen3-8B), trained on DeepMath-103K.
GRPO / OPD / SCOPE share: AdamW, lr 5e-5 constant, weight decay 0.01, 256 prompts per batch,
one update per batch, prompts up to 4,096 tokens (2,048 in the released script), responses up
to 12,288, rollout temperature 0.6, 8 rollouts per prompt (the OPD baseline: 1), GRPO KL 1e-4
and clip 0.2, SCOPE tau 1.0. Evaluation: AIME24, AIME25, AMC23, MATH500, Minerva Math and
OlympiadBench (macro average over the six), 32 samples per problem at temperature 0.6, top-p
0.95, top-k 20, up to 32,768 tokens, repetition penalty 1.0 (1.08 for the Qwen3-1.7B student);
Avg@32 (mean accuracy of the samples) and Pass@32 (here the unbiased estimator
1 - C(n-c, k) / C(n, k); the released code bootstraps it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array
Metrics = dict[str, Array]

_DIRECTIONS = {"paper": 1.0, "reversed": -1.0, "uniform": 0.0}
_KL_KINDS = ("k1", "k2", "k3")


def _f32(x) -> Array:
    return jnp.asarray(x, jnp.float32)


def _mask(response_mask) -> Array:
    return jnp.asarray(response_mask).astype(bool)


def _masked(x, mask) -> Array:
    """x as float32 with masked-out entries set to 0 (so nan/inf padding cannot leak)."""
    return jnp.where(mask, _f32(x), 0.0)


def _check_choice(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}; expected one of {tuple(allowed)}")


# --------------------------------------------------------------------------------------
# Token log-probabilities from hidden states, without materialising [B, T, V].
# --------------------------------------------------------------------------------------


def _chunk_logits(h: Array, w: Array, temperature: float) -> Array:
    """[B, T, H] x [H, C] -> float32 [B, T, C]; operands stay in their dtype, f32 accumulate."""
    logits = jnp.einsum("bth,hv->btv", h, w, preferred_element_type=jnp.float32)
    return logits / temperature if temperature != 1.0 else logits


def _chunk_stats(h, w, t, temperature):
    """Dense log p(target), entropy and logsumexp: each float32 [B, T]."""
    logits = _chunk_logits(h, w, temperature)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
    p = jnp.exp(logits - lse[..., None])
    entropy = lse - jnp.sum(p * logits, axis=-1)
    return tgt - lse, entropy, lse


def _tile(lm_head: Array, i, width: int):
    """The i-th vocabulary tile [H, width] and its global column ids [width].

    The last tile is shifted left to end at V (no padding copy of lm_head); `fresh` marks
    the columns no earlier tile has covered, so each column is counted exactly once.
    """
    vocab = lm_head.shape[1]
    start = jnp.minimum(i * width, vocab - width)
    cols = start + jnp.arange(width)
    return jax.lax.dynamic_slice_in_dim(lm_head, start, width, axis=1), start, cols, cols >= i * width


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _tiled_logprobs(hidden, lm_head, targets, width, temperature):
    out, _ = _tiled_fwd(hidden, lm_head, targets, width, temperature)
    return out


def _tiled_fwd(hidden, lm_head, targets, width, temperature):
    """Online logsumexp over vocabulary tiles: only [B, T, width] logits exist at a time."""
    b, t = targets.shape
    n_tiles = -(-lm_head.shape[1] // width)

    def body(carry, i):
        m, s, u, tgt = carry
        w_i, _, cols, fresh = _tile(lm_head, i, width)
        logits = _chunk_logits(hidden, w_i, temperature)
        masked = jnp.where(fresh, logits, -jnp.inf)
        m_new = jnp.maximum(m, masked.max(-1))
        e = jnp.exp(masked - m_new[..., None])
        scale = jnp.exp(m - m_new)
        s = s * scale + e.sum(-1)
        u = u * scale + jnp.sum(e * jnp.where(fresh, logits, 0.0), -1)
        tgt = tgt + jnp.sum(jnp.where((cols == targets[..., None]) & fresh, logits, 0.0), -1)
        return (m_new, s, u, tgt), None

    zeros = jnp.zeros((b, t), jnp.float32)
    init = (jnp.full((b, t), -jnp.inf, jnp.float32), zeros, zeros, zeros)
    (m, s, u, tgt), _ = jax.lax.scan(body, init, jnp.arange(n_tiles))
    lse = m + jnp.log(s)
    ent = lse - u / s
    return (tgt - lse, ent), (hidden, lm_head, targets, lse, ent)


def _tiled_bwd(width, temperature, res, cts):
    """Recompute each tile's logits and push the cotangents through them.

    d logp_t / d logits   = onehot(t) - p
    d entropy / d logits  = -p * (log p + entropy)
    Each lm_head column's gradient is one full contraction over the tokens, written once;
    the hidden-state gradient is accumulated in float32.
    """
    hidden, lm_head, targets, lse, ent = res
    g_logp, g_ent = _f32(cts[0]), _f32(cts[1])
    n_tiles = -(-lm_head.shape[1] // width)

    def body(carry, i):
        dh, dw = carry
        w_i, start, cols, fresh = _tile(lm_head, i, width)
        logits = _chunk_logits(hidden, w_i, temperature)
        logp_all = logits - lse[..., None]
        p = jnp.exp(logp_all)
        onehot = (cols == targets[..., None]).astype(jnp.float32)
        dlogits = g_logp[..., None] * (onehot - p) - g_ent[..., None] * p * (logp_all + ent[..., None])
        dlogits = dlogits / temperature if temperature != 1.0 else dlogits
        dw_i = jnp.einsum("bth,btv->hv", hidden, dlogits, preferred_element_type=jnp.float32)
        dw = jax.lax.dynamic_update_slice_in_dim(dw, dw_i.astype(dw.dtype), start, axis=1)
        dlogits = jnp.where(fresh, dlogits, 0.0)  # columns of the shifted last tile seen before
        dh = dh + jnp.einsum("btv,hv->bth", dlogits, w_i, preferred_element_type=jnp.float32)
        return (dh, dw), None

    init = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros(lm_head.shape, lm_head.dtype))
    (dh, dw), _ = jax.lax.scan(body, init, jnp.arange(n_tiles))
    return dh.astype(hidden.dtype), dw, None


_tiled_logprobs.defvjp(_tiled_fwd, _tiled_bwd)


def token_logprobs(
    hidden: Array,
    lm_head: Array,
    targets: Array,
    *,
    chunk_size: int = 512,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """log p(target) per position from final hidden states, never building [B, T, V].

    Vocabulary tiling with a custom VJP: the forward pass keeps an online logsumexp over
    tiles of `chunk_size` vocabulary columns; the backward pass recomputes each tile's
    logits. The largest temporaries are a few float32 [B, T, chunk_size] tiles, the float32
    [B, T, H] hidden-state gradient and the [H, V] lm_head gradient.
    tools/bench_losses.py: forward+backward at B=8, T=4096, H=1536, V=151936 (bf16) needs
    under 2 GiB of temporaries, against about 39 GiB for token_logprobs_dense.

    Args:
      hidden: [B, T, H] final (normed) hidden states, any float dtype.
      lm_head: [H, V] unembedding matrix (the embedding transposed when tied), any float dtype.
      targets: int [B, T] next-token ids in [0, V).
      chunk_size: vocabulary columns per tile (clipped to V). Temporaries grow with
        B * T * chunk_size; lower it for very long batches.
      temperature: logits are divided by it (1.0 = the unmodified policy).
      return_entropy: also return the per-position entropy of the full distribution.

    Returns:
      float32 [B, T] log-probabilities, or (logprobs, entropy) both float32 [B, T].
      Differentiable w.r.t. hidden and lm_head. The matmuls take the operands in their
      dtype and accumulate in float32; the softmax is float32.
    """
    b, t, _ = hidden.shape
    if targets.shape != (b, t):
        raise ValueError(f"targets shape {targets.shape} != hidden's [B, T] {(b, t)}")
    if lm_head.ndim != 2 or lm_head.shape[0] != hidden.shape[-1]:
        raise ValueError(f"lm_head shape {lm_head.shape} is not [H={hidden.shape[-1]}, V]")
    width = max(1, min(int(chunk_size), lm_head.shape[1]))
    logp, ent = _tiled_logprobs(hidden, lm_head, jnp.asarray(targets, jnp.int32), width, float(temperature))
    return (logp, ent) if return_entropy else logp


def token_logprobs_dense(hidden, lm_head, targets, *, temperature: float = 1.0, return_entropy: bool = False):
    """Reference implementation of token_logprobs that builds the float32 [B, T, V] logits.

    Same arguments and results; use it for small vocabularies or to check the chunked path.
    """
    logp, ent, _ = _chunk_stats(hidden, lm_head, jnp.asarray(targets, jnp.int32), float(temperature))
    return (logp, ent) if return_entropy else logp


def logprobs_from_logits(logits: Array, targets: Array) -> Array:
    """log softmax(logits)[target]: logits [..., V] any float dtype, targets int [...] -> float32 [...]."""
    logits = _f32(logits)
    tgt = jnp.take_along_axis(logits, jnp.asarray(targets)[..., None], axis=-1)[..., 0]
    return tgt - jax.nn.logsumexp(logits, axis=-1)


# --------------------------------------------------------------------------------------
# KL estimators.
# --------------------------------------------------------------------------------------


def kl_estimate(logprobs: Array, ref_logprobs: Array, kind: str = "k1", clip: float | None = None) -> Array:
    """Per-token estimate of KL(pi || pi_ref) on tokens sampled from pi.

    With r = log pi(a) - log pi_ref(a) (Schulman's estimators):
      k1 = r                    unbiased, high variance (verl "kl")
      k2 = r^2 / 2              biased, low variance ("mse")
      k3 = exp(-r) - 1 + r      unbiased, non-negative (verl "low_var_kl")

    Args:
      logprobs, ref_logprobs: [B, T] any float dtype.
      kind: "k1" | "k2" | "k3".
      clip: if given, the estimate is clipped to [-clip, clip] (verl clips k3 at 10).
    Returns: float32 [B, T].
    """
    _check_choice("kind", kind, _KL_KINDS)
    r = _f32(logprobs) - _f32(ref_logprobs)
    if kind == "k1":
        kl = r
    elif kind == "k2":
        kl = 0.5 * r * r
    else:
        kl = jnp.exp(-r) - 1.0 + r
    return jnp.clip(kl, -clip, clip) if clip is not None else kl


def reverse_kl_full(student_logits: Array, teacher_logits: Array) -> Array:
    """Exact KL(pi_S || pi_T) = sum_v p_S(v) (log p_S(v) - log p_T(v)) per position.

    Args: student_logits, teacher_logits: [B, T, V] any float dtype (same vocabulary).
    Returns: float32 [B, T]. Differentiable w.r.t. both (stop-gradient the teacher yourself).
    """
    ls = jax.nn.log_softmax(_f32(student_logits), axis=-1)
    lt = jax.nn.log_softmax(_f32(teacher_logits), axis=-1)
    return jnp.sum(jnp.exp(ls) * (ls - lt), axis=-1)


def reverse_kl_topk(student_logits_at_ids: Array, teacher_topk_logprobs: Array) -> Array:
    """Reverse KL restricted to the teacher's top-k ids, both sides renormalised over them.

    This is the released SCOPE code's top-k distillation signal.

    Args:
      student_logits_at_ids: [B, T, K] student logits (or log-probs: renormalisation makes
        them equivalent) gathered at the teacher's top-k token ids.
      teacher_topk_logprobs: [B, T, K] teacher log-probs of the same ids.
    Returns: float32 [B, T].
    """
    # Renormalised over the K ids, both sides are distributions over a K-word vocabulary, whose
    # exact reverse KL is reverse_kl_full's.
    return reverse_kl_full(student_logits_at_ids, teacher_topk_logprobs)


# --------------------------------------------------------------------------------------
# Sequence statistics and group operations.
# --------------------------------------------------------------------------------------


def sequence_mean_logprob(logprobs: Array, response_mask: Array) -> Array:
    """(1/|y|) sum_t log p over response tokens: [B, T] -> float32 [B] (0 for empty rows)."""
    mask = _mask(response_mask)
    lengths = mask.sum(-1)
    return _masked(logprobs, mask).sum(-1) / jnp.maximum(lengths, 1)


def sequence_perplexity(logprobs: Array, response_mask: Array) -> Array:
    """PPL(y) = exp(-(1/|y|) sum_t log p): [B, T] -> float32 [B] (1.0 for empty rows)."""
    return jnp.exp(-sequence_mean_logprob(logprobs, response_mask))


def _same_subset(group_ids: Array, select: Array) -> Array:
    """bool [B, B]: rows i and j answer the same prompt and are both selected."""
    g = jnp.asarray(group_ids)
    sel = jnp.asarray(select).astype(bool)
    return (g[:, None] == g[None, :]) & sel[:, None] & sel[None, :]


def group_softmax(scores: Array, group_ids: Array, select: Array, tau=1.0) -> Array:
    """Softmax of scores / tau within each (prompt, selected) subset; 0 for unselected rows.

    Args:
      scores: [B] any float dtype.
      group_ids: int [B], the prompt of each row; any order, any values.
      select: bool [B], rows that take part (e.g. correct and non-empty).
      tau: temperature (> 0), python float or traced scalar.
    Returns: float32 [B]; over every non-empty subset the values sum to 1.
    Stable: each row subtracts its subset's maximum before exponentiating.
    """
    s = _f32(scores) / tau
    sel = jnp.asarray(select).astype(bool)
    same = _same_subset(group_ids, sel)
    row_max = jnp.max(jnp.where(same, s[None, :], -jnp.inf), axis=1)
    row_max = jnp.where(sel, row_max, 0.0)
    e = jnp.where(same, jnp.exp(jnp.where(same, s[None, :] - row_max[:, None], -jnp.inf)), 0.0)
    denom = jnp.where(sel, e.sum(axis=1), 1.0)
    return jnp.where(sel, jnp.exp(jnp.where(sel, s - row_max, -jnp.inf)) / denom, 0.0)


def group_count(group_ids: Array, select: Array) -> Array:
    """Number of selected rows in each row's (prompt, selected) subset: int32 [B] (0 if unselected)."""
    return _same_subset(group_ids, select).sum(axis=1).astype(jnp.int32)


def num_groups(group_ids: Array, select: Array) -> Array:
    """Number of distinct prompts among the selected rows: float32 scalar."""
    n = group_count(group_ids, select)
    return jnp.sum(jnp.where(n > 0, 1.0 / jnp.maximum(n, 1), 0.0))


def _per_group_mean(values: Array, group_ids: Array, select: Array, row_valid: Array) -> Array:
    """Mean over prompts (with >= 1 row in row_valid) of a per-prompt value replicated on its rows."""
    n = group_count(group_ids, row_valid)
    share = jnp.where(row_valid & select, 1.0 / jnp.maximum(n, 1), 0.0)
    return jnp.sum(share * _f32(values)) / jnp.maximum(jnp.sum(share), 1e-30)


# --------------------------------------------------------------------------------------
# SCOPE weights and loss.
# --------------------------------------------------------------------------------------


def scope_weights(
    student_logprobs: Array,
    teacher_logprobs: Array,
    response_mask: Array,
    correct: Array,
    group_ids: Array,
    tau=1.0,
    *,
    student_weighting: str = "paper",
    teacher_weighting: str = "paper",
    normalize: str = "sum",
) -> tuple[Array, Array]:
    """SCOPE's dual-path weights (the module docstring's "Objective"), constants for the gradient.

    w_i^stu = softmax over correct j of  log PPL_S(y_j) / tau    (high student PPL -> more weight)
    w_i^tea = softmax over wrong j   of -log PPL_T(y_j) / tau    (low teacher PPL -> more weight)

    Args:
      student_logprobs: [B, T] the behaviour policy's (pi_old) log-probs of the sampled tokens.
      teacher_logprobs: [B, T] the teacher's log-probs of the same tokens.
      response_mask: [B, T] bool / 0-1.
      correct: bool [B] verifier labels.
      group_ids: int [B] prompt of each row.
      tau: softmax temperature (1.0 in the paper).
      student_weighting / teacher_weighting: "paper" (the equations), "reversed" (the
        opposite direction; ablation), "uniform" (1 / subset size; ablation).
      normalize: "sum" (the paper: each non-empty subset sums to 1) or "mean" (the released
        code: softmax * subset size, so the subset's weights average 1).
    Returns: (w_stu, w_tea), float32 [B] each; w_stu is 0 on wrong or empty rows, w_tea 0 on
      correct or empty rows.
    """
    _check_choice("student_weighting", student_weighting, _DIRECTIONS)
    _check_choice("teacher_weighting", teacher_weighting, _DIRECTIONS)
    _check_choice("normalize", normalize, ("sum", "mean"))
    mask = _mask(response_mask)
    valid = mask.any(-1)
    correct = jnp.asarray(correct).astype(bool)
    on_stu, on_tea = correct & valid, ~correct & valid
    log_ppl_s = -sequence_mean_logprob(jax.lax.stop_gradient(_f32(student_logprobs)), mask)
    log_ppl_t = -sequence_mean_logprob(jax.lax.stop_gradient(_f32(teacher_logprobs)), mask)
    w_stu = group_softmax(_DIRECTIONS[student_weighting] * log_ppl_s, group_ids, on_stu, tau)
    w_tea = group_softmax(-_DIRECTIONS[teacher_weighting] * log_ppl_t, group_ids, on_tea, tau)
    if normalize == "mean":
        w_stu = w_stu * group_count(group_ids, on_stu)
        w_tea = w_tea * group_count(group_ids, on_tea)
    return jax.lax.stop_gradient(w_stu), jax.lax.stop_gradient(w_tea)


def ppo_clip_objective(logprobs: Array, old_logprobs: Array, advantages: Array, clip_eps: float = 0.2) -> Array:
    """Per-token PPO clipped surrogate loss -min(rho A, clip(rho, 1-eps, 1+eps) A).

    Args: logprobs, old_logprobs, advantages: [B, T] (advantages are stop-gradient'ed here).
    Returns: float32 [B, T] loss per token (to be minimised).
    """
    ratio = jnp.exp(_f32(logprobs) - jax.lax.stop_gradient(_f32(old_logprobs)))
    adv = jax.lax.stop_gradient(_f32(advantages))
    return -jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv)


def loss_normalizers(response_mask: Array, correct: Array, group_ids: Array) -> dict[str, Array]:
    """Denominators of every reduction, computed once over the full batch.

    Pass the result as ``normalizers=`` to scope_loss / opd_loss / grpo_loss / kd_loss when a
    batch is split into micro-batches: each micro-batch's loss is then its exact share of the
    full batch's loss, and the gradients add up (sum the micro-batch losses, don't average).
    Returns float32 scalars: prompts (distinct prompts with a non-empty row), tokens (response
    tokens), correct_tokens, wrong_tokens, rows (non-empty rows).
    """
    mask = _mask(response_mask)
    valid = mask.any(-1)
    correct = jnp.asarray(correct).astype(bool)
    per_row = mask.sum(-1).astype(jnp.float32)
    return {
        "prompts": num_groups(group_ids, valid),
        "tokens": per_row.sum(),
        "correct_tokens": jnp.where(correct, per_row, 0.0).sum(),
        "wrong_tokens": jnp.where(correct, 0.0, per_row).sum(),
        "rows": valid.sum().astype(jnp.float32),
    }


def _distill_term(logprobs, old_logprobs, teacher_logprobs, distill, kl, clip_eps, per_token_kl, kl_clip=None):
    """Per-token wrong-path loss [B, T] for each `distill` option (see scope_loss)."""
    lp, old, tea = _f32(logprobs), jax.lax.stop_gradient(_f32(old_logprobs)), jax.lax.stop_gradient(_f32(teacher_logprobs))
    if distill == "reinforce":
        rho = jnp.exp(lp - old)
        return rho * jax.lax.stop_gradient(lp - tea)
    if distill == "kl":
        return _f32(per_token_kl) if per_token_kl is not None else kl_estimate(lp, tea, kl, clip=kl_clip)
    # "ppo": the released code's reward-side signal, -(log pi_old - log pi_T), as a PPO advantage.
    return ppo_clip_objective(lp, old, -(old - tea), clip_eps)


def scope_loss(
    logprobs: Array,
    old_logprobs: Array,
    teacher_logprobs: Array,
    response_mask: Array,
    correct: Array,
    group_ids: Array,
    tau=1.0,
    *,
    reduction: str = "paper",
    distill: str = "reinforce",
    kl: str = "k1",
    kl_clip: float | None = None,
    clip_eps: float = 0.2,
    student_weighting: str = "paper",
    teacher_weighting: str = "paper",
    per_token_kl: Array | None = None,
    weights: tuple[Array, Array] | None = None,
    normalizers: dict[str, Array] | None = None,
) -> tuple[Array, Metrics]:
    """The SCOPE objective. Defaults are the paper's equations to the letter.

    Args:
      logprobs: [B, T] log pi_theta of the sampled tokens (carries the gradient).
      old_logprobs: [B, T] log pi_old (behaviour policy); defines rho and the student weights.
      teacher_logprobs: [B, T] log pi_T of the same tokens.
      response_mask: [B, T]; correct: bool [B]; group_ids: int [B]; tau: weight temperature.
      reduction:
        "paper": per rollout, token SUMS; weights sum to 1 per path and prompt; the total is
          divided by the number of prompts. Correct path: -sum_t rho_it.
        "token_mean": the released code: weights rescaled to mean 1 per subset; the correct
          path is -log pi_theta * w averaged over correct-response tokens; the wrong path is
          its term * w averaged over wrong-response tokens (over all response tokens when
          distill="ppo", as verl's policy loss does).
      distill: the wrong-path per-token term.
        "reinforce": rho * sg[log pi_theta - log pi_T] (the paper);
        "kl": kl_estimate(log pi_theta, log pi_T, kl) in the loss, or per_token_kl if given
          (e.g. reverse_kl_topk on the teacher's top-k ids, or reverse_kl_full);
        "ppo": PPO-clipped policy loss with advantage -(log pi_old - log pi_T) (clip_eps).
      kl: "k1" | "k2" | "k3" for distill="kl".
      kl_clip: clip that per-token estimate to [-kl_clip, kl_clip] (the released code clamps
        k3 at 10; None: no clip, the default).
      student_weighting, teacher_weighting: "paper" | "reversed" | "uniform" (ablations).
      per_token_kl: optional [B, T] differentiable per-token KL for distill="kl".
      weights: optional precomputed (w_stu, w_tea) [B] in their final normalisation (e.g.
        from scope_weights over the full batch when this call sees one micro-batch).
      normalizers: optional loss_normalizers(...) of the full batch (micro-batching).

    Returns:
      (loss, metrics): float32 scalar to minimise, and a dict of float32 scalars:
      loss/correct_path, loss/wrong_path, accuracy, prompts/{all_correct,all_wrong,mixed}
      (fractions of prompts), and per path ("correct", "wrong"): max_weight and ess
      (1 / sum w^2 with w normalised to sum 1; means over prompts with a non-empty path),
      student_ppl and teacher_ppl (means over the path's rollouts).
    """
    _check_choice("reduction", reduction, ("paper", "token_mean"))
    _check_choice("distill", distill, ("reinforce", "kl", "ppo"))
    mask = _mask(response_mask)
    valid = mask.any(-1)
    correct = jnp.asarray(correct).astype(bool)
    on_stu, on_tea = correct & valid, ~correct & valid
    if weights is None:
        weights = scope_weights(
            old_logprobs, teacher_logprobs, mask, correct, group_ids, tau,
            student_weighting=student_weighting, teacher_weighting=teacher_weighting,
            normalize="sum" if reduction == "paper" else "mean",
        )
    w_stu, w_tea = (jax.lax.stop_gradient(_f32(w)) for w in weights)
    norm = normalizers if normalizers is not None else loss_normalizers(mask, correct, group_ids)

    # Zero the masked entries first: where() after exp() would let nan padding into the gradient.
    lp, old, tea = (_masked(x, mask) for x in (logprobs, old_logprobs, teacher_logprobs))
    if per_token_kl is not None:
        per_token_kl = _masked(per_token_kl, mask)
    d_tok = _masked(_distill_term(lp, old, tea, distill, kl, clip_eps, per_token_kl, kl_clip), mask)
    if reduction == "paper":
        rho = jnp.exp(lp - jax.lax.stop_gradient(old))
        mle_row = -_masked(rho, mask).sum(-1)
        loss_c = jnp.sum(jnp.where(on_stu, w_stu * mle_row, 0.0)) / jnp.maximum(norm["prompts"], 1.0)
        loss_w = jnp.sum(jnp.where(on_tea, w_tea * d_tok.sum(-1), 0.0)) / jnp.maximum(norm["prompts"], 1.0)
    else:
        mle_tok = _masked(-lp, mask)
        loss_c = jnp.sum(jnp.where(on_stu, w_stu, 0.0)[:, None] * mle_tok) / jnp.maximum(norm["correct_tokens"], 1.0)
        tea_denom = norm["tokens"] if distill == "ppo" else norm["wrong_tokens"]
        loss_w = jnp.sum(jnp.where(on_tea, w_tea, 0.0)[:, None] * d_tok) / jnp.maximum(tea_denom, 1.0)
    loss = loss_c + loss_w
    metrics = {"loss": loss, "loss/correct_path": loss_c, "loss/wrong_path": loss_w}
    metrics.update(_routing_metrics(old, tea, mask, correct, group_ids, w_stu, w_tea))
    return loss, metrics


def _routing_metrics(old_logprobs, teacher_logprobs, mask, correct, group_ids, w_stu, w_tea) -> Metrics:
    """What a practitioner watches: how prompts split and how concentrated each path's weights are."""
    valid = mask.any(-1)
    on_stu, on_tea = correct & valid, ~correct & valid
    n_valid = group_count(group_ids, valid)
    n_stu, n_tea = group_count(group_ids, on_stu), group_count(group_ids, on_tea)
    # Per-prompt flags, replicated on each of the prompt's rows.
    all_correct = valid & (n_stu == n_valid)
    all_wrong = valid & (n_tea == n_valid)
    prompt_mean = functools.partial(_per_group_mean, group_ids=group_ids, row_valid=valid)
    s_ppl = sequence_perplexity(jax.lax.stop_gradient(_f32(old_logprobs)), mask)
    t_ppl = sequence_perplexity(jax.lax.stop_gradient(_f32(teacher_logprobs)), mask)
    out = {
        "accuracy": jnp.sum(on_stu) / jnp.maximum(jnp.sum(valid), 1),
        "prompts/all_correct": prompt_mean(all_correct, select=valid),
        "prompts/all_wrong": prompt_mean(all_wrong, select=valid),
        "prompts/mixed": prompt_mean(~all_correct & ~all_wrong, select=valid),
    }
    for name, w, on, n in (("correct", w_stu, on_stu, n_stu), ("wrong", w_tea, on_tea, n_tea)):
        same = _same_subset(group_ids, on)
        # Renormalise to sum 1 (weights may arrive rescaled to mean 1).
        total = jnp.sum(jnp.where(same, w[None, :], 0.0), axis=1)
        wn = jnp.where(on, w / jnp.where(on, total, 1.0), 0.0)
        max_w = jnp.max(jnp.where(same, wn[None, :], 0.0), axis=1)
        ess = 1.0 / jnp.maximum(jnp.sum(jnp.where(same, wn[None, :] ** 2, 0.0), axis=1), 1e-30)
        count = jnp.maximum(jnp.sum(on), 1)
        out[f"{name}/max_weight"] = _per_group_mean(max_w, group_ids, on, on)
        out[f"{name}/ess"] = _per_group_mean(ess, group_ids, on, on)
        out[f"{name}/student_ppl"] = jnp.sum(jnp.where(on, s_ppl, 0.0)) / count
        out[f"{name}/teacher_ppl"] = jnp.sum(jnp.where(on, t_ppl, 0.0)) / count
    return out


# --------------------------------------------------------------------------------------
# Baselines: OPD, GRPO, KD / SFT, with the same conventions.
# --------------------------------------------------------------------------------------


def opd_loss(
    logprobs: Array,
    old_logprobs: Array,
    teacher_logprobs: Array,
    response_mask: Array,
    group_ids: Array,
    *,
    reduction: str = "paper",
    distill: str = "reinforce",
    kl: str = "k1",
    kl_clip: float | None = None,
    clip_eps: float = 0.2,
    per_token_kl: Array | None = None,
    weights: Array | None = None,
    normalizers: dict[str, Array] | None = None,
) -> tuple[Array, Metrics]:
    """Plain on-policy distillation: the sampled-token reverse-KL term on every rollout, uniformly.

    Exactly scope_loss with every rollout on the teacher path and uniform weights: with
    reduction="paper", each prompt's rollouts share weight 1 / N (token sums, mean over
    prompts); with one rollout per prompt (the paper's OPD baseline) that is the mean over
    prompts of sum_t rho_it * sg[log pi_theta - log pi_T]. Arguments as in scope_loss;
    weights: optional precomputed [B] per-rollout weights (opd_weights of the full batch) for
    a call that sees one micro-batch: the 1 / N of a prompt whose rollouts fall in several
    micro-batches must come from the whole batch, as SCOPE's weights do.
    Returns (loss, metrics) with the same metric keys (the correct-path ones are empty).
    """
    correct = jnp.zeros(jnp.shape(group_ids), bool)
    return scope_loss(
        logprobs, old_logprobs, teacher_logprobs, response_mask, correct, group_ids,
        reduction=reduction, distill=distill, kl=kl, kl_clip=kl_clip, clip_eps=clip_eps,
        teacher_weighting="uniform", per_token_kl=per_token_kl, normalizers=normalizers,
        weights=None if weights is None else (jnp.zeros_like(weights), weights),
    )


def opd_weights(response_mask: Array, group_ids: Array, *, reduction: str = "paper") -> Array:
    """OPD's uniform per-rollout weights over a whole batch, float32 [B]: 1 / (non-empty rollouts
    of the prompt) with reduction="paper", 1 with "token_mean"; 0 on empty rows."""
    b = jnp.shape(group_ids)[0]
    mask = _mask(response_mask)
    return scope_weights(jnp.zeros(mask.shape), jnp.zeros(mask.shape), mask, jnp.zeros((b,), bool), group_ids,
                         teacher_weighting="uniform", normalize="sum" if reduction == "paper" else "mean")[1]


def group_advantages(rewards: Array, group_ids: Array, valid: Array | None = None, *,
                     normalize_std: bool = True, eps: float = 1e-6) -> Array:
    """GRPO advantages (r_i - mean_group) / (std_group + eps), float32 [B].

    std is the unbiased (n - 1) standard deviation, as torch.std in verl. A prompt with a single
    (valid) rollout gets its raw reward as the advantage, as verl's
    compute_grpo_outcome_advantage does (it sets that group's mean to 0 and std to 1, so the
    advantage is r / (1 + eps), or r with normalize_std=False): a group of one has no baseline to
    subtract. normalize_std=False gives Dr. GRPO's mean-centred rewards. Rows with valid=False
    get 0.
    """
    r = _f32(rewards)
    valid = jnp.ones(r.shape, bool) if valid is None else jnp.asarray(valid).astype(bool)
    same = _same_subset(group_ids, valid)
    n = same.sum(axis=1).astype(jnp.float32)
    single = n <= 1.0  # verl's len(id2score[idx]) == 1 branch: mean 0, std 1
    mean = jnp.sum(jnp.where(same, r[None, :], 0.0), axis=1) / jnp.maximum(n, 1.0)
    var = jnp.sum(jnp.where(same, (r[None, :] - mean[:, None]) ** 2, 0.0), axis=1) / jnp.maximum(n - 1.0, 1.0)
    mean = jnp.where(single, 0.0, mean)
    adv = r - mean
    if normalize_std:
        adv = adv / (jnp.where(single, 1.0, jnp.sqrt(var)) + eps)
    return jnp.where(valid, adv, 0.0)


def grpo_loss(
    logprobs: Array,
    old_logprobs: Array,
    ref_logprobs: Array | None,
    response_mask: Array,
    rewards: Array,
    group_ids: Array,
    *,
    clip_eps: float = 0.2,
    kl_coef: float = 1e-4,
    kl: str = "k3",
    kl_clip: float | None = None,
    normalize_std: bool = True,
    reduction: str = "token_mean",
    advantages: Array | None = None,
    normalizers: dict[str, Array] | None = None,
) -> tuple[Array, Metrics]:
    """GRPO: group-normalised advantages, PPO clip, k3 KL to a reference (paper: coef 1e-4, clip 0.2).

    Args:
      logprobs, old_logprobs: [B, T]; ref_logprobs: [B, T] or None (no KL term).
      response_mask: [B, T]; rewards: [B] (1/0 from the verifier); group_ids: int [B].
      kl_clip: clip the per-token KL to [-kl_clip, kl_clip] (verl clamps k3 at 10; None: no clip).
      reduction: "token_mean" (verl's default: mean over all response tokens of the batch)
        or "sequence_mean" (mean over rollouts of each rollout's token mean).
      advantages: optional precomputed [B] (e.g. group_advantages over the full batch).
    Returns: (loss, metrics) with pg_loss, kl, clip_frac, accuracy, advantage_abs_mean.
    """
    _check_choice("reduction", reduction, ("token_mean", "sequence_mean"))
    mask = _mask(response_mask)
    valid = mask.any(-1)
    if advantages is None:
        advantages = group_advantages(rewards, group_ids, valid, normalize_std=normalize_std)
    adv = jax.lax.stop_gradient(_f32(advantages))
    lp, old = _masked(logprobs, mask), _masked(old_logprobs, mask)
    per_tok = ppo_clip_objective(lp, old, jnp.broadcast_to(adv[:, None], lp.shape), clip_eps)
    kl_tok = (kl_estimate(lp, jax.lax.stop_gradient(_masked(ref_logprobs, mask)), kl, clip=kl_clip)
              if ref_logprobs is not None else jnp.zeros_like(lp))
    norm = normalizers if normalizers is not None else loss_normalizers(mask, rewards, group_ids)
    reduce = functools.partial(_reduce_tokens, mask=mask, reduction=reduction, norm=norm)
    pg, kl_mean = reduce(per_tok), reduce(kl_tok)
    ratio = jnp.exp(lp - jax.lax.stop_gradient(old))
    clipped = (jnp.abs(ratio - 1.0) > clip_eps) & mask
    loss = pg + kl_coef * kl_mean
    metrics = {
        "loss": loss, "pg_loss": pg, "kl": kl_mean,
        "clip_frac": clipped.sum() / jnp.maximum(mask.sum(), 1),
        "accuracy": jnp.sum(jnp.where(valid, _f32(rewards), 0.0)) / jnp.maximum(valid.sum(), 1),
        "advantage_abs_mean": jnp.sum(jnp.where(valid, jnp.abs(adv), 0.0)) / jnp.maximum(valid.sum(), 1),
    }
    return loss, metrics


def _reduce_tokens(per_tok, *, mask, reduction, norm) -> Array:
    """token_mean: sum / total tokens; sequence_mean: mean over rows of per-row token means."""
    x = _masked(per_tok, mask)
    if reduction == "token_mean":
        return x.sum() / jnp.maximum(norm["tokens"], 1.0)
    per_row = x.sum(-1) / jnp.maximum(mask.sum(-1), 1)
    return per_row.sum() / jnp.maximum(norm["rows"], 1.0)


def kd_loss(logprobs: Array, response_mask: Array, *, reduction: str = "token_mean",
            normalizers: dict[str, Array] | None = None) -> tuple[Array, Metrics]:
    """Off-policy KD / SFT: negative log-likelihood of given (teacher-generated) sequences.

    Args: logprobs [B, T] of the target tokens; response_mask [B, T];
      reduction "token_mean" | "sequence_mean" (as in grpo_loss).
    Returns: (loss, metrics) with nll (per token) and ppl = exp(nll).
    """
    _check_choice("reduction", reduction, ("token_mean", "sequence_mean"))
    mask = _mask(response_mask)
    b = mask.shape[0]
    norm = normalizers if normalizers is not None else loss_normalizers(mask, jnp.zeros((b,), bool), jnp.arange(b))
    nll_tok = -_masked(logprobs, mask)
    loss = _reduce_tokens(nll_tok, mask=mask, reduction=reduction, norm=norm)
    nll = nll_tok.sum() / jnp.maximum(mask.sum(), 1)
    return loss, {"loss": loss, "nll": nll, "ppl": jnp.exp(nll)}


__all__ = [
    "token_logprobs", "token_logprobs_dense", "logprobs_from_logits",
    "kl_estimate", "reverse_kl_full", "reverse_kl_topk",
    "sequence_mean_logprob", "sequence_perplexity",
    "group_softmax", "group_count", "num_groups", "group_advantages",
    "scope_weights", "scope_loss", "loss_normalizers", "ppo_clip_objective",
    "opd_loss", "opd_weights", "grpo_loss", "kd_loss",
]
