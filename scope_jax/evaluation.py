"""Avg@k / Pass@k evaluation: sample k responses per problem, verify them, summarise.

Two layers:

* Pure metrics (numpy only), on correctness counts: ``avg_at_k``, ``pass_at_k`` by the
  unbiased estimator 1 - C(n-c, k) / C(n, k) of Chen et al. (2021) in its numerically stable
  product form (default) or the paper's released script's 1 - (1 - c/n)^k
  (estimator="paper"), the Pass@k curve for k = 1..K, percentile-bootstrap confidence
  intervals over problems, and the macro average over benchmarks (with a stratified bootstrap
  interval).
* The loop, ``evaluate`` = ``prepare`` (chat-templated prompts, scope_jax.data; the rollout
  Settings; batches) -> ``run`` (k samples per prompt, decoded and verified through
  scope_jax.rollout.generate_and_verify, the path training uses; the verifier pool never
  evaluates model output as code) -> ``summarise`` (per-problem records and a summary), its
  options in one ``EvalSettings``. ``scope_jax.data.write_jsonl`` / ``write_json`` / ``plot_pass_curves`` /
  ``format_table`` turn results into files and a printable table.

Metrics are fractions in [0, 1] in every record and summary; only ``format_table`` prints
percentages. The paper's settings are the defaults: k = 32, temperature 0.6, top-p 0.95,
top-k 20 (the paper's setup: scope_jax/losses.py docstring).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from scope_jax import data as data_lib
from scope_jax import rollout as rollout_lib
from scope_jax import sampling
from scope_jax import sharding as shd
from scope_jax.data import PAPER_INSTRUCTION
from scope_jax.verifiers import Verifier

log = logging.getLogger(__name__)

PAPER_K = 32
PAPER_TEMPERATURE = 0.6
PAPER_TOP_P = 0.95
PAPER_TOP_K = 20
PAPER_MAX_NEW_TOKENS = 32768


# ---------------------------------------------------------------------------------------------
# Pure metrics


def _counts(n, c) -> tuple[np.ndarray, np.ndarray]:
    """n, c as int64 arrays of one shape, checked: n >= 1 and 0 <= c <= n."""
    n = np.asarray(n)
    c = np.asarray(c)
    for name, a in (("n", n), ("c", c)):
        if a.dtype.kind not in "iu" and not (a.dtype.kind == "f" and np.all(a == np.round(a))):
            raise ValueError(f"{name} must hold integers, got dtype {a.dtype}")
    n, c = np.broadcast_arrays(n.astype(np.int64), c.astype(np.int64))
    if np.any(n < 1):
        raise ValueError(f"n (samples per problem) must be >= 1, got min {n.min()}")
    if np.any(c < 0) or np.any(c > n):
        bad = int(np.flatnonzero((c < 0) | (c > n))[0])
        raise ValueError(f"c (correct samples) must be in [0, n]; problem {bad} has "
                         f"c={c.flat[bad]}, n={n.flat[bad]}")
    return n, c


PASS_AT_K_ESTIMATORS = ("unbiased", "paper")


def pass_at_k(n, c, k: int, estimator: str = "unbiased") -> np.ndarray:
    """Pass@k per problem, by one of two estimators.

    "unbiased" (default): 1 - C(n-c, k) / C(n, k) (Chen et al. 2021), the probability that k
      samples drawn *without* replacement from the n hold a correct one. Computed as
      1 - prod_{i=n-c+1}^{n} (1 - k / i), which never forms the binomials (they overflow float64
      near n = 1030) and is exact whenever n - c < k (then every k-subset holds a correct sample
      and the value is 1). Needs k <= n.
    "paper": 1 - (1 - c/n)^k, the expectation of the paper's released eval script, which draws
      k of the n samples *with* replacement. At n = k = 32 it gives 1 - (31/32)^32 = 0.638 for
      c = 1 where the unbiased estimator gives 1.0; use it to set numbers beside the paper's.

    n: int [P] (or scalar) samples drawn per problem; c: int [P] correct ones; k >= 1.
    Returns float64 [P] (a 0-d array for scalar inputs).
    """
    n, c = _counts(n, c)
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if estimator == "paper":
        # The released script refuses k > n (it asserts the problem has at least k samples before
        # it draws k of them), so this estimator does too rather than extrapolate past n.
        if np.any(n < k):
            raise ValueError(f"pass_at_k(estimator='paper'): pass@{k} needs at least k samples "
                             f"per problem, as the paper's eval script asserts; min n is {n.min()}")
        return 1.0 - (1.0 - c / n) ** k
    if estimator != "unbiased":
        raise ValueError(f"pass_at_k: estimator must be one of {PASS_AT_K_ESTIMATORS}, "
                         f"got {estimator!r}")
    if np.any(n < k):
        raise ValueError(f"pass@{k} needs at least k samples per problem; min n is {n.min()}")
    out = np.ones(n.shape, np.float64)
    for idx in np.ndindex(n.shape):
        ni, ci = int(n[idx]), int(c[idx])
        if ni - ci >= k:
            out[idx] = 1.0 - np.prod(1.0 - k / np.arange(ni - ci + 1, ni + 1, dtype=np.float64))
    return out


def avg_at_k(correct) -> np.ndarray:
    """Avg@k per problem: the fraction of a problem's samples that are correct.

    correct: bool / {0, 1} [P, n] (row p = the n samples of problem p).
    Returns float64 [P]; its mean is the benchmark's Avg@k.
    """
    a = np.asarray(correct)
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"correct must be [problems, samples] with samples >= 1, got {a.shape}")
    if not np.all((a == 0) | (a == 1)):
        raise ValueError("correct must hold only 0/1 (or booleans)")
    return a.astype(np.float64).mean(axis=1)


def pass_curve(n, c, max_k: int | None = None, estimator: str = "unbiased") -> np.ndarray:
    """Mean Pass@k over problems for k = 1..max_k (default: the smallest n), by `estimator`
    (see pass_at_k).

    n, c: int [P]. Returns float64 [max_k]; entry j is mean Pass@(j+1).
    """
    n, c = _counts(n, c)
    max_k = int(n.min()) if max_k is None else int(max_k)
    return np.array([pass_at_k(n, c, j, estimator).mean() for j in range(1, max_k + 1)])


def bootstrap_ci(values, *, num_resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of mean(values), resampling problems with replacement.

    values: float [P] per-problem scores (Avg@k or Pass@k of each problem).
    Returns (low, high) at `confidence` (two-sided); deterministic for a given seed.
    """
    v = np.asarray(values, np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"values must be a non-empty 1-D array, got shape {v.shape}")
    means = _resampled_means(v, num_resamples, np.random.default_rng(seed))
    return _percentiles(means, confidence)


def _resampled_means(v: np.ndarray, num_resamples: int, rng: np.random.Generator) -> np.ndarray:
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    idx = rng.integers(0, v.size, size=(num_resamples, v.size))
    return v[idx].mean(axis=1)


def _percentiles(means: np.ndarray, confidence: float) -> tuple[float, float]:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def macro_ci(per_benchmark: Sequence[Sequence[float]], *, num_resamples: int = 1000,
             confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of the macro average (the unweighted mean of the benchmark means).

    Stratified: each resample draws every benchmark's problems from that benchmark only, so a
    30-problem AIME keeps its weight of one benchmark. per_benchmark: B sequences of per-problem
    scores. Returns (low, high).
    """
    if not per_benchmark:
        raise ValueError("macro_ci: no benchmarks")
    means = np.zeros(num_resamples)
    for b, values in enumerate(per_benchmark):
        v = np.asarray(values, np.float64)
        if v.ndim != 1 or v.size == 0:
            raise ValueError(f"macro_ci: benchmark {b} has no per-problem scores")
        means += _resampled_means(v, num_resamples, np.random.default_rng([seed, b]))
    return _percentiles(means / len(per_benchmark), confidence)


def summarize(n, c, k: int, *, num_resamples: int = 1000, confidence: float = 0.95,
              seed: int = 0, estimator: str = "unbiased") -> dict[str, Any]:
    """The metrics of one benchmark from per-problem sample counts.

    n, c: int [P] samples and correct samples per problem (n >= k for the unbiased estimator).
    Returns a JSON-ready dict: num_problems, k, avg_at_k (mean c / n), avg_at_k_ci, pass_at_k
    (mean Pass@k by `estimator`, see pass_at_k), pass_at_k_ci, pass_at_k_estimator, pass_curve
    (mean Pass@j for j = 1..k), confidence, num_resamples.
    """
    n, c = _counts(np.atleast_1d(n), np.atleast_1d(c))
    avg = c / n
    pk = pass_at_k(n, c, k, estimator)
    ci = dict(num_resamples=num_resamples, confidence=confidence, seed=seed)
    return {
        "num_problems": int(n.size), "k": int(k),
        "avg_at_k": float(avg.mean()), "avg_at_k_ci": list(bootstrap_ci(avg, **ci)),
        "pass_at_k": float(pk.mean()), "pass_at_k_ci": list(bootstrap_ci(pk, **ci)),
        "pass_at_k_estimator": estimator,
        "pass_curve": pass_curve(n, c, k, estimator).tolist(),
        "confidence": confidence, "num_resamples": num_resamples,
    }


def paired_difference(base: tuple[Sequence[int], Sequence[int]],
                      other: tuple[Sequence[int], Sequence[int]], k: int, *,
                      num_resamples: int = 1000, confidence: float = 0.95,
                      seed: int = 0, estimator: str = "unbiased") -> dict[str, Any]:
    """How much `other` beats `base` on the same problems, with paired bootstrap intervals.

    base, other: (n int [P], c int [P]) per-problem sample and correct counts of two models on
    the same P problems in the same order (EvalResult.counts()). The interval resamples
    problems jointly for both models, so the problem-to-problem spread that both share (easy
    vs hard problems) cancels: it is much tighter than comparing the two separate intervals.
    Returns {"num_problems", "k", "avg_at_k_diff", "avg_at_k_diff_ci", "pass_at_k_diff",
    "pass_at_k_diff_ci", "pass_at_k_estimator", "wins", "losses"} (diffs are other - base;
    Pass@k by `estimator`, see pass_at_k; wins / losses: problems where other's Avg@k is
    higher / lower), JSON-ready.
    """
    (na, ca), (nb, cb) = _counts(*base), _counts(*other)
    if na.shape != nb.shape:
        raise ValueError(f"paired_difference: {na.size} vs {nb.size} problems; both models must "
                         "be evaluated on the same problems")
    d_avg = cb / nb - ca / na
    d_pass = pass_at_k(nb, cb, k, estimator) - pass_at_k(na, ca, k, estimator)
    ci = dict(num_resamples=num_resamples, confidence=confidence, seed=seed)
    return {"num_problems": int(na.size), "k": int(k),
            "avg_at_k_diff": float(d_avg.mean()), "avg_at_k_diff_ci": list(bootstrap_ci(d_avg, **ci)),
            "pass_at_k_diff": float(d_pass.mean()),
            "pass_at_k_diff_ci": list(bootstrap_ci(d_pass, **ci)),
            "pass_at_k_estimator": estimator,
            "wins": int((d_avg > 0).sum()), "losses": int((d_avg < 0).sum())}


def hierarchical_bootstrap_ci(values_per_seed: Sequence[Sequence[float]], *,
                              num_resamples: int = 1000, confidence: float = 0.95,
                              seed: int = 0) -> tuple[float, float]:
    """Two-stage percentile-bootstrap interval of the seed-pooled mean: the mean over seeds of
    each seed's mean over its problems.

    values_per_seed: S sequences of per-problem scores (one per seed of a study: each seed has
    its own toy build, test problems and training run, so problems are nested in seeds). Each
    resample draws S seeds with replacement, then for every drawn seed its problems with
    replacement (independently for repeated seeds), and averages the drawn seeds' means. The
    interval thus carries both the seed-to-seed spread (build and training noise) and the
    problem sampling; with one seed it is bootstrap_ci's interval. Returns (low, high).
    """
    vs = [np.asarray(v, np.float64) for v in values_per_seed]
    if not vs or any(v.ndim != 1 or v.size == 0 for v in vs):
        raise ValueError("hierarchical_bootstrap_ci: need >= 1 seed, each a non-empty 1-D array "
                         f"(got shapes {[v.shape for v in vs]})")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    rng = np.random.default_rng(seed)
    n_seeds = len(vs)
    choice = rng.integers(0, n_seeds, size=(num_resamples, n_seeds))  # [R, S] drawn seeds
    # means[s][r, j]: a fresh problem resample of seed s for slot j of resample r.
    means = [v[rng.integers(0, v.size, size=(num_resamples, n_seeds, v.size))].mean(-1) for v in vs]
    stacked = np.stack(means)  # [S, R, S]
    r_idx, j_idx = np.meshgrid(np.arange(num_resamples), np.arange(n_seeds), indexing="ij")
    pooled = stacked[choice, r_idx, j_idx].mean(axis=1)  # [R]
    return _percentiles(pooled, confidence)


def pooled_summary(counts_per_seed: Sequence[tuple[Sequence[int], Sequence[int]]], k: int, *,
                   num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
                   estimator: str = "unbiased") -> dict[str, Any]:
    """One model's metrics pooled over the seeds of a study.

    counts_per_seed: S pairs (n int [P_s], c int [P_s]) of per-problem counts, one per seed.
    Returns {"num_seeds", "num_problems" (total), "k", "avg_at_k" (mean over seeds of the
    seed's Avg@k), "avg_at_k_ci" (hierarchical_bootstrap_ci), "avg_at_k_per_seed" [S],
    "pass_at_k", "pass_at_k_ci", "pass_at_k_per_seed", "pass_at_k_estimator", "confidence"}.
    """
    if not counts_per_seed:
        raise ValueError("pooled_summary: no seeds")
    avgs, passes = [], []
    for n, c in counts_per_seed:
        n, c = _counts(np.atleast_1d(n), np.atleast_1d(c))
        avgs.append(c / n)
        passes.append(pass_at_k(n, c, k, estimator))
    ci = dict(num_resamples=num_resamples, confidence=confidence, seed=seed)
    return {"num_seeds": len(avgs), "num_problems": int(sum(a.size for a in avgs)), "k": int(k),
            "avg_at_k": float(np.mean([a.mean() for a in avgs])),
            "avg_at_k_ci": list(hierarchical_bootstrap_ci(avgs, **ci)),
            "avg_at_k_per_seed": [float(a.mean()) for a in avgs],
            "pass_at_k": float(np.mean([p.mean() for p in passes])),
            "pass_at_k_ci": list(hierarchical_bootstrap_ci(passes, **ci)),
            "pass_at_k_per_seed": [float(p.mean()) for p in passes],
            "pass_at_k_estimator": estimator, "confidence": confidence}


def pooled_difference(pairs: Sequence[tuple[tuple[Sequence[int], Sequence[int]],
                                            tuple[Sequence[int], Sequence[int]]]], k: int, *,
                      num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
                      estimator: str = "unbiased") -> dict[str, Any]:
    """paired_difference pooled over seeds: how much `other` beats `base`, with a paired,
    hierarchical bootstrap interval (seeds, then problems within a seed, both models drawn on
    the same problems; hierarchical_bootstrap_ci of the per-problem differences).

    pairs: S entries (base, other), each (n int [P_s], c int [P_s]), the two models of one seed
    evaluated on that seed's problems in the same order. Returns {"num_seeds", "num_problems",
    "k", "avg_at_k_diff" (mean over seeds), "avg_at_k_diff_ci", "avg_at_k_diff_per_seed" [S],
    "pass_at_k_diff", "pass_at_k_diff_ci", "pass_at_k_diff_per_seed", "pass_at_k_estimator",
    "seeds_better" (seeds whose Avg@k difference is > 0), "wins", "losses" (problems, summed)}.
    """
    if not pairs:
        raise ValueError("pooled_difference: no seeds")
    d_avg, d_pass = [], []
    for s, (base, other) in enumerate(pairs):
        (na, ca), (nb, cb) = _counts(*base), _counts(*other)
        if na.shape != nb.shape:
            raise ValueError(f"pooled_difference: seed {s} has {na.size} vs {nb.size} problems; "
                             "both models must be evaluated on the same problems")
        d_avg.append(np.atleast_1d(cb / nb - ca / na))
        d_pass.append(np.atleast_1d(pass_at_k(nb, cb, k, estimator) - pass_at_k(na, ca, k, estimator)))
    ci = dict(num_resamples=num_resamples, confidence=confidence, seed=seed)
    per_seed = [float(d.mean()) for d in d_avg]
    return {"num_seeds": len(pairs), "num_problems": int(sum(d.size for d in d_avg)), "k": int(k),
            "avg_at_k_diff": float(np.mean(per_seed)),
            "avg_at_k_diff_ci": list(hierarchical_bootstrap_ci(d_avg, **ci)),
            "avg_at_k_diff_per_seed": per_seed,
            "pass_at_k_diff": float(np.mean([d.mean() for d in d_pass])),
            "pass_at_k_diff_ci": list(hierarchical_bootstrap_ci(d_pass, **ci)),
            "pass_at_k_diff_per_seed": [float(d.mean()) for d in d_pass],
            "pass_at_k_estimator": estimator,
            "seeds_better": int(sum(x > 0 for x in per_seed)),
            "wins": int(sum((d > 0).sum() for d in d_avg)),
            "losses": int(sum((d < 0).sum() for d in d_avg))}


def macro_summary(counts: Sequence[tuple[Sequence[int], Sequence[int]]], k: int, *,
                  num_resamples: int = 1000, confidence: float = 0.95,
                  seed: int = 0, estimator: str = "unbiased") -> dict[str, Any]:
    """Macro average over benchmarks (each benchmark weighs the same, as the paper's headline table).

    counts: one (n [P_b], c [P_b]) pair per benchmark. Returns the keys of `summarize` with
    avg_at_k / pass_at_k / pass_curve the means of the benchmarks' values, stratified bootstrap
    intervals, num_benchmarks, and num_problems summed.
    """
    if not counts:
        raise ValueError("macro_summary: no benchmarks")
    avgs, passes, curves, total = [], [], [], 0
    for n, c in counts:
        n, c = _counts(np.atleast_1d(n), np.atleast_1d(c))
        avgs.append(c / n)
        passes.append(pass_at_k(n, c, k, estimator))
        curves.append(pass_curve(n, c, k, estimator))
        total += n.size
    ci = dict(num_resamples=num_resamples, confidence=confidence, seed=seed)
    return {
        "num_benchmarks": len(counts), "num_problems": total, "k": int(k),
        "avg_at_k": float(np.mean([a.mean() for a in avgs])),
        "avg_at_k_ci": list(macro_ci(avgs, **ci)),
        "pass_at_k": float(np.mean([p.mean() for p in passes])),
        "pass_at_k_ci": list(macro_ci(passes, **ci)),
        "pass_at_k_estimator": estimator,
        "pass_curve": np.mean(curves, axis=0).tolist(),
        "confidence": confidence, "num_resamples": num_resamples,
    }


# ---------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class EvalResult:
    """The outcome of `evaluate` on one benchmark.

    records: one JSON-ready dict per evaluated problem, in file order (see `evaluate`).
    summary: `summarize`'s dict plus run facts (settings, dropped prompts, reasons, timings).
    """

    records: list[dict[str, Any]]
    summary: dict[str, Any]

    def counts(self) -> tuple[np.ndarray, np.ndarray]:
        """(n int64 [P], c int64 [P]) of the records, for `macro_summary`."""
        return (np.array([r["n"] for r in self.records], np.int64),
                np.array([r["c"] for r in self.records], np.int64))


def clip_text(text: str, max_chars: int) -> str:
    """text itself if it has at most max_chars characters, else its head and tail (the final
    answer sits at the end) around a marker saying how much was cut."""
    if max_chars <= 0 or len(text) <= max_chars:
        return text if max_chars > 0 else ""
    head = max_chars // 4
    tail = max_chars - head
    return f"{text[:head]}\n[... {len(text) - head - tail} characters cut ...]\n{text[-tail:]}"


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How `evaluate` samples, verifies and summarises (the paper's settings by default).

    k: samples per problem (n = k, so Pass@k uses all of them); temperature / top_p / top_k:
      sampling (paper: 0.6 / 0.95 / 20; top_p / top_k None = off).
    repetition_penalty: transformers' repetition penalty (1.0 = off; the paper uses 1.08 for
      its Qwen3-1.7B student).
    max_new_tokens: response budget; None = the paper's 32768, lowered to what the model's
      max_position_embeddings leaves after the longest prompt (the value used is in the summary).
    max_prompt_len: longer prompts are dropped (counted and listed in the summary, never
      truncated); None = max_position_embeddings - 1.
    batch_prompts: prompts per generate call (batch_prompts * k rows). Prompts are batched in
      order of length (fewer padded positions); the last batch is topped up with copies of its
      last prompt, whose samples are discarded, so every call has the same row count (one
      compiled program per prompt bucket).
    seed: batch b samples with key fold_in(key(seed), b); the same settings give the same output.
    instruction / style / chat_template_kwargs: prompt construction (scope_jax.data.
      build_prompt): the instruction appended to each problem (default the paper's "Please
      reason step by step, ..."; None appends none, as the toy task's TOY_INSTRUCTION).
    eos_ids: extra stop ids on top of sampling.stop_ids(model.config, tokenizer).
    keep_response_chars: each response's text is stored clipped to this many characters
      (`clip_text`); 0 stores none.
    num_resamples / confidence: bootstrap intervals (seed `seed`).
    pass_at_k_estimator: "unbiased" or "paper" (see pass_at_k), for records and summary.
    verifier_workers / verifier_timeout_s / verifier_mode: the Verifier pool evaluate opens
      when it is given none.
    """

    k: int = PAPER_K
    temperature: float = PAPER_TEMPERATURE
    top_p: float | None = PAPER_TOP_P
    top_k: int | None = PAPER_TOP_K
    repetition_penalty: float = 1.0
    max_new_tokens: int | None = None
    max_prompt_len: int | None = None
    batch_prompts: int = 8
    seed: int = 0
    instruction: str | None = PAPER_INSTRUCTION
    style: str = "chat"
    chat_template_kwargs: Mapping[str, Any] | None = None
    eos_ids: Sequence[int] = ()
    keep_response_chars: int = 1000
    num_resamples: int = 1000
    confidence: float = 0.95
    pass_at_k_estimator: str = "unbiased"
    verifier_workers: int | None = None
    verifier_timeout_s: float = 5.0
    verifier_mode: str = "boxed"

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"evaluate: k must be an int >= 1, got {self.k!r}")
        if self.batch_prompts < 1:
            raise ValueError(f"evaluate: batch_prompts must be >= 1, got {self.batch_prompts}")
        if self.pass_at_k_estimator not in PASS_AT_K_ESTIMATORS:
            raise ValueError(f"evaluate: pass_at_k_estimator must be one of {PASS_AT_K_ESTIMATORS}, "
                             f"got {self.pass_at_k_estimator!r}")


@dataclasses.dataclass
class Prepared:
    """What `prepare` settles before anything is generated.

    kept: indices into the examples of the prompts that fit; token_ids[j]: prompt of kept[j];
    dropped: sources of the prompts that did not fit; batches: lists of positions j (prompts of
    similar length together); rollout: the sampler's Settings (budget, stop ids, pad id);
    max_prompt_len: the limit used.
    """

    examples: Sequence
    kept: list[int]
    token_ids: list[list[int]]
    dropped: list[str]
    batches: list[list[int]]
    rollout: rollout_lib.Settings
    max_prompt_len: int


def prepare(model, tokenizer, examples: Sequence, s: EvalSettings) -> Prepared:
    """Chat-templated prompts, the response budget, the stop / pad ids and the batches."""
    if not examples:
        raise ValueError("evaluate: no examples")
    max_pos = int(model.config.max_position_embeddings)
    max_prompt_len = max_pos - 1 if s.max_prompt_len is None else s.max_prompt_len
    token_ids, kept = data_lib.encode_prompts(
        examples, tokenizer, max_prompt_len=max_prompt_len, instruction=s.instruction, style=s.style,
        chat_template_kwargs=s.chat_template_kwargs)
    dropped = [examples[i].source for i in sorted(set(range(len(examples))) - set(kept))]
    if not kept:
        raise ValueError(f"evaluate: all {len(examples)} prompts are longer than "
                         f"max_prompt_len={max_prompt_len} tokens")
    longest = max(len(t) for t in token_ids)
    max_new_tokens = s.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = max(1, min(PAPER_MAX_NEW_TOKENS, max_pos - longest))
    elif longest + max_new_tokens > max_pos:
        log.warning("evaluate: longest prompt (%d tokens) + max_new_tokens (%d) exceeds the "
                    "model's max_position_embeddings (%d)", longest, max_new_tokens, max_pos)
    settings = rollout_lib.settings_for(
        model.config, tokenizer, max_new_tokens=int(max_new_tokens), temperature=s.temperature,
        top_k=s.top_k, top_p=s.top_p, repetition_penalty=s.repetition_penalty, eos_ids=s.eos_ids)
    if not settings.stop_ids:
        log.warning("evaluate: no EOS id in the tokenizer or model config; every response runs "
                    "to max_new_tokens=%d", max_new_tokens)
    order = sorted(range(len(kept)), key=lambda j: (len(token_ids[j]), j))
    batches = [order[i:i + s.batch_prompts] for i in range(0, len(order), s.batch_prompts)]
    return Prepared(examples=examples, kept=kept, token_ids=token_ids, dropped=dropped,
                    batches=batches, rollout=settings, max_prompt_len=max_prompt_len)


def run(model, tokenizer, p: Prepared, s: EvalSettings, verifier, mesh=None) -> tuple[list[dict], dict]:
    """Generates and verifies every batch (rollout.generate_and_verify); returns the
    per-problem records in example order and {"seconds", "generate_seconds", "tokens"}.

    One background thread runs the verifier (whose workers are processes) while the main
    thread generates the next batch; the verifier is only ever used from that one thread.
    Results are collected on the main thread, in batch order, so errors surface here.
    """
    engine = rollout_lib.make_engine("static", model, p.rollout, mesh=mesh)
    base_key = jax.random.key(s.seed)
    records: dict[int, dict[str, Any]] = {}
    gen_seconds, gen_tokens = 0.0, 0
    t_start = time.perf_counter()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    pending: list[tuple[rollout_lib.Verified, list[int], list[int]]] = []

    def collect(block: bool):
        while pending and (block or pending[0][0].pending.done()):
            done, batch, lengths = pending.pop(0)
            finish = sampling.finish_reason_names(done.out)[:len(batch) * s.k]
            records.update(_records(p, s, batch, done.texts, lengths, finish, done.results()))

    try:
        for b, batch in enumerate(p.batches):
            prompts = [p.token_ids[j] for j in batch]
            if len(p.batches) > 1 and len(prompts) < s.batch_prompts:
                prompts += [prompts[-1]] * (s.batch_prompts - len(prompts))
            t0 = time.perf_counter()
            done = rollout_lib.generate_and_verify(
                engine, prompts, [p.examples[p.kept[j]].answer for j in batch], verifier, tokenizer,
                num_samples=s.k, key=jax.random.fold_in(base_key, b), submit=pool.submit)
            lengths = [int(n) for n in shd.local_rows(done.out.lengths)[:len(batch) * s.k]]
            dt = time.perf_counter() - t0
            gen_seconds += dt
            gen_tokens += sum(lengths)
            pending.append((done, batch, lengths))
            collect(block=False)
            log.info("batch %d/%d: %d prompts x %d samples, %d tokens in %.1f s (%.1f tokens/s)",
                     b + 1, len(p.batches), len(batch), s.k, sum(lengths), dt,
                     sum(lengths) / max(dt, 1e-9))
        collect(block=True)
    finally:
        pool.shutdown(wait=True)
    recs = [records[i] for i in sorted(records)]
    if len(recs) != len(p.kept):  # every kept prompt went through exactly one batch
        raise RuntimeError(f"evaluate: {len(p.kept) - len(recs)} problems got no result")
    return recs, {"seconds": time.perf_counter() - t_start, "generate_seconds": gen_seconds,
                  "tokens": gen_tokens}


def _records(p: Prepared, s: EvalSettings, batch, texts, lengths, finish, results) -> dict[int, dict]:
    """The records of one batch's problems (see evaluate), keyed by example index."""
    out = {}
    for slot, j in enumerate(batch):
        ex = p.examples[p.kept[j]]
        rows = range(slot * s.k, (slot + 1) * s.k)
        res = [results[r] for r in rows]
        rewards = [float(r.reward) for r in res]
        if any(r not in (0.0, 1.0) for r in rewards):
            raise ValueError(f"verifier returned a non-binary reward for {ex.source}: {rewards}")
        c = int(sum(rewards))
        out[p.kept[j]] = {
            "index": p.kept[j], "source": ex.source, "problem": ex.problem[:300],
            "gold": ex.answer if isinstance(ex.answer, (str, list)) else str(ex.answer),
            "prompt_tokens": len(p.token_ids[j]), "n": s.k, "c": c,
            "avg": c / s.k, "pass_at_k": float(pass_at_k(s.k, c, s.k, s.pass_at_k_estimator)),
            "rewards": rewards, "reasons": [r.reason for r in res],
            "extracted": [r.extracted for r in res],
            "lengths": [lengths[r] for r in rows],
            "finish": [finish[r] for r in rows],
            "responses": [clip_text(texts[r], s.keep_response_chars) for r in rows],
        }
    return out


def summarise(p: Prepared, s: EvalSettings, recs: list[dict], timing: dict, verifier_mode: str) -> EvalResult:
    """The EvalResult of run's records: `summarize`'s metrics plus the run's facts."""
    n = np.array([r["n"] for r in recs])
    c = np.array([r["c"] for r in recs])
    summary = summarize(n, c, s.k, num_resamples=s.num_resamples, confidence=s.confidence, seed=s.seed,
                        estimator=s.pass_at_k_estimator)
    reasons: dict[str, int] = {}
    for r in recs:
        for reason in r["reasons"]:
            reasons[reason] = reasons.get(reason, 0) + 1
    all_lengths = [x for r in recs for x in r["lengths"]]
    summary.update({
        "num_dropped": len(p.dropped), "dropped": p.dropped,
        "reasons": dict(sorted(reasons.items())),
        "mean_response_tokens": float(np.mean(all_lengths)),
        "frac_length_stopped": float(np.mean([f == "length" for r in recs for f in r["finish"]])),
        "settings": {"k": s.k, "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
                     "repetition_penalty": s.repetition_penalty,
                     "max_new_tokens": p.rollout.max_new_tokens, "max_prompt_len": p.max_prompt_len,
                     "seed": s.seed, "style": s.style, "instruction": s.instruction,
                     "eos_ids": list(p.rollout.stop_ids), "verifier_mode": verifier_mode},
        "seconds": timing["seconds"], "generate_seconds": timing["generate_seconds"],
        "tokens_per_second": timing["tokens"] / max(timing["generate_seconds"], 1e-9),
    })
    return EvalResult(records=recs, summary=summary)


def evaluate(model, tokenizer, examples: Sequence, settings: EvalSettings = EvalSettings(), *,
             verifier=None, mesh=None) -> EvalResult:
    """Sample k responses per problem, verify them, and compute Avg@k and Pass@k:
    prepare -> run -> summarise.

    model: a scope_jax.models.Transformer (the sampler's model contract).
    tokenizer: the model's transformers tokenizer (chat template for style "chat"/"deepmath").
    examples: scope_jax.data.Example list (problem, answer str | list[str], source).
    settings: EvalSettings (the paper's by default).
    verifier: an object with verify_batch(responses, golds) -> list[VerifyResult] (e.g. an open
      scope_jax.verifiers.Verifier); None = a Verifier(settings.verifier_workers,
      verifier_timeout_s, mode=verifier_mode) for this call. Verification of a batch overlaps
      the generation of the next.
    mesh: the rollout engine's (rows split over its batch axes).

    Returns EvalResult. Each record: index (position in `examples`), source, problem (first 300
    characters), gold, prompt_tokens, n, c, avg (c / n), pass_at_k, rewards [n] float, reasons
    [n] str, extracted [n] str|None, lengths [n] int (tokens, EOS included), finish [n]
    ('eos'|'length'), responses [n] str (clipped).
    """
    s = settings
    p = prepare(model, tokenizer, examples, s)
    own_verifier = verifier is None
    if own_verifier:
        verifier = Verifier(num_workers=s.verifier_workers, timeout_s=s.verifier_timeout_s, mode=s.verifier_mode)
    try:
        recs, timing = run(model, tokenizer, p, s, verifier, mesh)
    finally:
        if own_verifier:
            verifier.close()
    return summarise(p, s, recs, timing, getattr(verifier, "mode", s.verifier_mode))


# ---------------------------------------------------------------------------------------------
# Output


def write_json(path: str | os.PathLike, obj: Any) -> str:
    """Write obj as indented JSON (UTF-8), creating parent directories. Returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return path


def plot_pass_curves(curves: Mapping[str, Sequence[float]], path: str | os.PathLike, *,
                     title: str | None = None, estimator: str = "unbiased") -> str:
    """Pass@k against k (k = 1..len(curve)), one line per label, saved as a PNG.

    curves: label (e.g. "scope / math500") -> mean Pass@k values for k = 1..K, fractions.
    The x axis is log2 when some K >= 4; estimator names the Pass@k estimator in the default
    title. Uses matplotlib's Agg backend (no display needed).
    Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curves:
        raise ValueError("plot_pass_curves: no curves")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    longest = 1
    for label, curve in curves.items():
        y = 100.0 * np.asarray(curve, np.float64)
        if y.ndim != 1 or y.size == 0:
            raise ValueError(f"plot_pass_curves: curve {label!r} is empty or not 1-D")
        ks = np.arange(1, y.size + 1)
        longest = max(longest, y.size)
        ax.plot(ks, y, marker="o" if y.size <= 8 else None, markersize=3, label=label)
    if longest >= 4:
        ax.set_xscale("log", base=2)
        ticks = [2 ** i for i in range(int(math.log2(longest)) + 1)]
        ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("k")
    ax.set_ylabel("Pass@k (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.set_title(title or f"Pass@k ({estimator} estimator)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def _pct(x: float) -> str:
    return f"{100.0 * x:5.1f}"


def format_cell(summary: Mapping[str, Any]) -> str:
    """'Avg [lo, hi] / Pass [lo, hi]' in percent for one summary."""
    a, (alo, ahi) = summary["avg_at_k"], summary["avg_at_k_ci"]
    p, (plo, phi) = summary["pass_at_k"], summary["pass_at_k_ci"]
    return (f"{_pct(a)} [{_pct(alo).strip()}, {_pct(ahi).strip()}] / "
            f"{_pct(p)} [{_pct(plo).strip()}, {_pct(phi).strip()}]")


def format_table(results: Mapping[str, Mapping[str, Mapping[str, Any]]],
                 macro: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """A plain-text table: one row per benchmark (and a macro-average row), one column per model,
    each cell 'Avg@k [95% CI] / Pass@k [95% CI]' in percent; the header names the Pass@k
    estimator of the summaries (pass_at_k_estimator).

    results: model -> benchmark -> summary (as from `summarize` / `evaluate`).
    macro: model -> macro summary (`macro_summary`), shown as the last row when given.
    """
    models = list(results)
    benchmarks: list[str] = []
    for m in models:
        benchmarks += [b for b in results[m] if b not in benchmarks]
    ks = sorted({s["k"] for m in models for s in results[m].values()})
    k_txt = "/".join(str(k) for k in ks)
    conf = {s["confidence"] for m in models for s in results[m].values()}
    conf_txt = "/".join(f"{100 * c:g}%" for c in sorted(conf))
    est = {s.get("pass_at_k_estimator", "unbiased") for m in models for s in results[m].values()}
    est_txt = "/".join(sorted(est))
    rows = [[f"benchmark (n)"] + models]
    for b in benchmarks:
        sizes = {results[m][b]["num_problems"] for m in models if b in results[m]}
        row = [f"{b} ({'/'.join(str(s) for s in sorted(sizes))})"]
        row += [format_cell(results[m][b]) if b in results[m] else "-" for m in models]
        rows.append(row)
    if macro:
        rows.append([f"macro average ({len(benchmarks)})"]
                    + [format_cell(macro[m]) if m in macro else "-" for m in models])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"Avg@{k_txt} [{conf_txt} CI] / Pass@{k_txt} ({est_txt} estimator) [{conf_txt} CI], "
             "percent"]
    for i, r in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    dropped = [f"{m}/{b}: {s['num_dropped']}" for m in models for b, s in results[m].items()
               if s.get("num_dropped")]
    if dropped:
        lines.append("prompts dropped as too long (not scored): " + ", ".join(dropped))
    return "\n".join(lines)
