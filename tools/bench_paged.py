"""Paged decode attention: a Pallas kernel against the xla reference, agreement and time.

Random decode batches over a randomly assigned page pool (scope_jax.models.attention's layout):
S sequences, one query each, kv lengths uniform in [lo, hi], page_indices sliced to the
longest row's pages (the engine's live-page bucket), the pool exactly the pages in use.
For each case it reports every implementation's largest error against a float32 xla run on
the same (rounded) inputs, its compiled temp memory, and its time per call: one warm-up
call each, then `--repeats` rounds calling the implementations in turn (interleaved), median
and 10th / 90th percentiles, and the per-round ratio xla / kernel (median, min, max).

    # on a GPU machine (one H200): Qwen2-1.5B heads, page 16 / 64, 32 / 256 sequences, 1k-12k
    pip install "jax[cuda12]==0.10.2"
    python -m tools.bench_paged --sizes qwen --json paged_gpu.json
    # anywhere (CPU: the GPU kernel in Pallas interpret mode; agreement only, times meaningless)
    python -m tools.bench_paged --sizes small --repeats 2

Implementations: the backend's kernel ("pallas_gpu" on GPU, "pallas_tpu" on TPU, "pallas_gpu"
in interpret mode on CPU), "auto" (paged_attention's default: on GPU the kernel behind the
on-device decode check) and "xla".
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from scope_jax.models import attention as attn

QWEN2_1P5B = dict(hq=12, hkv=2, d=128)
SIZES = {  # (page_size, num_seqs, kv length range)
    "qwen": dict(heads=QWEN2_1P5B, dtype="bfloat16",
                 cases=[(16, 32, (1024, 12288)), (16, 256, (1024, 12288)),
                        (64, 32, (1024, 12288)), (64, 256, (1024, 12288))]),
    "small": dict(heads=QWEN2_1P5B, dtype="bfloat16",
                  cases=[(16, 4, (16, 200)), (64, 3, (1, 130))]),
}


def decode_batch(page_size: int, num_seqs: int, lens: tuple[int, int], hq: int, hkv: int,
                 d: int, dtype, seed: int = 0):
    """paged_attention's arguments for a random decode batch (one query per sequence)."""
    r = np.random.RandomState(seed)
    kv_lens = r.randint(lens[0], lens[1] + 1, num_seqs).astype(np.int32)
    pages = -(-kv_lens // page_size)
    pages_per_seq = int(pages.max())
    order = r.permutation(int(pages.sum())).astype(np.int32)
    table = np.zeros((num_seqs, pages_per_seq), np.int32)
    starts = np.concatenate([[0], np.cumsum(pages)])
    for s in range(num_seqs):
        table[s, :pages[s]] = order[starts[s]:starts[s + 1]]
    key_q, key_kv = jax.random.split(jax.random.key(seed))
    queries = jax.random.normal(key_q, (num_seqs, hq, d), jnp.float32).astype(dtype)
    pool = jax.random.normal(key_kv, (int(pages.sum()), page_size, 2 * hkv, d),
                             jnp.float32).astype(dtype)
    return (queries, pool, jnp.asarray(kv_lens), jnp.asarray(table),
            jnp.arange(num_seqs + 1, dtype=jnp.int32), jnp.asarray([num_seqs], jnp.int32))


def implementations(backend: str, scale: float) -> dict:
    """name -> jitted fn(*args), for this backend."""
    fns = {"xla": functools.partial(attn.paged_attention, implementation="xla")}
    if backend == "gpu":
        fns["pallas_gpu"] = functools.partial(attn.paged_attention, implementation="pallas_gpu")
        fns["auto"] = attn.paged_attention
    elif backend == "tpu":
        fns["pallas_tpu"] = functools.partial(attn.paged_attention, implementation="pallas_tpu")
    else:
        fns["pallas_gpu_interpret"] = functools.partial(attn.paged_attention_pallas_gpu,
                                                        interpret=True)
    return {name: jax.jit(functools.partial(fn, sm_scale=scale)) for name, fn in fns.items()}


def run_case(case: tuple, heads: dict, dtype, repeats: int, backend: str) -> dict:
    page_size, num_seqs, lens = case
    args = decode_batch(page_size, num_seqs, lens, dtype=dtype, **heads)
    scale = heads["d"] ** -0.5
    fns = implementations(backend, scale)
    exact = fns["xla"](args[0].astype(jnp.float32), args[1].astype(jnp.float32), *args[2:])
    row = dict(page_size=page_size, num_seqs=num_seqs, dtype=jnp.dtype(dtype).name,
               kv_len_min=int(args[2].min()), kv_len_median=float(np.median(args[2])),
               kv_len_max=int(args[2].max()), pages_per_seq=int(args[3].shape[1]),
               pool_pages=int(args[1].shape[0]),
               pool_gib=args[1].size * args[1].dtype.itemsize / 2 ** 30, impls={})
    for name, fn in list(fns.items()):
        fns[name] = fn = fn.lower(*args).compile()
        memory = fn.memory_analysis()
        out = fn(*args).block_until_ready()  # warm-up
        row["impls"][name] = dict(
            max_abs_err_vs_f32=float(jnp.abs(out.astype(jnp.float32) - exact).max()),
            temp_gib=None if memory is None else memory.temp_size_in_bytes / 2 ** 30)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(*args).block_until_ready()
            times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        ts = np.asarray(ts) * 1e3
        row["impls"][name].update(median_ms=float(np.median(ts)),
                                  p10_ms=float(np.percentile(ts, 10)),
                                  p90_ms=float(np.percentile(ts, 90)))
        if name != "xla":
            ratio = np.asarray(times["xla"]) / np.asarray(times[name])
            row["impls"][name].update(xla_over_this_median=float(np.median(ratio)),
                                      xla_over_this_min=float(ratio.min()),
                                      xla_over_this_max=float(ratio.max()))
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", choices=sorted(SIZES), default="qwen")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="write the results here")
    a = parser.parse_args(argv)
    size = SIZES[a.sizes]
    backend = jax.default_backend()
    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  machine=f"{platform.node()} {jax.devices()[0].device_kind} ({backend})",
                  command="python -m tools.bench_paged " + " ".join(sys.argv[1:] if argv is None
                                                                   else argv),
                  jax=jax.__version__, heads=size["heads"], repeats=a.repeats, cases=[])
    for case in size["cases"]:
        row = run_case(case, size["heads"], jnp.dtype(size["dtype"]), a.repeats, backend)
        result["cases"].append(row)
        for name, r in row["impls"].items():
            ratio = (f"  xla/this {r['xla_over_this_median']:.2f}x "
                     f"[{r['xla_over_this_min']:.2f}, {r['xla_over_this_max']:.2f}]"
                     if "xla_over_this_median" in r else "")
            temp = "?" if r["temp_gib"] is None else f"{r['temp_gib']:.3f}"
            print(f"page {row['page_size']:3d} seqs {row['num_seqs']:4d} kv {row['kv_len_min']}-"
                  f"{row['kv_len_max']} {name:22s} {r['median_ms']:9.3f} ms "
                  f"[{r['p10_ms']:.3f}, {r['p90_ms']:.3f}]  err {r['max_abs_err_vs_f32']:.2e}  "
                  f"temp {temp} GiB{ratio}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
