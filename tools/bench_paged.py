"""Paged decode attention: a Pallas kernel against the xla reference, agreement and time.

Random decode batches over a randomly assigned page pool (scope_jax.models.attention's layout):
S sequences, one query each, kv lengths uniform in [lo, hi], page_indices sliced to the
longest row's pages (the engine's live-page bucket), the pool exactly the pages in use.
For each case it reports every implementation's largest error against a float32 xla run
(matmul precision "highest") on the same (rounded) inputs, its compiled temp memory, and its time per call: one warm-up
call each, then `--repeats` rounds calling the implementations in turn (interleaved), median
and 10th / 90th percentiles, and the per-round ratio xla / kernel (median, min, max).

    # on a GPU machine (one H200): Qwen2-1.5B heads, page 16 / 64, 32 / 256 sequences, 1k-12k
    pip install "jax[cuda12]==0.10.2"
    python -m tools.bench_paged --sizes qwen --json paged_gpu.json
    # anywhere (CPU: the GPU kernel in Pallas interpret mode; agreement only, times meaningless)
    python -m tools.bench_paged --sizes small --repeats 2

    # on CPU: the xla path against the static sampler's dense-cache attention
    python -m tools.bench_paged --sizes cpu

Implementations: the backend's kernel ("pallas_gpu" on GPU, "pallas_tpu" on TPU, "pallas_gpu"
in interpret mode on CPU), "auto" (paged_attention's default: on GPU the kernel behind the
on-device decode check), "xla", and "dense_attend_decode": attention.attend_decode, what the
static sampler runs per decode step, over a dense [Hkv, S, D, L] cache holding the same keys
and values (L = the page bucket), for the cost of paging itself.
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
TINY = dict(hq=4, hkv=2, d=16)  # tests/tiny_hf.py's heads, the engine's CPU benchmark model
SIZES = {  # cases: (heads, page_size, num_seqs, kv length range)
    "qwen": dict(dtype="bfloat16", cases=[(QWEN2_1P5B, ps, s, (1024, 12288))
                                          for ps in (16, 64) for s in (32, 256)]),
    "small": dict(dtype="bfloat16", interpret=True, cases=[(QWEN2_1P5B, 16, 4, (16, 200)),
                                           (QWEN2_1P5B, 64, 3, (1, 130))]),
    "cpu": dict(dtype="float32", cases=[(TINY, 16, 32, (64, 512)),
                                        (QWEN2_1P5B, 16, 32, (256, 1024))]),
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


def dense_cache(args) -> tuple:
    """attend_decode's arguments for the same batch: the static sampler's dense cache
    ([Hkv, S, D, L] keys and values, L = the page bucket), built from the pages outside the
    timed region."""
    queries, pool, kv_lens, table = args[:4]
    num_seqs, hq, d = queries.shape
    hkv = pool.shape[2] // 2
    kv = pool[table].reshape(num_seqs, -1, hkv, 2, d)  # [S, L, Hkv, 2, D]
    k_t, v_t = (kv[..., i, :].transpose(2, 0, 3, 1) for i in (0, 1))
    span = k_t.shape[-1]
    valid = jnp.arange(span)[None, :] < kv_lens[:, None]
    return queries[:, None], k_t, v_t, jnp.asarray([span - 1], jnp.int32), valid


def implementations(backend: str, scale: float, args: tuple, interpret: bool) -> dict:
    """name -> (jitted fn, its arguments), for this backend (on CPU the GPU kernel in interpret
    mode if `interpret`: agreement only, its time means nothing)."""
    fns = {"xla": (functools.partial(attn.paged_attention, implementation="xla"), args)}
    if backend == "gpu":
        fns["pallas_gpu"] = (functools.partial(attn.paged_attention, implementation="pallas_gpu"),
                             args)
        fns["auto"] = (attn.paged_attention, args)
    elif backend == "tpu":
        fns["pallas_tpu"] = (functools.partial(attn.paged_attention, implementation="pallas_tpu"),
                             args)
    elif interpret:
        fns["pallas_gpu_interpret"] = (
            functools.partial(attn.paged_attention_pallas_gpu, interpret=True), args)
    out = {name: (jax.jit(functools.partial(fn, sm_scale=scale)), a)
           for name, (fn, a) in fns.items()}
    num_seqs, hq, d = args[0].shape
    out["dense_attend_decode"] = (  # [S, 1, Hq * D] -> [S, Hq, D]
        jax.jit(lambda *a: attn.attend_decode(*a, scale).reshape(num_seqs, hq, d)),
        dense_cache(args))
    return out


def run_case(case: tuple, dtype, repeats: int, backend: str, interpret: bool) -> dict:
    heads, page_size, num_seqs, lens = case
    args = decode_batch(page_size, num_seqs, lens, dtype=dtype, **heads)
    scale = heads["d"] ** -0.5
    fns = implementations(backend, scale, args, interpret)
    with jax.default_matmul_precision("highest"):  # no TF32 in the reference on a GPU
        exact = attn.paged_attention_xla(args[0].astype(jnp.float32),
                                         args[1].astype(jnp.float32), *args[2:], sm_scale=scale)
    row = dict(heads=heads, page_size=page_size, num_seqs=num_seqs, dtype=jnp.dtype(dtype).name,
               kv_len_min=int(args[2].min()), kv_len_median=float(np.median(args[2])),
               kv_len_max=int(args[2].max()), pages_per_seq=int(args[3].shape[1]),
               pool_pages=int(args[1].shape[0]),
               pool_gib=args[1].size * args[1].dtype.itemsize / 2 ** 30, impls={})
    for name, (fn, a) in list(fns.items()):
        compiled = fn.lower(*a).compile()
        fns[name] = (compiled, a)
        memory = compiled.memory_analysis()
        out = compiled(*a).block_until_ready()  # warm-up
        row["impls"][name] = dict(
            max_abs_err_vs_f32=float(jnp.abs(out.astype(jnp.float32) - exact).max()),
            temp_gib=None if memory is None else memory.temp_size_in_bytes / 2 ** 30)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, (fn, a) in fns.items():
            start = time.perf_counter()
            fn(*a).block_until_ready()
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
                  jax=jax.__version__, repeats=a.repeats, cases=[])
    for case in size["cases"]:
        row = run_case(case, jnp.dtype(size["dtype"]), a.repeats, backend,
                       size.get("interpret", False))
        result["cases"].append(row)
        for name, r in row["impls"].items():
            ratio = (f"  xla/this {r['xla_over_this_median']:.2f}x "
                     f"[{r['xla_over_this_min']:.2f}, {r['xla_over_this_max']:.2f}]"
                     if "xla_over_this_median" in r else "")
            temp = "?" if r["temp_gib"] is None else f"{r['temp_gib']:.3f}"
            print(f"heads {row['heads']['hq']}/{row['heads']['hkv']}/{row['heads']['d']} "
                  f"page {row['page_size']:3d} seqs {row['num_seqs']:4d} kv {row['kv_len_min']}-"
                  f"{row['kv_len_max']} {name:22s} {r['median_ms']:9.3f} ms "
                  f"[{r['p10_ms']:.3f}, {r['p90_ms']:.3f}]  err {r['max_abs_err_vs_f32']:.2e}  "
                  f"temp {temp} GiB{ratio}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
