"""The reproduction study: every method and ablation, on both toys, over several seeds, with
seed-pooled paired comparisons (issue 14).

    python -m tools.study --out runs/study                     # the full study (hours; resumable)
    python -m tools.study --out runs/study --budget-only       # print the plan and its CPU budget
    python -m tools.study --out runs/q --quick                 # a tiny smoke run (tests)
    python -m tools.study --out runs/s --toys blindspot --seeds 0 --methods student,opd_n,scope --steps 50

For each toy family (scope_jax.toy.FAMILIES: toy, blindspot, unsure) and seed s:
1. builds (or reuses) the toy at OUT/toys/<toy>_s<s> with toy.toy_settings(toy, s): the seed
   changes the data, tokenizer, both models' init and batch order;
2. trains every method from that student with the family's config (configs/toy.py,
   configs/toy_blindspot.py, configs/toy_unsure.py) and its variant (configs/common.py VARIANTS), RL seed s, into
   OUT/runs/<toy>/s<s>/<method> (metrics.jsonl, checkpoints, export);
3. evaluates each model (and the untrained student and the teacher) with
   scope_jax.evaluation.evaluate (the loop tools/eval wraps) on the seed's first --problems test
   problems, k samples each at the paper's evaluation settings (T 0.6, top-p 0.95, top-k 20),
   and records the per-problem counts in OUT/eval/<toy>/s<s>/<method>.json: that file is the
   run's completion record. A killed study skips the completed runs when restarted, and a run
   killed mid-training resumes from its last checkpoint (scope_jax.train).
Then it writes OUT/results.json and OUT/table.md: per toy, each method's seed-pooled Avg@k and
Pass@k with hierarchical bootstrap intervals (seeds, then problems;
scope_jax.evaluation.pooled_summary) and its paired differences against the student,
against OPD (N=8 and N=1) and against SCOPE (pooled_difference), and OUT/curves_<toy>.png (rollout accuracy per
training step from each run's metrics.jsonl, mean over seeds). With scope and opd_n in the plan it
adds the per-prompt analysis (issue 22): SCOPE - OPD N=8 on the test problems whose SCOPE
weights start far from uniform against those near it (per_prompt_analysis; the weights, from
tools/premise.py at the run's settings, cached in OUT/weights/).

--archive DEST copies the records (not the models) to DEST, where `--out DEST` re-analyses
them, or adds seeds, without redoing a run (docs/study_long holds the long toy's).

Before anything runs it prints the plan's CPU budget: the runs still to do times the measured
cost of a toy build, a training step of each method and an evaluation (COSTS, measured on the
2-core dev machine; replaced by the study's own measurements once it has some).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import os
import shutil
import time

from tools.plot_runs import read_metrics

TOYS = ("toy", "blindspot", "unsure", "long", "long_styles")
# The long toys (issue 22; docs/study_longtoy.md): their own configs (configs/toy_long.py),
# response budget and costs; not in the default --toys.
LONG_TOYS = ("long", "long_styles")
METHODS = ("student", "teacher", "kd", "grpo", "opd", "opd_n", "scope")
ABLATIONS = ("no_weighting", "no_student_weighting", "no_teacher_weighting", "reversed_student",
             "reversed_teacher", "tau_0.5", "tau_2")
UNTRAINED = ("student", "teacher")
# Baselines of the paired differences: the student, OPD with SCOPE's 8 rollouts (same samples
# budget), the paper's OPD baseline (1 rollout per prompt) and SCOPE itself (an ablation's
# effect, as the paper's ablation table reads it).
BASELINES = ("student", "opd_n", "opd", "scope")

# Measured on the 2-core dev machine, 2026-11-30, by the full study itself (84 + 20 runs, while
# other jobs shared the machine; medians of its measured_costs), in seconds:
#   python -m tools.study --out runs/study
# build: tools/make_toy.py of one full-size toy (80-165 s). step: median time_s of steps 1-99
# in metrics.jsonl (configs/toy.py: 16 prompts x 8 rollouts; opd 1 rollout; the ablations cost
# what SCOPE costs). overhead: per trained run, start-up and the first step's compilation.
# eval: one model, 200 problems x 16 samples. At a load average of 11-14 every figure was
# about 2-3x these (the study was budgeted at ~3 h then; it took ~1.5 h here).
COSTS = {"build": 125.0, "eval": 2.0, "overhead": 20.0,
         "step": {"kd": 0.4, "grpo": 0.45, "opd": 0.05, "opd_n": 0.4, "scope": 0.45}}


# The long toys' costs (measured_costs replaces them with the study's own figures once it has
# some). 2-core dev machine, the study itself, alone on the machine (2026-12-06 23:26-00:26 UTC,
# long_styles seed 2, docs/study_longtoy.md): build = the seed's toy build (1,128 s; seeds 0-1
# took 1,100 and 1,132 s); step = median time_s of steps 1-49 (16 prompts x 8 rollouts, 320
# tokens; opd 1 rollout; the weighting ablations cost what SCOPE costs); eval = one model, 200
# problems x 16 samples (median of 8). grpo: a 6-step run beside a premise run (load average
# 3-4), an upper bound; overhead: step 0 (compilation), from the same 6-step runs.
LONG_COSTS = {"build": 1130.0, "eval": 37.0, "overhead": 40.0,
              "step": {"kd": 4.9, "grpo": 12.0, "opd": 0.62, "opd_n": 6.4, "scope": 5.9}}


def toy_costs(costs: dict, toy_name: str, out: str | None = None) -> dict:
    """The costs of one toy's runs: `costs` (COSTS or the study's measurements of the short
    toys) for the short toys; for a long toy LONG_COSTS, replaced by the study's own
    measurements of that toy when it has some (measured_costs restricted to it)."""
    if toy_name not in LONG_TOYS:
        return costs
    return measured_costs(out, toy_name) if out else LONG_COSTS


def method_cost(costs: dict, method: str) -> float:
    """Seconds per training step of `method` (ablations cost what SCOPE costs)."""
    return costs["step"].get(method, costs["step"]["scope"])


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the study runs. toys / seeds / methods: the grid; steps: training steps per run;
    problems / k: evaluation; scale: "full" toy builds or "tiny" ones (tests); prompts_per_step /
    num_samples: None keeps the config's values."""

    toys: tuple[str, ...]
    seeds: tuple[int, ...]
    methods: tuple[str, ...]
    steps: int
    problems: int
    k: int
    max_new_tokens: int = 48
    scale: str = "full"
    prompts_per_step: int | None = None
    num_samples: int | None = None


def runs(plan: Plan) -> list[tuple[str, int, str]]:
    """The (toy, seed, method) runs of the plan, in execution order (a toy build is reused by
    all of its methods)."""
    return [(t, s, m) for t in plan.toys for s in plan.seeds for m in plan.methods]


def toy_dir(out: str, toy_name: str, seed: int) -> str:
    return os.path.join(out, "toys", f"{toy_name}_s{seed}")


def run_dir(out: str, toy_name: str, seed: int, method: str) -> str:
    return os.path.join(out, "runs", toy_name, f"s{seed}", method)


def record_path(out: str, toy_name: str, seed: int, method: str) -> str:
    return os.path.join(out, "eval", toy_name, f"s{seed}", f"{method}.json")


def toy_settings(plan: Plan, toy_name: str, seed: int):
    """The build settings of (toy, seed); scale "tiny" shrinks data, models and steps (keeping
    the family's training mix) for smoke tests."""
    from scope_jax import toy

    s = toy.toy_settings(toy_name, seed)
    if plan.scale == "tiny":
        size = toy.ModelSize(32, 1, 2, 1, 64)
        s = dataclasses.replace(
            s, n_train=128, n_test=max(8, plan.problems), eval_temperatures=(1.0,), eval_samples=2,
            max_new_tokens=plan.max_new_tokens,
            teacher=dataclasses.replace(s.teacher, size=size, steps=8, batch_size=16),
            student=dataclasses.replace(s.student, size=size, steps=4, batch_size=16))
    elif plan.scale != "full":
        raise ValueError(f"unknown scale {plan.scale!r}")
    return s


def make_config(plan: Plan, out: str, toy_name: str, seed: int, method: str, paths: dict):
    """The training config of one run: the family's config with the method's variant."""
    from configs import toy as toy_config
    from configs import toy_blindspot

    if toy_name in LONG_TOYS:
        from configs import toy_long

        cfg = toy_long.long_config(toy_name, method)
    else:
        cfg = (toy_config.get_config(method) if toy_name == "toy"
               else toy_blindspot.family_config(toy_name, method))
    cfg.toy_dir = ""  # built by the study with the seed's settings
    cfg.student, cfg.teacher = paths["student"], paths["teacher"]
    cfg.tokenizer = paths["tokenizer"]
    cfg.data.train_files = paths["train"]
    cfg.seed = seed
    cfg.num_steps = plan.steps
    cfg.checkpoint_every = max(1, plan.steps // 4)
    cfg.sampling.max_new_tokens = response_budget(plan, toy_name)
    if plan.prompts_per_step:
        cfg.prompts_per_step = plan.prompts_per_step
    if plan.num_samples and method != "opd":  # opd is the 1-rollout baseline by definition
        cfg.num_samples = plan.num_samples
    cfg.workdir = run_dir(out, toy_name, seed, method)
    return cfg


def response_budget(plan: Plan, toy_name: str) -> int:
    """max_new_tokens of a run's rollouts and evaluation: the plan's, except for a long toy at
    full scale, whose solutions need its build's budget (ToySettings.max_new_tokens, 320)."""
    from scope_jax import toy

    if toy_name in LONG_TOYS and plan.scale == "full":
        return toy.toy_settings(toy_name).max_new_tokens
    return plan.max_new_tokens


def _in_scope(path: str, out: str, toy_name: str | None, level: str) -> bool:
    """Whether a measurement file under OUT/<level>/<toy>... counts for toy_name (None: every
    toy but the long ones, which have their own costs)."""
    name = os.path.relpath(path, os.path.join(out, level)).split(os.sep)[0]
    if level == "toys":
        name = name.rsplit("_s", 1)[0]
    return name == toy_name if toy_name else name not in LONG_TOYS


def measured_costs(out: str, toy_name: str | None = None) -> dict:
    """COSTS (LONG_COSTS for a long toy_name), with each entry replaced by the median of this
    study's own measurements when it has some (build seconds from the toy manifests, step
    seconds from metrics.jsonl, eval seconds from the completion records). toy_name None: the
    measurements of every toy but the long ones; a name: that toy's only."""
    import numpy as np

    base = LONG_COSTS if toy_name in LONG_TOYS else COSTS
    costs = {"build": base["build"], "eval": base["eval"], "overhead": base["overhead"],
             "step": dict(base["step"])}
    builds = []
    for m in glob.glob(os.path.join(out, "toys", "*", "manifest.json")):
        if not _in_scope(m, out, toy_name, "toys"):
            continue
        with open(m) as f:
            man = json.load(f)
        if man["settings"]["n_train"] >= 10000:  # full-size builds only
            builds.append(man["seconds"]["total"])
    if builds:
        costs["build"] = float(np.median(builds))
    steps: dict[str, list[float]] = {}
    for path in glob.glob(os.path.join(out, "runs", "*", "*", "*", "metrics.jsonl")):
        if not _in_scope(path, out, toy_name, "runs"):
            continue
        method = os.path.basename(os.path.dirname(path))
        rows = read_metrics(path)
        steps.setdefault(method, []).extend(r["time_s"] for r in rows[1:])  # step 0 compiles
    for method, ts in steps.items():
        if ts:
            costs["step"][method] = float(np.median(ts))
    evals = []
    for path in glob.glob(os.path.join(out, "eval", "*", "*", "*.json")):
        if not _in_scope(path, out, toy_name, "eval"):
            continue
        with open(path) as f:
            rec = json.load(f)
        # per 200 problems x 16 samples (the unit of COSTS["eval"])
        evals.append(rec["eval_seconds"] * 3200 / (len(rec["n"]) * rec["summary"]["k"]))
    if evals:
        costs["eval"] = float(np.median(evals))
    return costs


def budget(plan: Plan, out: str, costs: dict) -> dict:
    """Seconds still needed: builds of toys not built yet, training of runs without an export,
    and evaluation of runs without a completion record."""
    from scope_jax import toy

    todo = [r for r in runs(plan) if not os.path.isfile(record_path(out, *r))]
    # An archive (--archive) keeps a build's manifest, not its models: a run added to an
    # archived seed rebuilds the toy.
    builds = {(t, s) for t, s, _ in todo if toy.missing_parts(toy.toy_paths(toy_dir(out, t, s)))}
    per_toy = {t: toy_costs(costs, t, out if os.path.isdir(out) else None) for t in plan.toys}
    scale = 1.0 if plan.scale == "full" else 0.05
    train_s = 0.0
    for t, s, m in todo:
        if m in UNTRAINED or os.path.isfile(os.path.join(run_dir(out, t, s, m), "export", "config.json")):
            continue
        c = per_toy[t]  # toy_costs: a long toy's own costs (a step there is ~10x a short toy's)
        train_s += max(0, plan.steps - _steps_done(out, t, s, m)) * method_cost(c, m) + c["overhead"]
    seconds = {"builds": sum(per_toy[t]["build"] for t, _ in builds) * scale, "training": train_s,
               "evaluation": sum(per_toy[t]["eval"] for t, _, _ in todo)
               * plan.problems * plan.k / (200 * 16)}
    seconds["total"] = sum(seconds.values())
    return {"runs_total": len(runs(plan)), "runs_to_do": len(todo), "toy_builds_to_do": len(builds),
            "seconds": seconds, "costs": costs,
            "costs_by_toy": {t: c for t, c in per_toy.items() if t in LONG_TOYS}}


def run_metrics(out: str, toy_name: str, seed: int, method: str) -> list[dict]:
    """The rows of a run's metrics.jsonl ([] if it has none yet), read with the project's one
    reader (tools/plot_runs.read_metrics: a bad line raises naming file and line)."""
    path = os.path.join(run_dir(out, toy_name, seed, method), "metrics.jsonl")
    return read_metrics(path) if os.path.isfile(path) else []


def _steps_done(out: str, toy_name: str, seed: int, method: str) -> int:
    """Training steps already in a run's metrics.jsonl (0 if none)."""
    return len(run_metrics(out, toy_name, seed, method))


def format_budget(b: dict) -> str:
    s = b["seconds"]
    c = b["costs"]
    return (f"study plan: {b['runs_to_do']} of {b['runs_total']} runs to do, "
            f"{b['toy_builds_to_do']} toy builds.\nCPU budget (measured costs: build "
            f"{c['build']:.0f} s, run start-up {c['overhead']:.0f} s, step " + ", ".join(f"{m} {v:.2f} s" for m, v in c["step"].items())
            + f", evaluation {c['eval']:.0f} s per model at 200 x 16): builds {s['builds'] / 60:.0f} min, "
            f"training {s['training'] / 60:.0f} min, evaluation {s['evaluation'] / 60:.0f} min; "
            f"total {s['total'] / 3600:.2f} h on this machine"
            + "".join(f"\n  {t} uses its own costs: build {c['build']:.0f} s, run start-up "
                      f"{c['overhead']:.0f} s, step " + ", ".join(f"{m} {v:.2f} s" for m, v in c["step"].items())
                      + f", evaluation {c['eval']:.0f} s per model at 200 x 16"
                      for t, c in b.get("costs_by_toy", {}).items()))


def run_one(plan: Plan, out: str, toy_name: str, seed: int, method: str, verifier) -> dict:
    """Trains (or resumes, or reuses) and evaluates one run; writes and returns its record:
    {"toy", "seed", "method", "checkpoint", "n" [P], "c" [P], "summary", "train_seconds",
    "eval_seconds", "machine"}."""
    from transformers import AutoTokenizer

    from scope_jax import data, evaluation, toy, train
    from scope_jax.models import load_hf

    paths = toy.build_toy(toy_dir(out, toy_name, seed), settings=toy_settings(plan, toy_name, seed),
                          verbose=False)
    t0 = time.perf_counter()
    if method in UNTRAINED:
        checkpoint = paths[method]
    else:
        cfg = make_config(plan, out, toy_name, seed, method, paths)
        checkpoint = os.path.join(cfg.workdir, "export")
        if not os.path.isfile(os.path.join(checkpoint, "config.json")):
            train.train(cfg)  # resumes from the workdir's latest checkpoint if there is one
            if not os.path.isfile(os.path.join(checkpoint, "config.json")):
                raise RuntimeError(f"{cfg.workdir}: training stopped before the export "
                                   "(interrupted?); rerun the study to resume it")
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    examples = data.load_examples(paths["test"], toy.TOY_SPEC)[:plan.problems]
    res = evaluation.evaluate(
        load_hf(checkpoint), AutoTokenizer.from_pretrained(checkpoint), examples, evaluation.EvalSettings(
            k=plan.k, max_new_tokens=response_budget(plan, toy_name), seed=seed, instruction=toy.TOY_INSTRUCTION,
            keep_response_chars=0), verifier=verifier)
    n, c = res.counts()
    record = {"toy": toy_name, "seed": seed, "method": method, "checkpoint": checkpoint,
              "n": n.tolist(), "c": c.tolist(),
              "summary": {k: res.summary[k] for k in ("avg_at_k", "pass_at_k", "k", "num_problems")},
              "train_seconds": round(train_s, 1), "eval_seconds": round(time.perf_counter() - t1, 1),
              "steps": 0 if method in UNTRAINED else plan.steps, "machine": toy.machine_info()}
    path = record_path(out, toy_name, seed, method)
    evaluation.write_json(path + ".tmp", record)
    os.replace(path + ".tmp", path)  # the record appears whole or not at all
    return record


def load_records(plan: Plan, out: str) -> dict:
    """{(toy, seed, method): record} of the plan's completed runs."""
    recs = {}
    for r in runs(plan):
        path = record_path(out, *r)
        if os.path.isfile(path):
            with open(path) as f:
                recs[r] = json.load(f)
    return recs


def analyse(plan: Plan, records: dict, *, estimator: str = "unbiased",
            num_resamples: int = 2000) -> dict:
    """Per toy and method: pooled_summary over the seeds with a record, and pooled_difference
    against each baseline in BASELINES (seeds where both have a record).
    Returns {toy: {method: {"summary": ..., "vs": {baseline: diff}}}}."""
    from scope_jax import evaluation as ev

    counts = lambda r: (r["n"], r["c"])
    out = {}
    for t in plan.toys:
        out[t] = {}
        for m in plan.methods:
            seeds = [s for s in plan.seeds if (t, s, m) in records]
            if not seeds:
                continue
            entry = {"seeds": seeds, "summary": ev.pooled_summary(
                [counts(records[t, s, m]) for s in seeds], plan.k, estimator=estimator,
                num_resamples=num_resamples), "vs": {}}
            for b in BASELINES:
                both = [s for s in seeds if (t, s, b) in records]
                if b != m and both:
                    entry["vs"][b] = ev.pooled_difference(
                        [(counts(records[t, s, b]), counts(records[t, s, m])) for s in both],
                        plan.k, estimator=estimator, num_resamples=num_resamples)
            out[t][m] = entry
    return out


def format_table(analysis: dict, plan: Plan, estimator: str) -> str:
    """Markdown: one table per toy; cells in percent (points for differences), 95% intervals
    pooled over seeds (hierarchical bootstrap), and how many seeds the difference was > 0."""
    pct = lambda x: f"{100 * x:.1f}"
    sgn = lambda x: f"{100 * x:+.1f}"
    lines = []
    for t, methods in analysis.items():
        lines += [f"### {t} (seeds {', '.join(map(str, plan.seeds))}; {plan.steps} steps; "
                  f"Avg@{plan.k} / Pass@{plan.k} ({estimator} estimator), 95% hierarchical "
                  "bootstrap over seeds and problems)", "",
                  "| method | seeds | Avg@k | Pass@k | " + " | ".join(
                      f"Avg@k - {b} (seeds > 0)" for b in BASELINES) + " |",
                  "|---|---|---|---|" + "---|" * len(BASELINES)]
        for m, e in methods.items():
            s = e["summary"]
            cells = [f"{pct(s['avg_at_k'])} [{pct(s['avg_at_k_ci'][0])}, {pct(s['avg_at_k_ci'][1])}]",
                     f"{pct(s['pass_at_k'])} [{pct(s['pass_at_k_ci'][0])}, {pct(s['pass_at_k_ci'][1])}]"]
            for b in BASELINES:
                d = e["vs"].get(b)
                cells.append("-" if d is None else
                             f"{sgn(d['avg_at_k_diff'])} [{sgn(d['avg_at_k_diff_ci'][0])}, "
                             f"{sgn(d['avg_at_k_diff_ci'][1])}] ({d['seeds_better']}/{d['num_seeds']})")
            lines.append(f"| {m} | {len(e['seeds'])} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def prompt_weights(plan: Plan, out: str, toy_name: str, seed: int) -> dict:
    """SCOPE's weights on each evaluated test problem of (toy, seed) at the start of training:
    tools/premise.measure with no continuations, the untrained student's rollouts at the scope
    run's settings (rollouts per prompt, temperature, tau, response budget) on the first
    plan.problems test problems, cached in OUT/weights/<toy>_s<seed>.json. Returns the
    premise's weights["per_prompt"] ({"problem" [P], "correct" [P], "wrong_ess_over_n" [P],
    "correct_ess_over_n" [P]}, None where a path has < 2 rollouts)."""
    from scope_jax import evaluation, toy
    from tools import premise

    path = os.path.join(out, "weights", f"{toy_name}_s{seed}.json")
    if not os.path.isfile(path):
        directory = toy_dir(out, toy_name, seed)
        cfg = make_config(plan, out, toy_name, seed, "scope", toy.toy_paths(directory))
        evaluation.write_json(path, premise.measure(
            directory, problems=plan.problems, samples=cfg.num_samples, continuations=0,
            temperature=cfg.sampling.temperature, max_new_tokens=cfg.sampling.max_new_tokens,
            split="test", seed=seed, tau=cfg.scope.tau))
    with open(path) as f:
        return json.load(f)["weights"]["per_prompt"]


def per_prompt_analysis(plan: Plan, out: str, records: dict, *, num_resamples: int = 2000) -> dict:
    """Does SCOPE beat OPD N=8 more on prompts where its weights are far from uniform? Per toy,
    over the seeds with both records: each test problem's wrong-path ESS / n at the start of
    training (prompt_weights) splits a seed's problems into "far" (below that seed's median),
    "near" (at or above it) and "none" (< 2 wrong rollouts: no wrong-path weights). Per bin,
    pooled_difference of scope against opd_n on its problems; and "far - near", the gap of the
    two bins' Avg@k differences, with a hierarchical interval over seeds and problems (each
    seed's problems weighted by the inverse of their bin's size, so a seed's mean is its gap;
    bin sizes held fixed). Returns {toy: {"seeds", "far", "near", "none": {"problems",
    "mean_ess_over_n", "diff"}, "far_minus_near", "far_minus_near_ci"}}."""
    import numpy as np

    from scope_jax import evaluation as ev

    result = {}
    for t in plan.toys:
        seeds = [s for s in plan.seeds if (t, s, "scope") in records and (t, s, "opd_n") in records]
        if not seeds:
            continue
        bins = {"far": [], "near": [], "none": []}
        ess_by_bin = {b: [] for b in bins}
        gaps = []
        for s in seeds:
            base, other = records[t, s, "opd_n"], records[t, s, "scope"]
            w = prompt_weights(plan, out, t, s)
            if w["problem"] != list(range(len(base["n"]))):
                raise ValueError(f"{t}/s{s}: the weights cover test problems {w['problem'][:5]}..., "
                                 f"the records the first {len(base['n'])}; delete OUT/weights and rerun")
            ess = np.array([np.nan if x is None else x for x in w["wrong_ess_over_n"]])
            has = ~np.isnan(ess)
            far = has & (ess < np.median(ess[has])) if has.any() else has
            masks = {"far": far, "near": has & ~far, "none": ~has}
            d = np.asarray(other["c"]) / np.asarray(other["n"]) - np.asarray(base["c"]) / np.asarray(base["n"])
            for b, m in masks.items():
                idx = np.flatnonzero(m)
                bins[b].append(((np.asarray(base["n"])[idx], np.asarray(base["c"])[idx]),
                                (np.asarray(other["n"])[idx], np.asarray(other["c"])[idx])))
                ess_by_bin[b] += ess[idx].tolist()
            if far.any() and masks["near"].any():
                both = far | masks["near"]
                scale = np.where(far, both.sum() / far.sum(), -both.sum() / masks["near"].sum())
                gaps.append((d * scale)[both])
        entry = {"seeds": seeds}
        for b, pairs in bins.items():
            pairs = [p for p in pairs if len(p[0][0])]
            entry[b] = {"problems": int(sum(len(p[0][0]) for p in pairs)),
                        "mean_ess_over_n": (float(np.nanmean(ess_by_bin[b])) if b != "none" and pairs
                                            else None),
                        "diff": ev.pooled_difference(pairs, plan.k, num_resamples=num_resamples)
                        if pairs else None}
        entry["far_minus_near"] = float(np.mean([g.mean() for g in gaps])) if gaps else None
        entry["far_minus_near_ci"] = (list(ev.hierarchical_bootstrap_ci(gaps, num_resamples=num_resamples))
                                      if gaps else None)
        result[t] = entry
    return result


def format_per_prompt(result: dict, k: int) -> str:
    """Markdown: per toy, SCOPE - OPD N=8 Avg@k by the prompts' wrong-path ESS / n bin."""
    sgn = lambda x: f"{100 * x:+.1f}"
    lines = []
    for t, e in result.items():
        lines += [f"### {t}: scope - opd_n by the prompt's wrong-path ESS / n at step 0 (seeds "
                  f"{', '.join(map(str, e['seeds']))}; Avg@{k} points, 95% hierarchical bootstrap)", "",
                  "| prompts | problems | mean ESS / n | scope - opd_n (seeds > 0) |", "|---|---|---|---|"]
        labels = {"far": "far from uniform (ESS / n below the seed's median)",
                  "near": "near uniform (at or above the median)", "none": "< 2 wrong rollouts"}
        for b, label in labels.items():
            r, d = e[b], e[b]["diff"]
            cell = "-" if d is None else (f"{sgn(d['avg_at_k_diff'])} [{sgn(d['avg_at_k_diff_ci'][0])}, "
                                          f"{sgn(d['avg_at_k_diff_ci'][1])}] ({d['seeds_better']}/{d['num_seeds']})")
            ess = "-" if r["mean_ess_over_n"] is None else f"{r['mean_ess_over_n']:.2f}"
            lines.append(f"| {label} | {r['problems']} | {ess} | {cell} |")
        if e["far_minus_near"] is not None:
            lo, hi = e["far_minus_near_ci"]
            lines.append(f"| far - near | | | {sgn(e['far_minus_near'])} [{sgn(lo)}, {sgn(hi)}] |")
        lines.append("")
    return "\n".join(lines)


# What the weights did during training: per-step means the trainer logs (metrics.jsonl).
TRAINING_KEYS = ("accuracy", "wrong/ess", "wrong/teacher_ppl", "correct/ess", "response_length")
TRAINING_LAST = 10  # the steps a run's "last" value is the median of (table and summary share it)


def training_summary(plan: Plan, out: str, *, last: int = TRAINING_LAST) -> dict:
    """Per toy and trained method, each TRAINING_KEYS value at step 0 and the median of its
    last `last` logged steps, averaged over the seeds whose run logged them (a path's ESS is
    0 at a step where no prompt had >= 1 rollout on it, and such steps are left out).
    Returns {toy: {method: {"seeds": int, key: {"first": float, "last": float}}}}."""
    import numpy as np

    result = {}
    for t in plan.toys:
        for m in plan.methods:
            firsts, lasts = {k: [] for k in TRAINING_KEYS}, {k: [] for k in TRAINING_KEYS}
            seeds = 0
            for s in plan.seeds:
                rows = [] if m in UNTRAINED else run_metrics(out, t, s, m)
                if not rows:
                    continue
                seeds += 1
                for k in TRAINING_KEYS:
                    valid = lambda r: k in r and not (k.endswith("/ess") and r[k] == 0)
                    if valid(rows[0]):
                        firsts[k].append(rows[0][k])
                    v = [r[k] for r in rows if valid(r)]
                    if v:
                        lasts[k].append(float(np.median(v[-last:])))
            if seeds:
                mean = lambda xs: float(np.mean(xs)) if xs else None
                result.setdefault(t, {})[m] = {"seeds": seeds, **{
                    k: {"first": mean(firsts[k]), "last": mean(lasts[k])} for k in TRAINING_KEYS}}
    return result


def format_training(summary: dict, last: int = TRAINING_LAST) -> str:
    """Markdown: per toy, each trained method's TRAINING_KEYS at step 0 -> its last steps."""
    f = lambda x: "-" if x is None else (f"{x:.3g}" if abs(x) < 1e4 else f"{x:.2e}")
    lines = []
    for t, methods in summary.items():
        lines += [f"### {t}: during training (step 0 -> median of the last {last} steps; mean over seeds)",
                  "", "| method | seeds | " + " | ".join(TRAINING_KEYS) + " |",
                  "|---|---|" + "---|" * len(TRAINING_KEYS)]
        for m, e in methods.items():
            lines.append(f"| {m} | {e['seeds']} | " + " | ".join(
                f"{f(e[k]['first'])} -> {f(e[k]['last'])}" for k in TRAINING_KEYS) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_curves(plan: Plan, out: str) -> list[str]:
    """OUT/curves_<toy>.png: rollout accuracy (the verifier's fraction of correct rollouts) per
    training step, mean over seeds, smoothed over 10 steps, one line per trained method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    for t in plan.toys:
        fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
        drawn = 0
        for m in plan.methods:
            series = [[r["accuracy"] for r in run_metrics(out, t, s, m)] for s in plan.seeds]
            series = [x for x in series if x]
            if not series:
                continue
            n = min(len(x) for x in series)
            y = np.mean([x[:n] for x in series], axis=0)
            w = min(10, n)
            y = np.convolve(y, np.ones(w) / w, mode="valid")
            ax.plot(np.arange(len(y)) + w - 1, 100 * y, label=f"{m} ({len(series)} seeds)")
            drawn += 1
        if drawn:
            ax.set_xlabel("training step")
            ax.set_ylabel("rollout accuracy (%)")
            ax.set_title(f"{t}: rollout accuracy during training (mean over seeds)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = os.path.join(out, f"curves_{t}.png")
            fig.savefig(path)
            written.append(path)
        plt.close(fig)
    return written


# What archive keeps of a study: everything its analysis reads (completion records, SCOPE's
# per-prompt weights, each run's metrics, the builds' manifests) and its outputs, none of the
# models (a long_styles seed: 43 MB of checkpoints and builds, these files 430 KB).
ARCHIVED = ("plan.json", "results.json", "table.md", "eval/*/*/*.json", "weights/*.json",
            "runs/*/*/*/metrics.jsonl", "toys/*/manifest.json")


def archive(out: str, dest: str) -> list[str]:
    """Copies a study's records (ARCHIVED) from out to dest, same layout, and returns the
    copied paths relative to out. `--out dest` then re-analyses them with no training or
    evaluation (every record exists), and a study with more seeds there runs only the new
    ones (runs/ is not kept in git, so this is how a study's results outlive the machine)."""
    if os.path.realpath(dest) == os.path.realpath(out):
        raise ValueError(f"archive: {dest!r} is the study's own folder; name another")
    copied = []
    for pattern in ARCHIVED:
        for path in sorted(glob.glob(os.path.join(out, pattern))):
            rel = os.path.relpath(path, out)
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copyfile(path, os.path.join(dest, rel))
            copied.append(rel)
    return copied


def parse_list(text: str, allowed, what: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise SystemExit(f"--{what}: unknown {bad or 'empty list'}; choose from {list(allowed)}")
    return items


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/study")
    p.add_argument("--toys", default=None,
                   help=f"toy families, of {TOYS} (default toy,unsure; blindspot: the first "
                   "design, whose premise did not hold; see the README; long, long_styles: the "
                   "long-response toys of issue 22, docs/study_longtoy.md, ~10x the cost per "
                   "run: check --budget-only first)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=None, help="default: all of " + ",".join(METHODS + ABLATIONS))
    p.add_argument("--steps", type=int, default=100,
                   help="training steps per run (100: the whole default study took ~1.5 h on 2 "
                   "shared cores; see --budget-only)")
    p.add_argument("--problems", type=int, default=200, help="test problems per seed")
    p.add_argument("--k", type=int, default=16, help="samples per problem")
    p.add_argument("--pass_at_k_estimator", choices=("unbiased", "paper"), default="unbiased")
    p.add_argument("--budget-only", action="store_true", help="print the plan and budget, run nothing")
    p.add_argument("--max-runs", type=int, default=None,
                   help="stop after this many runs (the rest stays for a later invocation)")
    p.add_argument("--archive", default=None, metavar="DEST",
                   help="at the end, copy the study's records (not its models) to DEST, e.g. "
                   "docs/study_long; see archive()")
    p.add_argument("--quick", action="store_true",
                   help="tiny toy builds, 2 steps, 8 problems x 4 samples, seed 0; default toy "
                   "unsure, methods student and scope (a smoke test)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax", "orbax", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.quick:
        plan = Plan(toys=parse_list(args.toys or "unsure", TOYS, "toys"), seeds=(0,),
                    methods=parse_list(args.methods or "student,scope", METHODS + ABLATIONS, "methods"),
                    steps=2, problems=8, k=4, max_new_tokens=16, scale="tiny",
                    prompts_per_step=4, num_samples=2)
    else:
        if args.steps < 1 or args.problems < 1 or args.k < 1:
            raise SystemExit("--steps, --problems and --k must be >= 1")
        plan = Plan(toys=parse_list(args.toys or "toy,unsure", TOYS, "toys"),
                    seeds=tuple(int(s) for s in args.seeds.split(",")),
                    methods=parse_list(args.methods or ",".join(METHODS + ABLATIONS), METHODS + ABLATIONS,
                                       "methods"),
                    steps=args.steps, problems=args.problems, k=args.k)
    out = os.path.abspath(args.out)
    from scope_jax import evaluation, toy
    from scope_jax.verifiers import Verifier

    machine = toy.machine_info()
    print(f"machine: {toy.format_machine(machine)}")
    b = budget(plan, out, measured_costs(out))
    print(format_budget(b), flush=True)
    if args.budget_only:
        return 0
    os.makedirs(out, exist_ok=True)
    evaluation.write_json(os.path.join(out, "plan.json"), dataclasses.asdict(plan))
    done_now = 0
    with Verifier(num_workers=2) as verifier:
        for r in runs(plan):
            if os.path.isfile(record_path(out, *r)):
                logging.info("%s/s%d/%s: done (record exists), skipping", r[0], r[1], r[2])
                continue
            if args.max_runs is not None and done_now >= args.max_runs:
                logging.info("stopping after %d runs (--max-runs); rerun to continue", done_now)
                break
            rec = run_one(plan, out, *r, verifier)
            done_now += 1
            logging.info("%s/s%d/%s: Avg@%d %.3f Pass@%d %.3f (train %.0f s, eval %.0f s)", *r,
                         plan.k, rec["summary"]["avg_at_k"], plan.k, rec["summary"]["pass_at_k"],
                         rec["train_seconds"], rec["eval_seconds"])
    records = load_records(plan, out)
    analysis = analyse(plan, records, estimator=args.pass_at_k_estimator)
    table = format_table(analysis, plan, args.pass_at_k_estimator)
    per_prompt = per_prompt_analysis(plan, out, records)  # needs scope and opd_n records
    if per_prompt:
        table += "\n" + format_per_prompt(per_prompt, plan.k)
    training = training_summary(plan, out)
    table += "\n" + format_training(training)
    curves = plot_curves(plan, out)
    complete = len(records) == len(runs(plan))
    evaluation.write_json(os.path.join(out, "results.json"), {
        "plan": dataclasses.asdict(plan), "complete": complete, "runs_done": len(records),
        "machine": machine, "pass_at_k_estimator": args.pass_at_k_estimator,
        "analysis": analysis, "per_prompt": per_prompt, "training": training, "curves": curves})
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"{len(records)} of {len(runs(plan))} runs done{'' if complete else ' (incomplete: rerun to continue)'}; "
          f"{os.path.join(out, 'results.json')}, {os.path.join(out, 'table.md')}, curves: {curves}")
    if args.archive:
        print(f"archived {len(archive(out, args.archive))} files to {args.archive}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
