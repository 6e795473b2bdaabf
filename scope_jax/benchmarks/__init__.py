"""The evaluation benchmarks and the SCOPE training sample, shipped as package data.

    from scope_jax import benchmarks, data
    data.load_examples(benchmarks.path("math500"))

Files (sources, commits and licences: SOURCES.md beside this file): math500, aime24, aime25,
amc23, minerva_math, olympiadbench, gsm8k_test (.jsonl) and scope_train_sample.parquet (2,000
DeepMath-103K rows in the released code's format).
"""

from __future__ import annotations

import os

DIR = os.path.dirname(os.path.abspath(__file__))
# Names people use -> file stems.
ALIASES = {"gsm8k": "gsm8k_test", "deepmath": "scope_train_sample"}


def names() -> list[str]:
    """File stems of the shipped data files, sorted."""
    return sorted(f.split(".")[0] for f in os.listdir(DIR) if f.endswith((".jsonl", ".parquet")))


def path(name: str) -> str:
    """Absolute path of a shipped file by stem or alias ('math500', 'gsm8k', 'deepmath')."""
    stem = ALIASES.get(name, name)
    for ext in (".jsonl", ".parquet"):
        p = os.path.join(DIR, stem + ext)
        if os.path.isfile(p):
            return p
    raise FileNotFoundError(f"no shipped benchmark {name!r} in {DIR}; shipped: {names()}")
