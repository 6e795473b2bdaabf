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
            temperature: float = 0.6, max_new_tokens: int = 48, split: str = "train",
            seed: int = 0, chunk: int = 256) -> dict:
    """Runs steps 1-3 of the module docstring on the build in toy_dir. Returns the JSON-ready
    result: settings, student accuracy, mixed / all-right / all-wrong prompt fractions, the
    recovery table (recovery_table) for all wrong rollouts and by product / no product, and the
    Spearman correlation of PPL_T with 20%-cut recovery."""
    import jax
    from flax import nnx
    from transformers import AutoTokenizer

    from scope_jax import data, rollout, toy
    from scope_jax.models import load_hf
    from scope_jax.sampling import full_sequences, response_lists
    from scope_jax.scoring import response_logprobs
    from scope_jax.verifiers import InlineVerifier

    paths = toy.toy_paths(toy_dir)
    if not os.path.isfile(paths["manifest"]):
        raise SystemExit(f"--toy-dir {toy_dir}: no manifest.json (build it with tools/make_toy.py)")
    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    student, teacher = load_hf(paths["student"]), load_hf(paths["teacher"])
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

    # 2. Teacher PPL of every rollout (the trainer's scoring), then keep the wrong ones.
    ids, mask = full_sequences(out)
    m = out.tokens.shape[1]
    t_graph, t_state = nnx.split(teacher)
    score = jax.jit(lambda st, i, a: response_logprobs(nnx.merge(t_graph, st), i, a, m))
    lp = np.asarray(score(t_state, ids, mask))
    rmask = np.asarray(out.response_mask)
    ppl_all = np.exp(-(lp * rmask).sum(1) / np.maximum(rmask.sum(1), 1))
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
        "settings": {"problems": len(kept), "split": split, "samples": samples,
                     "continuations": continuations, "temperature": temperature,
                     "top_k": None, "top_p": None, "max_new_tokens": max_new_tokens,
                     "seed": seed, "fractions": list(FRACTIONS)},
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
        "seconds": round(time.perf_counter() - t0, 1),
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
    lines.append(f"\nSpearman(PPL_T, recovery from 20%) = {res['spearman_ppl_vs_recovery_at_20']}; "
                 f"recovery with a product {[pct(x) for x in res['recovery_with_product'] or []]}, "
                 f"without {[pct(x) for x in res['recovery_without_product'] or []]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy-dir", required=True, help="a toy build (tools/make_toy.py)")
    p.add_argument("--out", required=True, help="writes OUT/premise.json")
    p.add_argument("--problems", type=int, default=200)
    p.add_argument("--samples", type=int, default=8, help="student rollouts per problem (RL: 8)")
    p.add_argument("--continuations", type=int, default=4, help="teacher samples per cut")
    p.add_argument("--temperature", type=float, default=0.6, help="rollout temperature (RL: 0.6)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--split", choices=("train", "test"), default="train")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.problems, args.samples, args.continuations) < 1:
        p.error("--problems, --samples and --continuations must be >= 1")
    logging.basicConfig(level=logging.WARNING)
    res = measure(args.toy_dir, problems=args.problems, samples=args.samples,
                  continuations=args.continuations, temperature=args.temperature,
                  max_new_tokens=args.max_new_tokens, split=args.split, seed=args.seed)
    from scope_jax.evaluation import write_json

    path = write_json(os.path.join(args.out, "premise.json"), res)
    print(format_result(res))
    print(f"\n{path} ({res['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
