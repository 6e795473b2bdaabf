"""The CPU demo: SCOPE, OPD and GRPO from the same toy student, for the same budget, evaluated.

    make demo                      # = python -m tools.demo (after creating .venv)
    python -m tools.demo --steps 30 --k 16 --out runs/demo

1. Builds (or reuses) the toy task, tokenizer, teacher and student under runs/toy
   (scope_jax.toy.build_toy).
2. Trains GRPO, OPD and SCOPE from the same student with configs/toy.py, the same number of
   steps, prompts per step and rollouts per prompt (OPD uses the same N rollouts as SCOPE here:
   the `opd_n` variant, so every method sees the same samples budget).
3. Evaluates the untrained student, the three trained students and the teacher on the toy test
   split with scope_jax.evaluation (k samples per problem at the paper's evaluation settings:
   temperature 0.6, top-p 0.95, top-k 20) and prints one table; writes
   {out}/results.json (keys student, grpo, opd, scope, teacher, each with avg_at_k, pass_at_k,
   k and their 95% bootstrap intervals; "comparisons": paired differences such as scope-student
   with intervals from resampling the same problems for both models; "machine": CPU model,
   core count, platform, jax / jaxlib versions and XLA_FLAGS) and {out}/pass_at_k.png.

The numbers are one machine's: the toy build is bitwise reproducible on one machine, not across
machines (a student trained with the same settings on another CPU scores differently), so the
machine is printed and recorded with them. Seed-pooled comparisons: tools/study.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

METHODS = ("grpo", "opd", "scope")


def _train(method: str, paths: dict, args) -> str:
    """Trains one method (or reuses a finished run) and returns its exported checkpoint."""
    from configs import toy as toy_config
    from scope_jax import train

    cfg = toy_config.get_config("opd_n" if method == "opd" else method)
    cfg.toy_dir = ""  # built above
    cfg.student, cfg.teacher, cfg.data.train_files = paths["student"], paths["teacher"], paths["train"]
    cfg.workdir = os.path.join(args.out, method)
    cfg.num_steps = args.steps
    cfg.seed = args.seed
    export = os.path.join(cfg.workdir, "export")
    if os.path.exists(os.path.join(export, "config.json")) and not args.retrain:
        logging.info("%s: reusing %s", method, export)
        return export
    t0 = time.perf_counter()
    last = train.train(cfg)
    logging.info("%s: %d steps in %.0f s, last loss %.4f, last accuracy %.3f", method, args.steps,
                 time.perf_counter() - t0, last.get("loss", float("nan")), last.get("accuracy", float("nan")))
    return export


def _exact_solution_rate(records: list[dict], solutions: list[str]) -> float:
    """Fraction of all samples that are the gold worked solution, character for character.

    The verifier only checks the final \\boxed{} answer, and on this toy a wrong step can land on
    the right answer ("4+1=4. 4-3=2." for 4+1-3 = 2); this rate counts only the samples that
    are right for the right reasons.
    """
    hits = sum(r.strip() == solutions[rec["index"]] for rec in records for r in rec["responses"])
    return hits / sum(rec["n"] for rec in records)


def _evaluate(models: dict[str, str], test_file: str, args) -> tuple[dict, dict, str, dict]:
    """Evaluates every model on the first args.problems of test_file.

    Returns (results: name -> JSON-ready metrics, summaries: name -> evaluation summary,
    plot path, counts: name -> (n [P], c [P]) for paired comparisons).
    """
    from scope_jax import data, evaluation, toy
    from scope_jax.models import load_hf
    from scope_jax.verifiers import Verifier
    from transformers import AutoTokenizer

    examples = data.load_examples(test_file, toy.TOY_SPEC)[: args.problems]
    solutions = [e.meta["solution"] for e in examples]
    results, summaries, curves, counts = {}, {}, {}, {}
    with Verifier(num_workers=2) as verifier:
        for name, path in models.items():
            t0 = time.perf_counter()
            res = evaluation.evaluate(
                load_hf(path), AutoTokenizer.from_pretrained(path), examples, evaluation.EvalSettings(
                    k=args.k, temperature=args.temperature, top_p=0.95, top_k=20,
                    max_new_tokens=args.max_new_tokens, seed=args.seed, instruction=toy.TOY_INSTRUCTION,
                    num_resamples=1000), verifier=verifier)
            data.write_jsonl(os.path.join(args.out, "eval", f"{name}.jsonl"), res.records)
            s = res.summary
            results[name] = {key: s[key] for key in ("avg_at_k", "pass_at_k", "k", "avg_at_k_ci", "pass_at_k_ci",
                                                     "num_problems")}
            results[name]["exact_solution_rate"] = _exact_solution_rate(res.records, solutions)
            results[name]["checkpoint"] = path
            curves[name] = s["pass_curve"]
            counts[name] = res.counts()
            logging.info("eval %s: Avg@%d %.3f Pass@%d %.3f (%.0f s)", name, args.k, s["avg_at_k"], args.k,
                         s["pass_at_k"], time.perf_counter() - t0)
            summaries[name] = s
    plot = evaluation.plot_pass_curves(curves, os.path.join(args.out, "pass_at_k.png"),
                                       title=f"toy task, {len(examples)} problems, T={args.temperature}")
    return results, summaries, plot, counts


# Paired comparisons printed and saved: (model, baseline).
PAIRS = (("grpo", "student"), ("opd", "student"), ("scope", "student"), ("scope", "opd"), ("scope", "grpo"))


def _compare(counts: dict, k: int) -> dict:
    """Paired bootstrap differences (same problems, resampled jointly) for PAIRS."""
    from scope_jax import evaluation

    return {f"{a}-{b}": evaluation.paired_difference(counts[b], counts[a], k) for a, b in PAIRS}


def _format_comparisons(comparisons: dict) -> str:
    pct = lambda x: f"{100 * x:+.1f}"
    lines = ["paired differences (same problems; 95% bootstrap intervals, in points; Pass@k by the "
             "unbiased estimator):"]
    for name, d in comparisons.items():
        (alo, ahi), (plo, phi) = d["avg_at_k_diff_ci"], d["pass_at_k_diff_ci"]
        lines.append(f"  {name:<14} Avg@{d['k']} {pct(d['avg_at_k_diff'])} [{pct(alo)}, {pct(ahi)}]   "
                     f"Pass@{d['k']} {pct(d['pass_at_k_diff'])} [{pct(plo)}, {pct(phi)}]   "
                     f"problems better / worse: {d['wins']} / {d['losses']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--toy-dir", default="runs/toy")
    p.add_argument("--steps", type=int, default=200, help="training steps per method")
    p.add_argument("--k", type=int, default=16, help="samples per problem in the evaluation")
    p.add_argument("--problems", type=int, default=200, help="test problems to evaluate")
    p.add_argument("--temperature", type=float, default=0.6, help="evaluation sampling temperature (paper: 0.6)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrain", action="store_true", help="train again even if runs exist")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax", "orbax", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from scope_jax import evaluation, toy

    t0 = time.perf_counter()
    machine = toy.machine_info()
    print(f"machine: {toy.format_machine(machine)}", flush=True)
    paths = toy.build_toy(args.toy_dir)
    models = {"student": paths["student"]}
    for method in METHODS:
        models[method] = _train(method, paths, args)
    models["teacher"] = paths["teacher"]
    results, summaries, plot, counts = _evaluate(models, paths["test"], args)
    comparisons = _compare(counts, args.k)
    table = evaluation.format_table({name: {"toy test": s} for name, s in summaries.items()})
    out = {"settings": {"steps": args.steps, "k": args.k, "problems": args.problems, "temperature": args.temperature,
                        "seed": args.seed, "seconds": round(time.perf_counter() - t0, 1)},
           "machine": machine, "plot": plot, **results, "comparisons": comparisons}
    evaluation.write_json(os.path.join(args.out, "results.json"), out)
    print(table)
    print(_format_comparisons(comparisons))
    print("samples that are the gold worked solution (right answer for the right reasons): " +
          ", ".join(f"{name} {100 * r['exact_solution_rate']:.1f}%" for name, r in results.items()))
    print(f"machine: {toy.format_machine(machine)} (these numbers are this machine's: the toy build "
          "is not bitwise identical across machines)")
    print(f"results: {os.path.join(args.out, 'results.json')}\nplot:    {plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
