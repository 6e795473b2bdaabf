"""Does a toy satisfy SCOPE's premise? The paper's error-recovery experiment (section 7 of arXiv:2604.10688),
run on a toy build, before any method is compared on it.

    python -m tools.premise --toy-dir runs/toy --out runs/premise/toy
    python -m tools.premise --toy-dir runs/toy_blindspot --out runs/premise/toy_blindspot

1. The student samples `--samples` rollouts for each of the first `--problems` training problems
   at its RL rollout settings (configs/toy.py: temperature 0.6, no top-k / top-p); the verifier
   labels them. Reported: accuracy, and the fraction of *mixed* prompts (some rollouts right,
   some wrong: the only prompts on which SCOPE's two paths both act).
2. Each wrong rollout is scored by the teacher: PPL_T = exp(-mean token log-prob) at temperature
   1, the quantity SCOPE's teacher weight uses (scope_jax.scoring.response_logprobs, the trainer's
   own scoring), and the wrong rollouts are split into quartiles of PPL_T.
3. The teacher continues each wrong rollout from 20/40/60/80% of its tokens (`--continuations`
   samples each at the rollout settings); a continuation recovers if prefix + continuation is
   verified correct. Reported: the recovery rate per quartile and cut, with 95% bootstrap
   intervals over rollouts (scope_jax.evaluation.bootstrap_ci), next to the paper's row
   (64.9 -> 45.4% at 20%, 35.8 -> 28.6% at 80% from the lowest to the highest PPL quartile),
   and split by whether the problem holds a product (the blind spot of the "blindspot" toy).

4. SCOPE's weights at the RL settings (issue 22): per prompt, the within-group spread (std) of
   log PPL, the student's on the correct rollouts (at the rollout temperature, as the trainer's
   pi_old) and the teacher's on the wrong ones, and the effective sample size
   ESS = 1 / sum w^2 of scope_jax.losses.scope_weights (tau = `--tau`) on each path, over the
   prompts with >= 2 rollouts on it, with 95% bootstrap intervals over prompts. ESS equal to
   the path's rollout count means uniform weights (SCOPE = OPD on that path).

    python -m tools.premise --toy-dir runs/toy_long --out runs/premise/toy_long --problems 128 --continuations 2

(--max-new-tokens defaults to the build's own budget, manifest.json.)

Writes {out}/premise.json (all numbers, settings, machine) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import numpy as np

FRACTIONS = (0.2, 0.4, 0.6, 0.8)
# The paper's section 7 (arXiv:2604.10688): recovery (%) of the lowest / highest teacher-PPL quartile (middle ones not
# given) and the quartile mean PPLs.
PAPER_RECOVERY = {0.2: (64.9, 45.4), 0.8: (35.8, 28.6)}
PAPER_QUARTILE_PPL = (1.361, 1.565, 1.710, 2.383)


def quartiles(values: np.ndarray) -> np.ndarray:
    """Quartile index 0..3 of each value (0: lowest), by rank, so ties and small samples still
    give four buckets of (nearly) equal size. values: float [W]. Returns int [W]."""
    order = np.argsort(values, kind="stable")
    q = np.empty(len(values), np.int64)
    q[order] = (np.arange(len(values)) * 4) // max(1, len(values))
    return q


def cut_point(length: int, fraction: float) -> int:
    """Tokens of a wrong response (EOS excluded, length of them) kept as the teacher's prefix at
    `fraction` of its length: floor(fraction * length), at least 1 and at most length - 1."""
    return int(min(max(1, int(fraction * length)), max(1, length - 1)))


def recovery_table(ppl: np.ndarray, recovered: np.ndarray, *, groups: np.ndarray | None = None,
                   seed: int = 0) -> list[dict]:
    """Recovery rate by teacher-PPL quartile and cut.

    ppl: float [W] teacher PPL of each wrong rollout; recovered: float [W, F] fraction of the
    teacher's continuations from each cut (FRACTIONS) that were correct; groups: bool [W] or None
    (a subset flag; rows are then also reported for it). Returns one dict per quartile:
    {"quartile" 1..4, "n", "mean_ppl", "recovery" [F], "recovery_ci" [F][2]} (fractions).
    """
    from scope_jax.evaluation import bootstrap_ci

    q = quartiles(ppl)
    rows = []
    for b in range(4):
        sel = q == b
        if groups is not None:
            sel &= groups
        if not sel.any():
            rows.append({"quartile": b + 1, "n": 0, "mean_ppl": None, "recovery": None,
                         "recovery_ci": None})
            continue
        r = recovered[sel]
        rows.append({"quartile": b + 1, "n": int(sel.sum()), "mean_ppl": float(ppl[sel].mean()),
                     "recovery": r.mean(0).tolist(),
                     "recovery_ci": [list(bootstrap_ci(r[:, f], seed=seed + f))
                                     for f in range(r.shape[1])]})
    return rows


def group_spread(values: np.ndarray, groups: np.ndarray, select: np.ndarray) -> np.ndarray:
    """Within-group spread: for each group with >= 2 selected rows, the population standard
    deviation (ddof 0) of `values` over its selected rows.

    values: float [R] (e.g. log PPL per rollout); groups: int [R] prompt of each row; select:
    bool [R] (e.g. the correct rollouts). Returns float [G'] in order of first appearance of
    the groups that qualify."""
    out = []
    for g in dict.fromkeys(groups.tolist()):
        v = values[(groups == g) & select]
        if len(v) >= 2:
            out.append(float(v.std()))
    return np.asarray(out, np.float64)


def group_ess(weights: np.ndarray, groups: np.ndarray, select: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """Effective sample size of one path's weights in each group with >= 2 selected rows:
    ESS = (sum w)^2 / sum w^2 over the group's selected rows (1 / sum w^2 once they sum to 1;
    n for uniform weights, 1 for all weight on one rollout).

    weights: float [R] (scope_jax.losses.scope_weights' w_stu or w_tea); groups: int [R];
    select: bool [R] (the path's rows). Returns (ess float [G'], n int [G']), groups in order
    of first appearance."""
    ess, n = [], []
    for g in dict.fromkeys(groups.tolist()):
        w = weights[(groups == g) & select].astype(np.float64)
        if len(w) >= 2:
            ess.append(float(w.sum() ** 2 / np.sum(w ** 2)))
            n.append(len(w))
    return np.asarray(ess, np.float64), np.asarray(n, np.int64)


def prompt_ess_ratio(weights: np.ndarray, groups: np.ndarray, select: np.ndarray,
                     num_groups: int) -> np.ndarray:
    """ESS / n of one path's weights for each prompt 0..num_groups-1 (group_ess), NaN where the
    prompt has fewer than 2 rollouts on the path. Arguments as group_ess'. Returns float [G]."""
    out = np.full(num_groups, np.nan)
    for g in range(num_groups):
        rows = groups == g
        ess, n = group_ess(weights[rows], groups[rows], select[rows])
        if len(ess):
            out[g] = ess[0] / n[0]
    return out


def weight_summary(log_ppl: np.ndarray, weights: np.ndarray, groups: np.ndarray,
                   select: np.ndarray, *, seed: int = 0) -> dict:
    """One path's premise numbers over the groups with >= 2 rollouts on the path: the mean
    within-group std of log PPL, the mean ESS, the mean rollout count and the mean ESS / n,
    each with a 95% bootstrap interval over groups (scope_jax.evaluation.bootstrap_ci).
    Returns a JSON-ready dict (None entries when no group qualifies)."""
    from scope_jax.evaluation import bootstrap_ci

    spread = group_spread(log_ppl, groups, select)
    ess, n = group_ess(weights, groups, select)
    if not len(ess):
        return {"groups": 0, "log_ppl_std": None, "log_ppl_std_ci": None, "ess": None,
                "ess_ci": None, "n": None, "ess_over_n": None, "ess_over_n_ci": None}
    ratio = ess / n
    return {"groups": int(len(ess)),
            "log_ppl_std": float(spread.mean()), "log_ppl_std_ci": list(bootstrap_ci(spread, seed=seed)),
            "ess": float(ess.mean()), "ess_ci": list(bootstrap_ci(ess, seed=seed + 1)),
            "n": float(n.mean()),
            "ess_over_n": float(ratio.mean()), "ess_over_n_ci": list(bootstrap_ci(ratio, seed=seed + 2))}


def _nan_to_none(values: np.ndarray) -> list:
    return [None if np.isnan(v) else float(v) for v in values]


def _generate_chunked(engine, prompts, *, chunk: int, key, num_samples: int):
    """engine.generate over fixed-size chunks of prompts (the last one topped up with copies,
    so every call has one shape); returns the response id lists, in order."""
    import jax

    from scope_jax.sampling import response_lists

    out = []
    for i, start in enumerate(range(0, len(prompts), chunk)):
        part = list(prompts[start:start + chunk])
        real = len(part)
        if len(prompts) > chunk:
            part += [part[-1]] * (chunk - real)
        res = engine.generate(part, num_samples=num_samples, key=jax.random.fold_in(key, i))
        out += response_lists(res)[:real * num_samples]
    return out


def measure(toy_dir: str, *, problems: int = 200, samples: int = 8, continuations: int = 4,
            temperature: float = 0.6, max_new_tokens: int | None = 48, split: str = "train",
            seed: int = 0, chunk: int = 256, tau: float = 1.0) -> dict:
    """Runs steps 1-3 of the module docstring on the build in toy_dir. Returns the JSON-ready
    result: settings, student accuracy, mixed / all-right / all-wrong prompt fractions, the
    recovery table (recovery_table) for all wrong rollouts and by product / no product, and the
    Spearman correlation of PPL_T with 20%-cut recovery; and step 4 (weights): per path
    (weight_summary), the within-group spread of log PPL (student on correct rollouts, teacher
    on wrong ones) and the ESS of SCOPE's weights (scope_jax.losses.scope_weights at `tau`,
    student log-probs at the rollout temperature as the trainer's pi_old, teacher's at 1).
    max_new_tokens None: the build's own (manifest.json)."""
    import jax
    from flax import nnx
    from transformers import AutoTokenizer

    from scope_jax import data, rollout, toy
    from scope_jax.evaluation import bootstrap_ci
    from scope_jax.losses import scope_weights
    from scope_jax.models import load_hf
    from scope_jax.sampling import full_sequences, response_lists
    from scope_jax.scoring import response_logprobs
    from scope_jax.verifiers import InlineVerifier

    paths = toy.toy_paths(toy_dir)
    if not os.path.isfile(paths["manifest"]):
        raise SystemExit(f"--toy-dir {toy_dir}: no manifest.json (build it with tools/make_toy.py)")
    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    student, teacher = load_hf(paths["student"]), load_hf(paths["teacher"])
    if max_new_tokens is None:
        with open(paths["manifest"]) as f:
            max_new_tokens = int(json.load(f)["max_new_tokens"])
    examples = data.load_examples(paths[split], toy.TOY_SPEC)[:problems]
    prompts, kept = data.encode_prompts(examples, tok, max_prompt_len=10_000,
                                        instruction=toy.TOY_INSTRUCTION)
    # The rollout settings (stop ids by sampling.stop_ids, pad id the tokenizer's) for both models.
    settings = rollout.settings_for(student.config, tok, max_new_tokens=max_new_tokens, temperature=temperature)
    verifier = InlineVerifier()
    key = jax.random.key(seed)
    t0 = time.perf_counter()

    # 1. Student rollouts at the RL settings, verified.
    done = rollout.generate_and_verify(rollout.make_engine("static", student, settings), prompts,
                                       [examples[j].answer for j in kept], verifier, tok,
                                       num_samples=samples, key=jax.random.fold_in(key, 0))
    out, responses = done.out, response_lists(done.out)
    correct = np.array([r.reward > 0 for r in done.results()])
    per_prompt = correct.reshape(len(kept), samples).sum(1)
    rollout_seconds = time.perf_counter() - t0  # step 1 alone: what one RL step's sampling costs

    # 2. Teacher PPL of every rollout (the trainer's scoring), then keep the wrong ones.
    ids, mask = full_sequences(out)
    m = out.tokens.shape[1]
    t_graph, t_state = nnx.split(teacher)
    score = jax.jit(lambda st, i, a: response_logprobs(nnx.merge(t_graph, st), i, a, m))
    lp = np.asarray(score(t_state, ids, mask))
    rmask = np.asarray(out.response_mask)
    ppl_all = np.exp(-(lp * rmask).sum(1) / np.maximum(rmask.sum(1), 1))
    # The student's log-probs at the rollout temperature: the trainer's pi_old for w_stu.
    s_graph, s_state = nnx.split(student)
    s_score = jax.jit(lambda st, i, a: response_logprobs(nnx.merge(s_graph, st), i, a, m,
                                                         temperature=temperature))
    s_lp = np.asarray(s_score(s_state, ids, mask))
    groups = np.repeat(np.arange(len(kept)), samples)
    w_stu, w_tea = (np.asarray(w) for w in scope_weights(
        s_lp, lp, rmask, correct, groups, tau))
    log_ppl_s = -(s_lp * rmask).sum(1) / np.maximum(rmask.sum(1), 1)
    weights = {"tau": tau,
               "correct_path_student": weight_summary(log_ppl_s, w_stu, groups, correct, seed=seed),
               "wrong_path_teacher": weight_summary(np.log(ppl_all), w_tea, groups, ~correct,
                                                    seed=seed),
               "response_tokens": {"mean": float(rmask.sum(1).mean()),
                                   "min": int(rmask.sum(1).min()), "max": int(rmask.sum(1).max())},
               # per prompt, in the split's order (problem: its index in the split's examples)
               "per_prompt": {"problem": [int(j) for j in kept], "correct": per_prompt.tolist(),
                              "wrong_ess_over_n": _nan_to_none(prompt_ess_ratio(
                                  w_tea, groups, ~correct, len(kept))),
                              "correct_ess_over_n": _nan_to_none(prompt_ess_ratio(
                                  w_stu, groups, correct, len(kept)))}}
    run_settings = {"problems": len(kept), "split": split, "samples": samples,
                    "continuations": continuations, "temperature": temperature,
                    "top_k": None, "top_p": None, "max_new_tokens": max_new_tokens,
                    "seed": seed, "fractions": list(FRACTIONS) if continuations else []}
    if not continuations:  # weights only (tools/study.py's per-prompt analysis)
        return {"toy_dir": paths["dir"], "settings": run_settings,
                "student_accuracy": float(correct.mean()), "weights": weights,
                "seconds": round(time.perf_counter() - t0, 1), "machine": toy.machine_info()}
    wrong = np.flatnonzero(~correct)
    ppl = ppl_all[wrong]
    has_product = np.array(["*" in examples[kept[i // samples]].problem for i in wrong])

    # 3. Teacher continuations from each cut of each wrong rollout.
    prefixes, owners = [], []
    for w, row in enumerate(wrong):
        resp = [t for t in responses[row] if t not in settings.stop_ids]
        prompt = prompts[row // samples]
        for f, frac in enumerate(FRACTIONS):
            cut = cut_point(len(resp), frac)
            prefixes.append((prompt + resp[:cut], resp[:cut]))
            owners.append((w, f))
    conts = _generate_chunked(rollout.make_engine("static", teacher, settings), [p for p, _ in prefixes],
                              chunk=chunk, key=jax.random.fold_in(key, 1), num_samples=continuations)
    recovered = np.zeros((len(wrong), len(FRACTIONS)))
    # a continuation is verified with its prefix: the answer may sit in either part
    cont_texts = tok.batch_decode([prefixes[i // continuations][1] + c
                                   for i, c in enumerate(conts)], skip_special_tokens=True)
    golds = [examples[kept[wrong[owners[i // continuations][0]] // samples]].answer for i in range(len(conts))]
    for i, r in enumerate(verifier.verify_batch(cont_texts, golds)):
        w, f = owners[i // continuations]
        recovered[w, f] += (r.reward > 0) / continuations

    def spearman(x, y):  # ties (recovery is a multiple of 1/continuations) get average ranks
        from scipy.stats import spearmanr

        return float(spearmanr(x, y).statistic) if len(x) > 2 and np.std(y) > 0 else None

    with open(paths["manifest"]) as f:
        manifest = json.load(f)
    return {
        "toy_dir": paths["dir"], "toy_settings": manifest["settings"],
        "toy_accuracy": manifest["accuracy"],
        "settings": run_settings,
        "student_accuracy": float(correct.mean()),
        "mixed_prompts": float(np.mean((per_prompt > 0) & (per_prompt < samples))),
        "all_correct_prompts": float(np.mean(per_prompt == samples)),
        "all_wrong_prompts": float(np.mean(per_prompt == 0)),
        "wrong_rollouts": int(len(wrong)),
        "recovery_by_quartile": recovery_table(ppl, recovered, seed=seed),
        "recovery_by_quartile_with_product": recovery_table(ppl, recovered, groups=has_product,
                                                            seed=seed),
        "recovery_by_quartile_without_product": recovery_table(ppl, recovered,
                                                               groups=~has_product, seed=seed),
        "recovery_with_product": recovered[has_product].mean(0).tolist() if has_product.any() else None,
        "recovery_without_product": recovered[~has_product].mean(0).tolist() if (~has_product).any() else None,
        "spearman_ppl_vs_recovery_at_20": spearman(ppl, recovered[:, 0]),
        "recovery_all": {"recovery": recovered.mean(0).tolist() if len(wrong) else None,
                         "recovery_ci": [list(bootstrap_ci(recovered[:, f], seed=seed + f))
                                         for f in range(len(FRACTIONS))] if len(wrong) else None},
        "weights": weights,
        "seconds": round(time.perf_counter() - t0, 1),
        "rollout_seconds": round(rollout_seconds, 1),
        "machine": toy.machine_info(),
    }


def format_result(res: dict) -> str:
    """Markdown tables: the recovery rates by quartile next to the paper's, and the prompt mix."""
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}"
    lines = [f"toy {res['toy_dir']}: student accuracy {pct(res['student_accuracy'])}% over "
             f"{res['settings']['problems']} x {res['settings']['samples']} rollouts "
             f"(T={res['settings']['temperature']}); mixed prompts {pct(res['mixed_prompts'])}%, "
             f"all right {pct(res['all_correct_prompts'])}%, all wrong "
             f"{pct(res['all_wrong_prompts'])}%; {res['wrong_rollouts']} wrong rollouts",
             "",
             "| PPL_T quartile | n | mean PPL_T | " + " | ".join(
                 f"recovery from {int(100 * f)}% [95% CI]" for f in FRACTIONS) + " |",
             "|---|---|---|" + "---|" * len(FRACTIONS)]
    for key, label in (("recovery_by_quartile", ""),
                       ("recovery_by_quartile_with_product", " (with *)"),
                       ("recovery_by_quartile_without_product", " (no *)")):
        for r in res[key]:
            if not r["n"]:
                lines.append(f"| Q{r['quartile']}{label} | 0 | - |" + " - |" * len(FRACTIONS))
                continue
            cells = [f"{pct(v)} [{pct(lo)}, {pct(hi)}]"
                     for v, (lo, hi) in zip(r["recovery"], r["recovery_ci"])]
            lines.append(f"| Q{r['quartile']}{label} | {r['n']} | {r['mean_ppl']:.3f} | "
                         + " | ".join(cells) + " |")
    paper = [f"{PAPER_RECOVERY[f][0]} -> {PAPER_RECOVERY[f][1]}" if f in PAPER_RECOVERY else "n/a"
             for f in FRACTIONS]
    lines.append("| paper (Q1 -> Q4) | 2,000 x 4 | " + " / ".join(map(str, PAPER_QUARTILE_PPL))
                 + " | " + " | ".join(paper) + " |")
    if res.get("recovery_all", {}).get("recovery") is not None:
        ra = res["recovery_all"]
        lines.append("| all wrong rollouts | " + str(res["wrong_rollouts"]) + " | - | " + " | ".join(
            f"{pct(v)} [{pct(lo)}, {pct(hi)}]" for v, (lo, hi) in zip(ra["recovery"], ra["recovery_ci"]))
            + " |")
    if "weights" in res:
        lines.append(format_weights(res["weights"]))
    lines.append(f"\nSpearman(PPL_T, recovery from 20%) = {res['spearman_ppl_vs_recovery_at_20']}; "
                 f"recovery with a product {[pct(x) for x in res['recovery_with_product'] or []]}, "
                 f"without {[pct(x) for x in res['recovery_without_product'] or []]}")
    return "\n".join(lines)


def format_weights(w: dict) -> str:
    """Markdown table of the weight summaries (weight_summary) of both paths."""
    f = lambda x, ci, d=3: "-" if x is None else f"{x:.{d}f} [{ci[0]:.{d}f}, {ci[1]:.{d}f}]"
    rt = w["response_tokens"]
    lines = [f"\nSCOPE's weights at tau = {w['tau']} (groups with >= 2 rollouts on the path; 95% "
             f"bootstrap over groups; response tokens mean {rt['mean']:.0f}, min {rt['min']}, "
             f"max {rt['max']})", "",
             "| path | groups | within-group std of log PPL | ESS | rollouts n | ESS / n |",
             "|---|---|---|---|---|---|"]
    for key, label in (("correct_path_student", "correct (student PPL)"),
                       ("wrong_path_teacher", "wrong (teacher PPL)")):
        r = w[key]
        n = "-" if r["n"] is None else f"{r['n']:.2f}"
        lines.append(f"| {label} | {r['groups']} | {f(r['log_ppl_std'], r['log_ppl_std_ci'])} | "
                     f"{f(r['ess'], r['ess_ci'], 2)} | {n} | {f(r['ess_over_n'], r['ess_over_n_ci'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy-dir", required=True, help="a toy build (tools/make_toy.py)")
    p.add_argument("--out", required=True, help="writes OUT/premise.json")
    p.add_argument("--problems", type=int, default=200)
    p.add_argument("--samples", type=int, default=8, help="student rollouts per problem (RL: 8)")
    p.add_argument("--continuations", type=int, default=4,
                   help="teacher samples per cut (0: skip step 3, measure the weights only)")
    p.add_argument("--temperature", type=float, default=0.6, help="rollout temperature (RL: 0.6)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="response budget (default: the build's max_new_tokens, manifest.json)")
    p.add_argument("--tau", type=float, default=1.0, help="SCOPE's weight temperature (RL: 1.0)")
    p.add_argument("--split", choices=("train", "test"), default="train")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.problems, args.samples) < 1 or args.continuations < 0:
        p.error("--problems and --samples must be >= 1, --continuations >= 0")
    logging.basicConfig(level=logging.WARNING)
    res = measure(args.toy_dir, problems=args.problems, samples=args.samples,
                  continuations=args.continuations, temperature=args.temperature,
                  max_new_tokens=args.max_new_tokens, split=args.split, seed=args.seed,
                  tau=args.tau)
    from scope_jax.evaluation import write_json

    path = write_json(os.path.join(args.out, "premise.json"), res)
    print(format_result(res) if args.continuations else format_weights(res["weights"]))
    print(f"\n{path} ({res['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
