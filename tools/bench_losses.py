"""Benchmarks for scope_jax.losses.

    python -m tools.bench_losses            # both parts, about a minute on a 2-core CPU
    python -m tools.bench_losses --json out.json

(a) Compiled temporary memory (jax memory_analysis, no execution) of token_logprobs
    forward+backward at the Qwen2-1.5B shape (B=8, T=4096, H=1536, V=151936, bf16) for the
    dense path, the vocabulary-tiled path (the library's), and a sequence-chunked scan with
    remat (the alternative design, kept here only as a baseline). Plus a value check of the
    tiled path against the dense one at the full H and V on a shorter sequence.
(b) The cost of scope_loss relative to the plain OPD loss, both inside one jitted step
    (hidden states -> token_logprobs -> loss -> gradients), and for the loss kernels alone
    at the paper's batch (256 prompts x 8 rollouts). Timed side by side, interleaved,
    median of repeats: ratios, not absolute times, are the result.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from scope_jax import losses as L

QWEN2_1_5B = dict(B=8, T=4096, H=1536, V=151936)


def remat_scan_logprobs(hidden, lm_head, targets, *, positions=32):
    """Baseline design: scan over sequence chunks with jax.checkpoint (tunix-style)."""
    b, t, h = hidden.shape
    n = t // positions

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def chunk(h_c, t_c):
        logits = jnp.einsum("bch,hv->bcv", h_c, lm_head, preferred_element_type=jnp.float32)
        return L.logprobs_from_logits(logits, t_c)

    hs = jnp.swapaxes(hidden.reshape(b, n, positions, h), 0, 1)
    ts = jnp.swapaxes(targets.reshape(b, n, positions), 0, 1)
    _, out = jax.lax.scan(lambda c, x: (c, chunk(*x)), None, (hs, ts))
    return jnp.swapaxes(out, 0, 1).reshape(b, t)


def temp_gib(fn, shape) -> float:
    """Compiled temporary bytes of value_and_grad(sum of fn) w.r.t. hidden and lm_head."""
    B, T, H, V = shape["B"], shape["T"], shape["H"], shape["V"]
    args = (jax.ShapeDtypeStruct((B, T, H), jnp.bfloat16), jax.ShapeDtypeStruct((H, V), jnp.bfloat16),
            jax.ShapeDtypeStruct((B, T), jnp.int32))
    step = jax.jit(jax.value_and_grad(lambda h, w, t: -fn(h, w, t).sum(), argnums=(0, 1)))
    return step.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**30


def memory_table(shape) -> dict[str, float]:
    rows = {"dense ([B,T,V] logits)": L.token_logprobs_dense}
    for c in (256, 512, 1024):
        rows[f"vocab-tiled, chunk_size={c}" + (" (default)" if c == 512 else "")] = functools.partial(L.token_logprobs, chunk_size=c)
    rows["sequence-chunked scan + remat, 32 positions (baseline design)"] = remat_scan_logprobs
    return {name: temp_gib(fn, shape) for name, fn in rows.items()}


def value_check(shape, t=256) -> float:
    """Max |tiled - dense| over a [1, t] slice at the full H and V (bf16 inputs)."""
    k = jax.random.split(jax.random.key(0), 3)
    h = (jax.random.normal(k[0], (1, t, shape["H"])) * 2).astype(jnp.bfloat16)
    w = (jax.random.normal(k[1], (shape["H"], shape["V"])) / np.sqrt(shape["H"])).astype(jnp.bfloat16)
    tgt = jax.random.randint(k[2], (1, t), 0, shape["V"])
    a = jax.jit(L.token_logprobs)(h, w, tgt)
    b = jax.jit(L.token_logprobs_dense)(h, w, tgt)
    return float(jnp.abs(a - b).max())


def _median_times(fns: dict, args, repeats: int) -> dict[str, float]:
    for f in fns.values():  # compile + warm up
        jax.block_until_ready(f(*args))
    times = {k: [] for k in fns}
    for _ in range(repeats):  # interleaved so machine noise hits both alike
        for k, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def _rollout_batch(prompts, n, t, seed=0):
    rng = np.random.default_rng(seed)
    b = prompts * n
    gids = rng.permutation(np.repeat(np.arange(prompts), n)).astype(np.int32)
    lengths = rng.integers(t // 4, t + 1, b)
    mask = np.arange(t)[None] < lengths[:, None]
    old = np.log(rng.uniform(0.05, 1, (b, t))).astype(np.float32)
    tea = np.log(rng.uniform(0.05, 1, (b, t))).astype(np.float32)
    return gids, mask, old, tea, rng.random(b) < 0.5


def step_cost(repeats=15) -> dict:
    """Full jitted step at a CPU-sized shape: 4 prompts x 8 rollouts, T=256, H=256, V=8192."""
    gids, mask, old, tea, correct = _rollout_batch(4, 8, 256)
    k = jax.random.split(jax.random.key(1), 3)
    hid = jax.random.normal(k[0], (32, 256, 256))
    w = jax.random.normal(k[1], (256, 8192)) / 16
    tgt = jax.random.randint(k[2], (32, 256), 0, 8192)

    def make(loss_name):
        def loss(hid, w, tgt, old, tea, mask, correct, gids):
            lp = L.token_logprobs(hid, w, tgt)
            if loss_name == "scope":
                return L.scope_loss(lp, old, tea, mask, correct, gids)[0]
            return L.opd_loss(lp, old, tea, mask, gids)[0]
        return jax.jit(jax.grad(loss, argnums=(0, 1)))

    args = (hid, w, tgt, old, tea, mask, correct, gids)
    t = _median_times({"opd": make("opd"), "scope": make("scope")}, args, repeats)
    return {"opd_s": t["opd"], "scope_s": t["scope"], "scope_over_opd": t["scope"] / t["opd"]}


def kernel_cost(repeats=15) -> dict:
    """Loss kernels alone (value and gradient w.r.t. log-probs) at 256 prompts x 8 rollouts, T=1024."""
    gids, mask, old, tea, correct = _rollout_batch(256, 8, 1024)
    # Batch arrays are arguments, not closed-over constants, so XLA cannot fold them.
    scope = jax.jit(jax.grad(lambda lp, old, tea, mask, correct, gids: L.scope_loss(lp, old, tea, mask, correct, gids)[0]))
    opd = jax.jit(jax.grad(lambda lp, old, tea, mask, correct, gids: L.opd_loss(lp, old, tea, mask, gids)[0]))
    t = _median_times({"opd": opd, "scope": scope}, (old, old, tea, mask, correct, gids), repeats)
    return {"opd_s": t["opd"], "scope_s": t["scope"], "scope_over_opd": t["scope"] / t["opd"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    out = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
    print(f"(a) token_logprobs forward+backward temporaries at {QWEN2_1_5B} (bf16), jax memory_analysis:")
    out["memory_gib"] = memory_table(QWEN2_1_5B)
    for name, gib in out["memory_gib"].items():
        print(f"    {gib:7.2f} GiB  {name}")
    out["max_abs_diff_tiled_vs_dense"] = value_check(QWEN2_1_5B)
    print(f"    tiled vs dense at H=1536, V=151936, T=256: max |diff| = {out['max_abs_diff_tiled_vs_dense']:.2e}")
    print("(b) cost of scope_loss relative to opd_loss (median of interleaved repeats):")
    out["step"] = step_cost()
    print(f"    full step (32 x 256 tokens, V=8192): opd {out['step']['opd_s'] * 1e3:.1f} ms, "
          f"scope {out['step']['scope_s'] * 1e3:.1f} ms, ratio {out['step']['scope_over_opd']:.3f}")
    out["kernel"] = kernel_cost()
    print(f"    loss kernels alone (2048 x 1024): opd {out['kernel']['opd_s'] * 1e3:.1f} ms, "
          f"scope {out['kernel']['scope_s'] * 1e3:.1f} ms, ratio {out['kernel']['scope_over_opd']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
