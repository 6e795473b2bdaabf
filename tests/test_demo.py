"""The demo's own bookkeeping (tools/demo.py); the training and evaluation it calls are tested
in test_train.py and test_evaluation.py, and `make demo` itself runs the whole thing."""

import numpy as np
import pytest

from tools import demo


def test_exact_solution_rate_counts_only_the_gold_worked_solution():
    solutions = ["4+1=5. 5-3=2. \\boxed{2}", "2*3=6. \\boxed{6}"]
    records = [
        {"index": 0, "n": 3, "responses": ["4+1=5. 5-3=2. \\boxed{2}",   # right for the right reasons
                                           "4+1=4. 4-3=2. \\boxed{2}",   # right answer, wrong steps
                                           " 4+1=5. 5-3=2. \\boxed{2}\n"]},  # whitespace only
        {"index": 1, "n": 1, "responses": ["2*3=5. \\boxed{5}"]},
    ]
    assert demo._exact_solution_rate(records, solutions) == pytest.approx(2 / 4)


def test_comparisons_are_paired_differences_against_the_named_baseline():
    rng = np.random.default_rng(0)
    n = np.full(50, 8)
    counts = {name: (n, rng.binomial(8, p, size=50)) for name, p in
              (("student", 0.2), ("grpo", 0.2), ("opd", 0.4), ("scope", 0.5))}
    out = demo._compare(counts, k=8)
    assert set(out) == {f"{a}-{b}" for a, b in demo.PAIRS}
    d = out["scope-student"]
    assert d["avg_at_k_diff"] == pytest.approx((counts["scope"][1] - counts["student"][1]).mean() / 8)
    text = demo._format_comparisons(out)
    assert "scope-student" in text and f"{100 * d['avg_at_k_diff']:+.1f}" in text


def test_machine_info_records_what_the_numbers_depend_on(monkeypatch):
    import jax

    from scope_jax import toy

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    info = toy.machine_info()
    assert info["jax"] == jax.__version__ and info["backend"] == jax.default_backend()
    assert info["xla_flags"] == "--xla_force_host_platform_device_count=2"
    assert info["cpu_count"] == __import__("os").cpu_count() and info["cpu_model"]
    # the vector extensions, read here from /proc/cpuinfo's own flags line (x86 "flags", arm
    # "Features"): builds differ between machines /proc/cpuinfo names alike but that differ here
    flags = next((set(l.split(":", 1)[1].split()) for l in open("/proc/cpuinfo")
                  if l.split(":")[0].strip() in ("flags", "Features")), None)
    assert flags is not None, "this test reads /proc/cpuinfo (Linux)"
    assert info["cpu_isa"].split() == [x for x in toy.CPU_ISA if x in flags]
    line = toy.format_machine(info)
    assert info["cpu_model"] in line and "xla_force_host_platform_device_count" in line
    assert f"({info['cpu_isa']})" in line
    old = {k: v for k, v in info.items() if k != "cpu_isa"}     # a record from before cpu_isa
    assert "(isa not recorded)" in toy.format_machine(old)
