"""The algorithms the trainer runs, as one table: what each one needs, and its loss.

    alg = ALGORITHMS[cfg.algo]
    alg.samples_with           # "student" or "teacher": whose policy draws the rollouts
    alg.teacher_scores         # the teacher's log-probs of every rollout go into the batch
    alg.loss(cfg)(logprobs, batch, aux) -> (loss, metrics)

The host loop (scope_jax.train) reads only this table, so adding an algorithm or a stage means
adding a row here, not a branch in every function. The loss kernels (scope_jax.losses) read no
config: the rows translate config keys into their arguments.

A batch here is scope_jax.step.Rollouts ([B, M] per-token arrays, [B] labels and group ids);
`aux` holds what every micro-batch must share: the full batch's loss normalisers and the
row's `constants` (weights or advantages, [B] arrays).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from scope_jax import losses


def _response_mask(cfg, b) -> jax.Array:
    return b.response_mask


def _kd_mask(cfg, b) -> jax.Array:
    """KD with kd_only_correct learns only from the teacher's verified samples."""
    return b.response_mask & b.correct[:, None] if cfg.kd_only_correct else b.response_mask


def _rollout_temperature(cfg) -> float:
    """The rollouts' behaviour policy is softmax(logits / T) at the sampling temperature T, and
    pi_old is that policy (as verl divides the logits by T); config.logprob_temperature
    overrides it. Greedy rollouts (T = 0) use the raw policy."""
    t = cfg.get("logprob_temperature")
    t = cfg.sampling.temperature if t is None else t
    return float(t) if t and t > 0 else 1.0


def _scope_constants(cfg, b, mask) -> dict[str, Any]:
    s = cfg.scope
    return {"weights": losses.scope_weights(
        b.old_logprobs, b.teacher_logprobs, mask, b.correct, b.group_ids, s.tau,
        student_weighting=s.student_weighting, teacher_weighting=s.teacher_weighting,
        normalize="sum" if s.reduction == "paper" else "mean")}


def _opd_constants(cfg, b, mask) -> dict[str, Any]:
    # Full-batch 1 / N: strided micro-batches split every prompt's rollouts.
    return {"weights": losses.opd_weights(mask, b.group_ids, reduction=cfg.scope.reduction)}


def _grpo_constants(cfg, b, mask) -> dict[str, Any]:
    return {"advantages": losses.group_advantages(
        b.correct.astype(jnp.float32), b.group_ids, mask.any(-1), normalize_std=cfg.grpo.normalize_std)}


def _scope_loss(cfg) -> Callable:
    s = cfg.scope
    return lambda lp, b, aux: losses.scope_loss(
        lp, b.old_logprobs, b.teacher_logprobs, b.response_mask, b.correct, b.group_ids, s.tau,
        reduction=s.reduction, distill=s.distill, kl=s.kl, kl_clip=s.kl_clip, clip_eps=s.clip_eps,
        weights=aux["weights"], normalizers=aux["normalizers"])


def _opd_loss(cfg) -> Callable:
    s = cfg.scope
    return lambda lp, b, aux: losses.opd_loss(
        lp, b.old_logprobs, b.teacher_logprobs, b.response_mask, b.group_ids, reduction=s.reduction,
        distill=s.distill, kl=s.kl, kl_clip=s.kl_clip, clip_eps=s.clip_eps, weights=aux["weights"],
        normalizers=aux["normalizers"])


def _grpo_loss(cfg) -> Callable:
    g = cfg.grpo
    return lambda lp, b, aux: losses.grpo_loss(
        lp, b.old_logprobs, b.ref_logprobs if g.kl_coef > 0 else None, b.response_mask,
        b.correct.astype(jnp.float32), b.group_ids, clip_eps=g.clip_eps, kl_coef=g.kl_coef,
        kl_clip=g.kl_clip, normalize_std=g.normalize_std, advantages=aux["advantages"],
        normalizers=aux["normalizers"])


def _kd_loss(cfg) -> Callable:
    return lambda lp, b, aux: losses.kd_loss(lp, _kd_mask(cfg, b), normalizers=aux["normalizers"])


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """One row of the table.

    samples_with: "student" (on-policy) or "teacher" (KD: off-policy, the teacher's samples).
    teacher_scores: the teacher scores every rollout (teacher_logprobs in the batch).
    old_logprobs: the batch carries the student's behaviour log-probs pi_old.
    reference: cfg -> whether a frozen copy of the initial student scores the rollouts.
    temperature: cfg -> the temperature of the student's log-probs the loss sees.
    loss_mask: (cfg, batch) -> bool [B, M], the tokens the loss and its denominators count.
    constants: (cfg, batch, mask) -> the [B] arrays micro-batches share (weights, advantages).
    loss: cfg -> loss(logprobs [B, M], batch, aux) -> (scalar loss, metrics).
    """

    samples_with: str
    teacher_scores: bool
    old_logprobs: bool
    loss: Callable
    constants: Callable = lambda cfg, b, mask: {}
    reference: Callable = lambda cfg: False
    temperature: Callable = _rollout_temperature
    loss_mask: Callable = _response_mask

    @property
    def loads_teacher(self) -> bool:
        """The teacher's weights (or server) are needed: it scores or it samples."""
        return self.teacher_scores or self.samples_with == "teacher"


ALGORITHMS: dict[str, Algorithm] = {
    # correct rollouts -> MLE weighted by student PPL; wrong -> OPD weighted by teacher PPL
    "scope": Algorithm("student", teacher_scores=True, old_logprobs=True, loss=_scope_loss,
                       constants=_scope_constants),
    # every rollout -> OPD with uniform weights (num_samples=1 is the paper's baseline)
    "opd": Algorithm("student", teacher_scores=True, old_logprobs=True, loss=_opd_loss,
                     constants=_opd_constants),
    # group-normalised rewards, PPO clip, k3 KL to the initial student
    "grpo": Algorithm("student", teacher_scores=False, old_logprobs=True, loss=_grpo_loss,
                      constants=_grpo_constants, reference=lambda cfg: cfg.grpo.kl_coef > 0),
    # off-policy: NLL of the teacher's own (verified) samples, at temperature 1
    "kd": Algorithm("teacher", teacher_scores=False, old_logprobs=False, loss=_kd_loss,
                    temperature=lambda cfg: 1.0, loss_mask=_kd_mask),
}


def loads_local_teacher(cfg) -> bool:
    """The trainer loads the teacher's weights: the algorithm needs a teacher and it is not on a
    server (config.teacher_url)."""
    return get(cfg.algo).loads_teacher and not cfg.get("teacher_url")


def get(name: str) -> Algorithm:
    """ALGORITHMS[name], or a ValueError naming config.algo and the choices."""
    if name not in ALGORITHMS:
        raise ValueError(f"config.algo={name!r}; expected one of {tuple(ALGORITHMS)}")
    return ALGORITHMS[name]
