"""Benchmark the math verifier pool: throughput, and the latency cost of pathological items.

    .venv/bin/python -m tools.bench_verifier [--workers N] [--timeout_s 5] [--pairs 2000]

Pairs are built from MATH-500 gold answers (scope_jax/benchmarks/math500.jsonl): per problem a
response boxing the gold answer, one boxing another problem's answer, one boxing the answer as
a decimal or with spacing, and one without a box, each after ~1 kB of reasoning-like text.
Reports verifications/s for the pool (warm workers) and for a single in-process loop, and the
wall time of a 256-item batch with and without 8 pathological items:
  'refused' items are caught before parsing (power towers, a megabyte of text, nested braces,
  code); 'hanging' items reach sympy and run until the per-item limit stops them.
"""
import argparse
import collections
import json
import os
import pathlib
import random
import time

from scope_jax import benchmarks
from scope_jax.verifiers.math import verify
from scope_jax.verifiers.pool import Verifier

DATA = pathlib.Path(benchmarks.DIR)

REFUSED = [
    r"\boxed{9^{9^{9^{9}}}}",
    "lorem ipsum " * 90_000 + r"\boxed{10^{10^{10}}}",
    r"\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    r"\boxed{__import__('os').system('echo pwned')}",
]
HANGING = [r"\boxed{(2+3)^{10^{9}}}", r"\boxed{(3+4)^{10^{9}}}", r"\boxed{(1+2)^{10^{9}}}",
           r"\boxed{(5+6)^{10^{9}}}"]


def make_pairs(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """n (response, gold) pairs from MATH-500, a quarter of each kind described above."""
    rows = [json.loads(line) for line in open(DATA / "math500.jsonl")]
    rng = random.Random(seed)
    filler = ("We expand the expression, collect like terms and simplify step by step. " * 14)
    responses, golds = [], []
    while len(responses) < n:
        r = rng.choice(rows)
        other = rng.choice(rows)["answer"]
        gold = r["answer"]
        variant = gold.replace("\\frac{1}{2}", "0.5").replace(",", ", ")
        for ans in (gold, other, variant, None):
            box = f"The final answer is $\\boxed{{{ans}}}$." if ans is not None else "I give up."
            responses.append(filler + box)
            golds.append(gold)
    return responses[:n], golds[:n]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--timeout_s", type=float, default=5.0)
    ap.add_argument("--pairs", type=int, default=2000)
    args = ap.parse_args()

    responses, golds = make_pairs(args.pairs)
    t_start, v = timed(lambda: Verifier(num_workers=args.workers, timeout_s=args.timeout_s))
    with v:
        t_pool, res = timed(lambda: v.verify_batch(responses, golds))
        n_serial = min(500, args.pairs)
        t_serial, res_serial = timed(lambda: [verify(r, g, timeout_s=args.timeout_s)
                                             for r, g in zip(responses[:n_serial], golds[:n_serial])])
        assert [r.reward for r in res[:n_serial]] == [r.reward for r in res_serial]
        correct = sum(r.reward for r in res)

        base_r, base_g = make_pairs(256, seed=1)
        t_clean, _ = timed(lambda: v.verify_batch(base_r, base_g))
        rows = [("clean", t_clean, {}, v.restarts)]
        for name, bad in (("8 refused", REFUSED * 2), ("8 hanging", HANGING * 2),
                          ("4 refused + 4 hanging", REFUSED + HANGING)):
            mixed = list(base_r)
            for k, b in enumerate(bad):
                mixed[k * 32] = b  # spread through the batch
            restarts = v.restarts
            t, out = timed(lambda: v.verify_batch(mixed, base_g))
            zeros = sum(1 for k in range(len(bad)) if out[k * 32].reward == 0.0)
            reasons = collections.Counter(out[k * 32].reason for k in range(len(bad)))
            rows.append((name, t, dict(reasons), v.restarts - restarts))
            assert zeros == len(bad)

    print(f"workers={args.workers}  timeout_s={args.timeout_s}  cpu_count={os.cpu_count()}  "
          f"pool start-up {t_start:.2f} s")
    print(f"{'':34s}{'items':>7s}{'wall s':>9s}{'verif/s':>10s}")
    print(f"{'pool, MATH-500 pairs':34s}{len(responses):7d}{t_pool:9.2f}{len(responses) / t_pool:10.1f}"
          f"   (correct {int(correct)}/{len(responses)})")
    print(f"{'in-process loop (1 core)':34s}{n_serial:7d}{t_serial:9.2f}{n_serial / t_serial:10.1f}")
    print()
    print(f"{'batch of 256':34s}{'wall s':>9s}{'restarts':>10s}   reasons of the bad items")
    for name, t, reasons, restarts in rows:
        print(f"{name:34s}{t:9.2f}{restarts:10d}   {reasons}")


if __name__ == "__main__":
    main()
