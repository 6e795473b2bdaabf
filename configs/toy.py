"""The toy CPU setup: step-by-step arithmetic, a tiny teacher and a weaker tiny student.

    python -m tools.train --config configs/toy.py --config.algo=scope --config.workdir=runs/toy_scope --config.num_steps=30
    python -m tools.train --config configs/toy.py:opd      # baselines / ablations: configs/common.py

The first run builds the toy data, tokenizer, teacher and student under runs/toy
(scope_jax.toy.build_toy, a couple of minutes on a 2-core CPU) and later runs reuse them.
"""

import ml_collections

from configs import common


def get_config(variant: str = ""):
    c = common.base()
    c.workdir = "runs/toy_scope"
    c.toy_dir = "runs/toy"
    c.student = "runs/toy/student"
    c.teacher = "runs/toy/teacher"
    c.data.train_files = "runs/toy/data/train.jsonl"
    c.data.spec = "generic"
    c.data.instruction = ""  # the toy prompt is the problem alone (scope_jax.toy.TOY_INSTRUCTION)
    c.data.max_prompt_len = 64
    c.num_steps = 100
    c.checkpoint_every = 25
    c.prompts_per_step = 16
    c.num_samples = 8
    c.sampling.max_new_tokens = 48
    c.sampling.temperature = 0.6  # the paper's rollout temperature
    # Tiny models are fragile under Adam's first, sign-like steps: a low rate, a short warm-up
    # and a faster second-moment estimate (b2) keep 100 steps stable (3e-4 and up degraded the
    # student in every method tried; see the README's toy section).
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 10
    c.optim.b2 = 0.99
    c.verifier.num_workers = 2
    c.model.dtype = "float32"  # bf16 matmuls are slow on CPU
    c.model.teacher_dtype = "float32"
    c.model.remat_policy = "none"  # tiny models: keep every activation
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    # 128 rollouts a step on one CPU device: 64 slots decode half of them at once, where 32
    # left the engine behind the static batch (tools.bench_rollout --toy, idle 2-core CPU,
    # 2026-12-05: 1.10-1.11x static at 64 slots, 0.93-0.96x at 32).
    c.rollout.slots = 64
    return common.apply_variant(c, variant)
