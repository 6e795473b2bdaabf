"""scope_jax.losses against independent numpy re-derivations of the paper's equations
(restated in the scope_jax/losses.py docstring)."""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from scope_jax import losses as L

# ----------------------------------------------------------------------------------------
# Independent references: explicit loops over prompts, written from the paper's objective
# (arXiv:2604.10688, section 3; restated in the scope_jax/losses.py docstring).
# ----------------------------------------------------------------------------------------


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def ref_scope(lp, old, tea, mask, correct, gids, tau=1.0, stu_dir=1.0, tea_dir=1.0):
    """Returns loss, d loss / d lp, w_stu, w_tea (float64 numpy), paper reduction."""
    lp, old, tea = (np.asarray(a, np.float64) for a in (lp, old, tea))
    mask = np.asarray(mask, bool)
    b = len(gids)
    w_stu, w_tea = np.zeros(b), np.zeros(b)
    valid = mask.sum(1) > 0
    prompts = sorted({int(g) for g, v in zip(gids, valid) if v})
    loss, grad = 0.0, np.zeros_like(lp)
    for g in prompts:
        rows = [i for i in range(b) if gids[i] == g and valid[i]]
        cor = [i for i in rows if correct[i]]
        wro = [i for i in rows if not correct[i]]
        if cor:  # w_stu ~ PPL_S^(1/tau), PPL from the behaviour policy
            ppl = np.array([np.exp(-old[i][mask[i]].mean()) for i in cor])
            w_stu[cor] = _softmax(stu_dir * np.log(ppl) / tau)
        if wro:  # w_tea ~ PPL_T^(-1/tau)
            ppl = np.array([np.exp(-tea[i][mask[i]].mean()) for i in wro])
            w_tea[wro] = _softmax(-tea_dir * np.log(ppl) / tau)
        for i in cor:
            rho = np.where(mask[i], np.exp(lp[i] - old[i]), 0.0)
            loss += w_stu[i] * -rho.sum()
            grad[i] += w_stu[i] * -rho
        for i in wro:
            rho = np.where(mask[i], np.exp(lp[i] - old[i]), 0.0)
            adv = np.where(mask[i], lp[i] - tea[i], 0.0)
            loss += w_tea[i] * (rho * adv).sum()
            grad[i] += w_tea[i] * rho * adv  # d(rho * sg[adv]) / d lp = rho * adv
    n = max(len(prompts), 1)
    return loss / n, grad / n, w_stu, w_tea


def random_batch(seed, b=24, t=11, num_prompts=6, nan_padding=True):
    """Shuffled groups, ragged lengths (some empty rows), all-correct / all-wrong / lone rows."""
    rng = np.random.default_rng(seed)
    gids = rng.permutation(np.arange(b) % num_prompts) * 7 + 3  # arbitrary, non-contiguous ids
    lengths = rng.integers(0, t + 1, size=b)
    lengths[rng.random(b) < 0.1] = 0
    mask = np.arange(t)[None, :] < lengths[:, None]
    correct = rng.random(b) < 0.5
    first, second = gids == gids[0], gids == gids[1]
    correct[first] = True  # an all-correct prompt
    if gids[1] != gids[0]:
        correct[second] = False  # an all-wrong prompt
    lp = np.log(rng.uniform(0.05, 1.0, (b, t)))
    old = lp + rng.normal(0, 0.1, (b, t))
    tea = np.log(rng.uniform(0.05, 1.0, (b, t)))
    if nan_padding:  # values outside the mask must never be read
        lp, old, tea = (np.where(mask, a, np.nan) for a in (lp, old, tea))
    return dict(lp=lp.astype(np.float32), old=old.astype(np.float32), tea=tea.astype(np.float32),
                mask=mask, correct=correct, gids=gids.astype(np.int32))


def _args(d):
    return d["lp"], d["old"], d["tea"], d["mask"], d["correct"], d["gids"]


# ----------------------------------------------------------------------------------------
# The paper's worked numbers.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau,expected", [(1.0, (0.426, 0.330, 0.243)), (0.5, (0.519, 0.312, 0.169)),
                                          (2.0, (0.379, 0.334, 0.287))])
def test_paper_worked_teacher_weights(tau, expected):
    ppl = np.array([1.361, 1.755, 2.383])
    tea = np.repeat(-np.log(ppl)[:, None], 5, axis=1)  # any length: the mean is what counts
    _, w_tea = L.scope_weights(tea, tea, np.ones((3, 5)), np.zeros(3, bool), np.zeros(3, np.int32), tau)
    np.testing.assert_allclose(w_tea, expected, atol=6e-4)


def test_paper_worked_student_weights():
    ppl = np.array([1.2, 1.5, 2.0])
    stu = -np.log(ppl)[:, None]
    w_stu, w_tea = L.scope_weights(stu, stu, np.ones((3, 1)), np.ones(3, bool), np.zeros(3, np.int32))
    np.testing.assert_allclose(w_stu, (0.255, 0.319, 0.426), atol=6e-4)
    np.testing.assert_array_equal(w_tea, 0.0)


# ----------------------------------------------------------------------------------------
# scope_weights / scope_loss against the reference.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
def test_scope_loss_matches_reference(seed, tau):
    d = random_batch(seed)
    loss_fn = jax.jit(lambda *a: L.scope_loss(*a, tau=tau)[0])
    loss, grad = jax.value_and_grad(loss_fn)(*_args(d))
    ref_loss, ref_grad, ref_ws, ref_wt = ref_scope(*_args(d), tau=tau)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.where(d["mask"], grad, 0.0), ref_grad, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(grad))
    w_stu, w_tea = jax.jit(L.scope_weights)(d["old"], d["tea"], d["mask"], d["correct"], d["gids"], tau)
    np.testing.assert_allclose(w_stu, ref_ws, atol=1e-6)
    np.testing.assert_allclose(w_tea, ref_wt, atol=1e-6)


def test_gradient_at_old_policy_is_closed_form():
    """At logprobs == old: correct rows get -w/P per token, wrong rows w * (lp - lp_T) / P."""
    d = random_batch(7, nan_padding=False)
    d["lp"] = d["old"]
    grad = jax.grad(lambda *a: L.scope_loss(*a)[0])(*_args(d))
    _, _, w_stu, w_tea = ref_scope(*_args(d))
    n_prompts = len({g for g, m in zip(d["gids"], d["mask"]) if m.any()})
    closed = np.where(d["correct"][:, None], -w_stu[:, None], w_tea[:, None] * (d["old"] - d["tea"]))
    np.testing.assert_allclose(grad, closed * d["mask"] / n_prompts, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction,distill", [("paper", "reinforce"), ("token_mean", "kl"), ("token_mean", "ppo")])
def test_no_gradient_into_weights_teacher_or_advantage(reduction, distill):
    d = random_batch(3, nan_padding=False)
    f = lambda old, tea: L.scope_loss(d["lp"], old, tea, d["mask"], d["correct"], d["gids"],
                                      reduction=reduction, distill=distill)[0]
    g_old, g_tea = jax.grad(f, argnums=(0, 1))(d["old"], d["tea"])
    np.testing.assert_array_equal(g_old, 0.0)
    np.testing.assert_array_equal(g_tea, 0.0)
    w = jax.grad(lambda s: L.group_softmax(s, d["gids"], d["correct"]).sum())(jnp.ones(24))
    assert np.all(np.isfinite(w))


@pytest.mark.parametrize("which,direction", [("student", "uniform"), ("student", "reversed"),
                                             ("teacher", "uniform"), ("teacher", "reversed")])
def test_ablations(which, direction):
    d = random_batch(11)
    kw = {f"{which}_weighting": direction}
    loss = L.scope_loss(*_args(d), **kw)[0]
    dirs = {"uniform": 0.0, "reversed": -1.0}
    ref = ref_scope(*_args(d), **({"stu_dir": dirs[direction]} if which == "student" else {"tea_dir": dirs[direction]}))
    np.testing.assert_allclose(loss, ref[0], rtol=1e-5, atol=1e-6)


def test_released_token_mean_reduction():
    """The released code: weights * subset size; -lp * w over correct tokens; k3 * w over wrong tokens."""
    d = random_batch(5)
    loss, m = L.scope_loss(*_args(d), reduction="token_mean", distill="kl", kl="k3")
    _, _, w_stu, w_tea = ref_scope(*_args(d))
    mask, cor, gids = d["mask"], d["correct"], d["gids"]
    valid = mask.any(1)
    n_stu = np.array([np.sum((gids == g) & cor & valid) for g in gids])
    n_tea = np.array([np.sum((gids == g) & ~cor & valid) for g in gids])
    ws, wt = w_stu * n_stu, w_tea * n_tea
    lp, tea = np.nan_to_num(d["lp"].astype(np.float64)), np.nan_to_num(d["tea"].astype(np.float64))
    k3 = np.exp(tea - lp) - (tea - lp) - 1
    cm, wm = mask & cor[:, None], mask & ~cor[:, None]
    ref = (ws[:, None] * -lp)[cm].sum() / cm.sum() + (wt[:, None] * k3)[wm].sum() / wm.sum()
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    # mean-one weights: each non-empty subset averages 1
    for g in set(gids[valid]):
        rows = (gids == g) & cor & valid
        if rows.any():
            np.testing.assert_allclose(ws[rows].mean(), 1.0, rtol=1e-6)


def test_ppo_advantage_variant():
    d = random_batch(6, nan_padding=False)
    loss, _ = L.scope_loss(*_args(d), reduction="token_mean", distill="ppo", clip_eps=0.2)
    _, _, w_stu, w_tea = ref_scope(*_args(d))
    mask, cor, gids = d["mask"], d["correct"], d["gids"]
    valid = mask.any(1)
    n_stu = np.array([np.sum((gids == g) & cor & valid) for g in gids])
    n_tea = np.array([np.sum((gids == g) & ~cor & valid) for g in gids])
    lp, old, tea = (d[k].astype(np.float64) for k in ("lp", "old", "tea"))
    ratio = np.exp(lp - old)
    adv = -(old - tea) * (w_tea * n_tea)[:, None]
    pg = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv)
    cm = mask & cor[:, None]
    ref = ((w_stu * n_stu)[:, None] * -lp)[cm].sum() / cm.sum() + pg[mask & ~cor[:, None]].sum() / mask.sum()
    np.testing.assert_allclose(loss, ref, rtol=1e-5)


def test_micro_batches_add_up_with_full_batch_weights_and_normalizers():
    d = random_batch(8, nan_padding=False)
    full_loss, full_grad = jax.value_and_grad(lambda lp: L.scope_loss(lp, *_args(d)[1:])[0])(d["lp"])
    weights = L.scope_weights(d["old"], d["tea"], d["mask"], d["correct"], d["gids"])
    norm = L.loss_normalizers(d["mask"], d["correct"], d["gids"])
    parts = np.array_split(np.arange(24), 3)  # cuts through groups on purpose
    total, grad = 0.0, np.zeros_like(d["lp"])
    for idx in parts:
        sub = {k: v[idx] for k, v in d.items()}
        f = lambda lp: L.scope_loss(lp, *_args(sub)[1:], weights=(weights[0][idx], weights[1][idx]), normalizers=norm)[0]
        val, g = jax.value_and_grad(f)(sub["lp"])
        total += float(val)
        grad[idx] = g
    np.testing.assert_allclose(total, full_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, full_grad, rtol=1e-5, atol=1e-7)


def test_metrics():
    d = random_batch(2)
    _, m = L.scope_loss(*_args(d))
    _, _, w_stu, w_tea = ref_scope(*_args(d))
    valid = d["mask"].any(1)
    gids, cor = d["gids"], d["correct"]
    prompts = sorted(set(gids[valid]))
    kinds = []
    for g in prompts:
        c = cor[(gids == g) & valid]
        kinds.append("all_correct" if c.all() else "all_wrong" if not c.any() else "mixed")
    for k in ("all_correct", "all_wrong", "mixed"):
        np.testing.assert_allclose(m[f"prompts/{k}"], kinds.count(k) / len(prompts), rtol=1e-6)
    np.testing.assert_allclose(m["accuracy"], cor[valid].mean(), rtol=1e-6)
    for name, w, on in (("correct", w_stu, cor & valid), ("wrong", w_tea, ~cor & valid)):
        groups = [gids[on] == g for g in sorted(set(gids[on]))]
        ess = np.mean([1 / np.sum(w[on][s] ** 2) for s in groups])
        mx = np.mean([w[on][s].max() for s in groups])
        np.testing.assert_allclose(m[f"{name}/ess"], ess, rtol=1e-5)
        np.testing.assert_allclose(m[f"{name}/max_weight"], mx, rtol=1e-5)
        ppl_t = np.exp(-np.array([d["tea"][i][d["mask"][i]].mean() for i in np.where(on)[0]]))
        np.testing.assert_allclose(m[f"{name}/teacher_ppl"], ppl_t.mean(), rtol=1e-5)


# ----------------------------------------------------------------------------------------
# Properties (hypothesis).
# ----------------------------------------------------------------------------------------

_B, _T = 10, 6


@st.composite
def batches(draw):
    gids = np.array(draw(st.lists(st.integers(0, 3), min_size=_B, max_size=_B)), np.int32)
    lengths = np.array(draw(st.lists(st.integers(0, _T), min_size=_B, max_size=_B)))
    correct = np.array(draw(st.lists(st.booleans(), min_size=_B, max_size=_B)))
    vals = st.floats(-8.0, -0.0625, allow_nan=False, width=32)
    old = np.array(draw(st.lists(vals, min_size=_B * _T, max_size=_B * _T)), np.float32).reshape(_B, _T)
    tea = np.array(draw(st.lists(vals, min_size=_B * _T, max_size=_B * _T)), np.float32).reshape(_B, _T)
    mask = np.arange(_T)[None, :] < lengths[:, None]
    tau = draw(st.sampled_from([0.25, 1.0, 3.0]))
    return dict(lp=old, old=old, tea=tea, mask=mask, correct=correct, gids=gids), tau


_weights = jax.jit(L.scope_weights)
_loss = jax.jit(lambda *a: L.scope_loss(*a)[0])


@settings(max_examples=60, deadline=None)
@given(batches())
def test_weights_sum_to_one_per_nonempty_path(batch):
    d, tau = batch
    w_stu, w_tea = np.asarray(_weights(d["old"], d["tea"], d["mask"], d["correct"], d["gids"], tau))
    valid = d["mask"].any(1)
    for g in set(d["gids"]):
        for w, on in ((w_stu, d["correct"]), (w_tea, ~d["correct"])):
            rows = (d["gids"] == g) & on & valid
            if rows.any():
                np.testing.assert_allclose(w[rows].sum(), 1.0, rtol=1e-5)
                if rows.sum() == 1:
                    np.testing.assert_allclose(w[rows], 1.0, rtol=1e-6)  # a lone rollout
            np.testing.assert_array_equal(w[(d["gids"] == g) & ~(on & valid)], 0.0)
    assert np.all(w_stu >= 0) and np.all(w_tea >= 0)


@settings(max_examples=40, deadline=None)
@given(batches(), st.randoms(use_true_random=False))
def test_invariant_to_row_permutation_and_padding(batch, rnd):
    d, tau = batch
    loss = _loss(*_args(d), tau)
    perm = np.array(rnd.sample(range(_B), _B))
    dp = {k: v[perm] for k, v in d.items()}
    np.testing.assert_allclose(_loss(*_args(dp), tau), loss, rtol=2e-5, atol=1e-6)
    # Extra padding: more columns (masked) and more empty rows in a new group.
    pad = lambda a, fill: np.concatenate([np.pad(a, ((0, 0), (0, 3)), constant_values=fill),
                                          np.full((2, _T + 3), fill, a.dtype)])
    dq = dict(lp=pad(d["lp"], -1.0), old=pad(d["old"], -1.0), tea=pad(d["tea"], -1.0),
              mask=pad(d["mask"], False), correct=np.concatenate([d["correct"], [True, False]]),
              gids=np.concatenate([d["gids"], [99, 99]]).astype(np.int32))
    np.testing.assert_allclose(jax.jit(lambda *a: L.scope_loss(*a)[0])(*_args(dq), tau), loss, rtol=2e-5, atol=1e-6)


def test_all_correct_and_all_wrong_prompts():
    mask = np.ones((4, 3), bool)
    lp = np.log(np.full((4, 3), 0.5, np.float32))
    gids = np.array([0, 0, 1, 1], np.int32)
    correct = np.array([True, True, False, False])
    w_stu, w_tea = L.scope_weights(lp, lp, mask, correct, gids)
    np.testing.assert_allclose(w_stu, [0.5, 0.5, 0, 0])
    np.testing.assert_allclose(w_tea, [0, 0, 0.5, 0.5])
    _, m = L.scope_loss(lp, lp, lp, mask, correct, gids)
    assert m["prompts/all_correct"] == 0.5 and m["prompts/all_wrong"] == 0.5 and m["prompts/mixed"] == 0


def test_group_softmax_is_stable():
    scores = np.array([1e4, 1e4 - 1.0, -1e4, 3.0], np.float32)
    w = L.group_softmax(scores, np.array([0, 0, 0, 1]), np.ones(4, bool))
    np.testing.assert_allclose(w, [1 / (1 + np.exp(-1)), np.exp(-1) / (1 + np.exp(-1)), 0.0, 1.0], rtol=1e-6)


# ----------------------------------------------------------------------------------------
# Baselines.
# ----------------------------------------------------------------------------------------


def test_opd_is_uniform_reverse_kl_over_all_rollouts():
    d = random_batch(9)
    loss, _ = L.opd_loss(d["lp"], d["old"], d["tea"], d["mask"], d["gids"])
    valid = d["mask"].any(1)
    prompts = sorted(set(d["gids"][valid]))
    ref = 0.0
    for g in prompts:
        rows = np.where((d["gids"] == g) & valid)[0]
        for i in rows:
            m = d["mask"][i]
            rho = np.exp(d["lp"][i][m] - d["old"][i][m])
            ref += (rho * (d["lp"][i][m] - d["tea"][i][m])).sum() / len(rows)
    np.testing.assert_allclose(loss, ref / len(prompts), rtol=1e-5)


def test_grpo_loss_matches_reference():
    d = random_batch(4, nan_padding=False)
    rewards = d["correct"].astype(np.float32)
    ref_lp = d["tea"]
    loss, m = jax.jit(functools.partial(L.grpo_loss, kl_coef=0.1))(d["lp"], d["old"], ref_lp, d["mask"], rewards, d["gids"])
    valid = d["mask"].any(1)
    adv = np.zeros(len(rewards))
    for g in set(d["gids"][valid]):
        rows = (d["gids"] == g) & valid
        r = rewards[rows].astype(np.float64)
        # verl's compute_grpo_outcome_advantage: a group of one gets mean 0 and std 1.
        mean, std = (r.mean(), r.std(ddof=1)) if rows.sum() > 1 else (0.0, 1.0)
        adv[rows] = (r - mean) / (std + 1e-6)
    lp, old = d["lp"].astype(np.float64), d["old"].astype(np.float64)
    ratio = np.exp(lp - old)
    pg = -np.minimum(ratio * adv[:, None], np.clip(ratio, 0.8, 1.2) * adv[:, None])
    k3 = np.exp(ref_lp - lp) - (ref_lp - lp) - 1
    ref = pg[d["mask"]].mean() + 0.1 * k3[d["mask"]].mean()
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    adv_j = L.group_advantages(rewards, d["gids"], valid)
    np.testing.assert_allclose(adv_j, adv, rtol=1e-5, atol=1e-6)


def test_kd_loss_is_token_nll():
    d = random_batch(1)
    loss, m = L.kd_loss(d["lp"], d["mask"])
    np.testing.assert_allclose(loss, -d["lp"][d["mask"]].astype(np.float64).mean(), rtol=1e-6)


def test_kl_estimators():
    rng = np.random.default_rng(0)
    lp, ref = np.log(rng.uniform(0.01, 1, (3, 4))), np.log(rng.uniform(0.01, 1, (3, 4)))
    r = lp - ref
    np.testing.assert_allclose(L.kl_estimate(lp, ref, "k1"), r, rtol=1e-5)
    np.testing.assert_allclose(L.kl_estimate(lp, ref, "k2"), r * r / 2, rtol=1e-5)
    np.testing.assert_allclose(L.kl_estimate(lp, ref, "k3"), np.exp(-r) - 1 + r, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="kind"):
        L.kl_estimate(lp, ref, "k4")
    # Unbiasedness of k1 and k3 for KL(p || q) on a small categorical, by exact expectation.
    p, q = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.2, 0.6])
    kl = np.sum(p * np.log(p / q))
    for kind in ("k1", "k3"):
        est = np.asarray(L.kl_estimate(np.log(p), np.log(q), kind))
        np.testing.assert_allclose(np.sum(p * est), kl, rtol=1e-5)


def test_full_and_topk_reverse_kl():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(2, 3, 7)), rng.normal(size=(2, 3, 7))
    ps, pt = np.exp(s) / np.exp(s).sum(-1, keepdims=True), np.exp(t) / np.exp(t).sum(-1, keepdims=True)
    np.testing.assert_allclose(L.reverse_kl_full(s, t), np.sum(ps * np.log(ps / pt), -1), rtol=1e-5)
    ids = np.argsort(-t, axis=-1)[..., :3]
    s_k, t_k = np.take_along_axis(s, ids, -1), np.take_along_axis(np.log(pt), ids, -1)
    qs = np.exp(s_k) / np.exp(s_k).sum(-1, keepdims=True)
    qt = np.exp(t_k) / np.exp(t_k).sum(-1, keepdims=True)
    np.testing.assert_allclose(L.reverse_kl_topk(s_k, t_k), np.sum(qs * np.log(qs / qt), -1), rtol=1e-5)


# ----------------------------------------------------------------------------------------
# token_logprobs: chunked (vocabulary-tiled) vs dense vs numpy.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("chunk", [7, 16, 64])
def test_token_logprobs_chunked_equals_dense(dtype, chunk):
    b, t, h, v = 3, 13, 16, 50  # 50 is not a multiple of 7 or 16: exercises the shifted last tile
    k = jax.random.split(jax.random.key(0), 3)
    hid = jax.random.normal(k[0], (b, t, h)).astype(dtype)
    w = (jax.random.normal(k[1], (h, v)) / 2).astype(dtype)
    tgt = jax.random.randint(k[2], (b, t), 0, v)
    chunked = jax.jit(functools.partial(L.token_logprobs, chunk_size=chunk, return_entropy=True))
    lp, ent = chunked(hid, w, tgt)
    lp_d, ent_d = L.token_logprobs_dense(hid, w, tgt, return_entropy=True)
    # numpy float64 reference on the same (rounded) inputs
    logits = np.asarray(hid, np.float64) @ np.asarray(w, np.float64)
    logp_all = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(lp, np.take_along_axis(logp_all, np.asarray(tgt)[..., None], -1)[..., 0], atol=2e-4)
    np.testing.assert_allclose(ent, -(np.exp(logp_all) * logp_all).sum(-1), atol=2e-4)
    np.testing.assert_allclose(lp, lp_d, atol=1e-5)
    np.testing.assert_allclose(ent, ent_d, atol=1e-5)

    def objective(fn, hid, w):
        lp, ent = fn(hid, w, tgt)
        return jnp.sum(lp * jnp.cos(jnp.arange(t))) + jnp.sum(ent ** 2)

    g = jax.grad(functools.partial(objective, chunked), argnums=(0, 1))(hid, w)
    g_d = jax.grad(functools.partial(objective, functools.partial(L.token_logprobs_dense, return_entropy=True)),
                   argnums=(0, 1))(hid, w)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for a, b_ in zip(g, g_d):
        assert a.dtype == dtype
        scale = float(jnp.abs(b_.astype(jnp.float32)).max())
        np.testing.assert_allclose(np.asarray(a, np.float32) / scale, np.asarray(b_, np.float32) / scale, atol=tol)


def test_token_logprobs_temperature_and_errors():
    k = jax.random.split(jax.random.key(1), 3)
    hid, w = jax.random.normal(k[0], (2, 5, 8)), jax.random.normal(k[1], (8, 20))
    tgt = jax.random.randint(k[2], (2, 5), 0, 20)
    np.testing.assert_allclose(L.token_logprobs(hid, w, tgt, chunk_size=6, temperature=0.6),
                               L.logprobs_from_logits((hid @ w) / 0.6, tgt), atol=1e-5)
    with pytest.raises(ValueError, match="targets shape"):
        L.token_logprobs(hid, w, tgt[:, :3])
    with pytest.raises(ValueError, match="lm_head shape"):
        L.token_logprobs(hid, w.T, tgt)


# ----------------------------------------------------------------------------------------
# 1 device vs 8 devices with the batch sharded (groups straddle devices).
# ----------------------------------------------------------------------------------------


def test_sharded_batch_matches_single_device():
    assert len(jax.devices()) == 8, "conftest should give 8 CPU devices"
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    d = random_batch(21, b=32, t=9, num_prompts=5, nan_padding=False)  # 5 prompts over 8 shards
    rows, tok = NamedSharding(mesh, P("data")), NamedSharding(mesh, P("data", None))
    args = _args(d)
    shardings = (tok, tok, tok, tok, rows, rows)
    sharded_args = [jax.device_put(a, s) for a, s in zip(args, shardings)]

    def step(lp, old, tea, mask, cor, gids):
        (loss, m), g = jax.value_and_grad(lambda x: L.scope_loss(x, old, tea, mask, cor, gids), has_aux=True)(lp)
        w = L.scope_weights(old, tea, mask, cor, gids)
        g_loss, _ = L.grpo_loss(lp, old, tea, mask, cor.astype(jnp.float32), gids)
        return loss, g, w, m, g_loss

    single = jax.jit(step)(*args)
    sharded = jax.jit(step, in_shardings=shardings)(*sharded_args)
    assert sharded[1].sharding.spec[0] == "data" or len(sharded[1].sharding.device_set) == 8
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    ref_loss, ref_grad, _, _ = ref_scope(*args)
    np.testing.assert_allclose(sharded[0], ref_loss, rtol=1e-5)

    # token_logprobs with the batch sharded, values and gradients
    k = jax.random.split(jax.random.key(2), 3)
    hid, w = jax.random.normal(k[0], (16, 6, 8)), jax.random.normal(k[1], (8, 40))
    tgt = jax.random.randint(k[2], (16, 6), 0, 40)
    f = jax.value_and_grad(lambda h, w: L.token_logprobs(h, w, tgt, chunk_size=16).sum(), argnums=(0, 1))
    v1, g1 = jax.jit(f)(hid, w)
    hs = jax.device_put(hid, NamedSharding(mesh, P("data", None, None)))
    v8, g8 = jax.jit(f)(hs, w)
    np.testing.assert_allclose(v8, v1, rtol=1e-5)
    for a, b in zip(g1, g8):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_losses_module_imports_without_flax():
    code = textwrap.dedent("""
        import sys
        import scope_jax.losses
        bad = [m for m in sys.modules if m.split('.')[0] in ('flax', 'optax', 'orbax', 'transformers', 'torch')]
        assert not bad, bad
    """)
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                   timeout=300)


def test_kl_clip_clamps_the_per_token_k3_as_the_released_code():
    # verl clamps its low-variance KL (k3) to [-10, 10]; kl_clip does the same, as an option.
    rng = np.random.default_rng(0)
    b, t = 6, 5
    lp = rng.uniform(-20.0, -0.1, (b, t)).astype(np.float32)  # far from the teacher: k3 > 10
    tea = rng.uniform(-3.0, -0.1, (b, t)).astype(np.float32)
    mask = np.ones((b, t), bool)
    correct = np.zeros(b, bool)
    groups = np.arange(b) // 3
    r = lp.astype(np.float64) - tea
    k3 = np.exp(-r) - 1 + r
    assert k3.max() > 10
    kw = dict(reduction="token_mean", distill="kl", kl="k3")
    got, _ = L.scope_loss(lp, lp, tea, mask, correct, groups, kl_clip=10.0, **kw)
    want, _ = L.scope_loss(lp, lp, tea, mask, correct, groups, per_token_kl=np.clip(k3, -10, 10), **kw)
    unclipped, _ = L.scope_loss(lp, lp, tea, mask, correct, groups, **kw)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    assert abs(float(unclipped) - float(got)) > 1.0
    _, m = L.grpo_loss(lp, lp, tea, mask, correct.astype(np.float32), groups, kl_clip=10.0)
    np.testing.assert_allclose(float(m["kl"]), np.clip(k3, -10, 10).mean(), rtol=1e-5)


def _verl_grpo_advantages(scores, index, norm_by_std=True, eps=1e-6):
    """Independent re-derivation of verl's compute_grpo_outcome_advantage (its dict-of-lists
    loop, in numpy float64): groups of one get mean 0 and std 1, larger ones torch.std (n-1)."""
    groups = {}
    for i, g in enumerate(index):
        groups.setdefault(int(g), []).append(float(scores[i]))
    out = np.zeros(len(scores))
    for i, g in enumerate(index):
        vals = np.array(groups[int(g)])
        mean, std = (0.0, 1.0) if len(vals) == 1 else (vals.mean(), vals.std(ddof=1))
        out[i] = (scores[i] - mean) / (std + eps) if norm_by_std else scores[i] - mean
    return out


@pytest.mark.parametrize("normalize_std", [True, False])
def test_group_advantages_lone_rollout_gets_its_raw_reward_as_verl(normalize_std):
    # Issue 22: a GRPO group of one rollout gets its raw reward as the advantage (verl), not 0.
    rewards = np.array([1.0, 0.0, 1.0, 0.5, 1.0, 0.0, 0.25], np.float32)
    gids = np.array([5, 9, 9, 2, 7, 7, 11], np.int32)  # groups 5, 2 and 11 have one rollout
    got = np.asarray(L.group_advantages(rewards, gids, normalize_std=normalize_std))
    want = _verl_grpo_advantages(rewards, gids, norm_by_std=normalize_std)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[[0, 3, 6]], [1.0, 0.5, 0.25], rtol=1e-5)  # raw rewards
    # A group left with one valid row (its other row invalid) is a group of one too; the
    # invalid row gets 0.
    valid = np.array([True, True, False, True, True, True, True])
    got = np.asarray(L.group_advantages(rewards, gids, valid, normalize_std=normalize_std))
    assert got[2] == 0.0 and got[1] == pytest.approx(0.0, abs=1e-6)  # group 9: lone reward 0
    valid[1], valid[2] = False, True
    got = np.asarray(L.group_advantages(rewards, gids, valid, normalize_std=normalize_std))
    assert got[2] == pytest.approx(1.0, rel=1e-5) and got[1] == 0.0
