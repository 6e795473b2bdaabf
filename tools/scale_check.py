"""Compile the train step the way train() runs it and read per-chip cost off the compiled program.

    python -m tools.scale_check --config configs/paper_r1_1p5b.py --fake_devices 256 --layers 2,4
    python -m tools.scale_check --config configs/toy.py --fake_devices 8 --rows 128 --seq_len 96
    python -m tools.scale_check --config configs/paper_r1_1p5b.py --fake_devices 256 --layers 2,4 --rollout only

For each depth in --layers (the student's num_hidden_layers overridden; default: the config's
own), it compiles `scope_jax.step.lower_step` (the very jit, shardings, mesh context and
micro-batching train() uses) and the teacher-scoring pass (`scope_jax.scoring.lower_score`, the
pass train() runs: packed with config.packing), and prints per chip:

  * memory: arguments, outputs, temporaries (XLA's memory_analysis of the partitioned program);
  * matmul FLOPs counted from the optimised HLO with each while loop's trip count (XLA's
    cost_analysis counts a loop body once), against the ideal 6 N tokens (+ attention, + the
    remat recompute);
  * collective bytes by kind (all-gather, all-reduce, reduce-scatter, ...), trip counts included;
  * compile time;
  * with two or more depths, a linear extrapolation of each figure to the config's real depth.

It also prints the padding share of the step at a length distribution (default: the issue's
realistic mix, lognormal with median 4,000 response tokens and 5% at the cap) under the
trainer's response bucketing (scope_jax.collect.response_bucket) and, with config.packing, under
packing (scope_jax.packing.plan on the mesh's batch shards), and the sampler's KV-cache bytes
per chip and bytes read per decode step. With config.packing the step is compiled as train()
runs it at that mix: rows = batch shards x the plan's micro-batches, seq_len = config.packing
(and so is the teacher's scoring pass, on the same packed rows). On fake CPU devices the memory and FLOPs are
XLA:CPU's figures for the partitioned program, an estimate of a TPU's (TPU fusion and layout
differ). --fake_devices must be given before jax starts (it sets XLA_FLAGS).

With --rollout on (default) or only, it also compiles the continuous rollout engine's programs
(rollout_run: scope_jax.rollout.lower_rollout) at each depth and prints the rollout memory per
chip (weights in the rollout layout, page pool, temporaries) and the collectives per decode
step. The v5e-64 layout: --fake_devices 64 --config.mesh.fsdp=16.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
import time

from absl import app, flags
from ml_collections import config_flags

# ---------------------------------------------------------------------------------------------
# Optimised-HLO accounting (pure text processing: testable without compiling anything).
# ---------------------------------------------------------------------------------------------

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
          "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(")
_ASSIGN = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = ")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all")


def _arrays(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """[(dtype, dims)] of every array in a (possibly tuple) HLO shape string."""
    return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _ARRAY.findall(shape_text)]


def _nbytes(shape_text: str) -> int:
    return sum(_BYTES[t] * math.prod(d) for t, d in _arrays(shape_text))


def _split_instruction(line: str):
    """'%x = SHAPE op(operands), attrs' -> (name, shape, op, operands, attrs) or None."""
    m = _ASSIGN.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):  # tuple shape: up to its matching parenthesis
        depth = 0
        for i, ch in enumerate(rest):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                break
        shape, rest = rest[: i + 1], rest[i + 1:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    op, _, rest = rest.partition("(")
    depth = 1
    for i, ch in enumerate(rest):
        depth += (ch == "(") - (ch == ")")
        if depth == 0:
            break
    return m.group(1), shape, op.strip(), rest[:i], rest[i + 1:]


def hlo_costs(hlo_text: str) -> dict:
    """Matmul FLOPs and collective bytes of an optimised HLO module, loops unrolled by count.

    Every dot counts 2 x (result elements) x (contracted size of its lhs); a while body counts
    its known_trip_count times (nested loops multiply); fusions, calls and conditionals count
    once (a conditional's most expensive branch). Collectives count their result bytes.

    Returns {"matmul_flops": float, "collective_bytes": {kind: float}, "collectives":
    [(kind, shape, times)], "unknown_trip_counts": int}.
    """
    comps: dict[str, list] = {}
    current = None
    for line in hlo_text.splitlines():
        h = _HEADER.match(line)
        if h:
            current = comps.setdefault(h.group(1), [])
            continue
        if current is not None:
            ins = _split_instruction(line)
            if ins:
                current.append(ins)

    memo: dict[str, tuple] = {}
    unknown = [0]

    def cost(name: str):
        if name in memo:
            return memo[name]
        memo[name] = (0.0, {}, [])  # recursion guard
        shapes = {ins[0]: ins[1] for ins in comps.get(name, [])}
        flops, coll, listing = 0.0, {}, []

        def add(sub, times):
            nonlocal flops
            f, c, lst = sub
            flops += times * f
            for k, v in c.items():
                coll[k] = coll.get(k, 0.0) + times * v
            listing.extend((k, s, n * times) for k, s, n in lst)

        for iname, shape, op, operands, attrs in comps.get(name, []):
            if op == "dot":
                lhs = re.findall(r"%([\w.\-]+)", operands)[0]
                dims = _arrays(shapes.get(lhs, ""))
                contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", attrs)
                k = 1
                if dims and contracting:
                    k = math.prod(dims[0][1][int(c)] for c in contracting.group(1).split(",") if c)
                flops += 2.0 * sum(math.prod(d) for _, d in _arrays(shape)) * k
            base = op[:-6] if op.endswith("-start") else op
            if base in COLLECTIVES and not op.endswith("-done"):
                coll[base] = coll.get(base, 0.0) + _nbytes(shape)
                listing.append((base, shape.split("{")[0] if not shape.startswith("(") else shape, 1))
            if op == "while":
                body = re.search(r"body=%([\w.\-]+)", attrs).group(1)
                trip = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', attrs)
                if trip is None:
                    unknown[0] += 1
                add(cost(body), int(trip.group(1)) if trip else 1)
            elif op == "conditional":
                branches = re.findall(r"%([\w.\-]+)", re.search(r"branch_computations=\{([^}]*)\}", attrs).group(1))
                subs = [cost(b) for b in branches]
                add(max(subs, key=lambda s: s[0]), 1)
            else:
                for callee in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", attrs):
                    add(cost(callee), 1)
        memo[name] = (flops, coll, listing)
        return memo[name]

    entry = next(m.group(1) for m in map(_HEADER.match, hlo_text.splitlines()) if m and m.group(0).startswith("ENTRY"))
    flops, coll, listing = cost(entry)
    return {"matmul_flops": flops, "collective_bytes": coll, "collectives": listing,
            "unknown_trip_counts": unknown[0]}


def compiled_report(compiled) -> dict:
    """Per-device memory (bytes) and HLO costs of a jax.stages.Compiled."""
    mem = compiled.memory_analysis()
    out = {"argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
           "alias_bytes": int(mem.alias_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes)}
    costs = hlo_costs(compiled.as_text())
    out.update(matmul_flops=costs["matmul_flops"], collective_bytes=costs["collective_bytes"],
               unknown_trip_counts=costs["unknown_trip_counts"])
    return out


# ---------------------------------------------------------------------------------------------
# Analytic figures: ideal FLOPs, padding, KV cache.
# ---------------------------------------------------------------------------------------------


def ideal_flops(arch: dict, rows: int, seq_len: int, response_len: int, remat: bool) -> dict:
    """Reference matmul FLOPs of one step (all chips) for an HF architecture dict.

    6 N T for the decoder layers (N their parameters, T = rows x seq_len tokens), the
    attention score/value products (a full, unmasked T x S square: the reference kernel does
    not skip the causal half), the lm_head on the response positions only (forward, backward
    and the tiled backward's recomputed logits: 8 H V per token), and with remat one more
    forward of the layers.
    """
    h, layers, inter = arch["hidden_size"], arch["num_hidden_layers"], arch["intermediate_size"]
    q = arch["num_attention_heads"]
    kv = arch.get("num_key_value_heads") or q
    d = arch.get("head_dim") or h // q
    per_layer = h * q * d + 2 * h * kv * d + q * d * h + 3 * h * inter
    tokens = rows * seq_len
    dense = 2 * layers * per_layer * tokens
    attn = layers * rows * 4 * seq_len * seq_len * q * d
    head = 8 * h * arch["vocab_size"] * rows * response_len
    fwd = dense + attn
    total = 3 * fwd + head + (fwd if remat else 0)
    return {"layers_6NT": 3 * dense, "attention": 3 * attn, "lm_head": head,
            "remat_recompute": fwd if remat else 0, "total": total}


def response_lengths(n: int, *, median: float, cap: int, cap_share: float, seed: int = 0):
    """n response lengths from a lognormal with this median, cut at `cap`, with `cap_share`
    of them at the cap (the realistic mix of issue 11: median 4,000, 5% at 12,288)."""
    import numpy as np

    sigma = math.log(cap / median) / statistics.NormalDist().inv_cdf(1 - cap_share)
    x = np.random.default_rng(seed).lognormal(math.log(median), sigma, n)
    return np.clip(np.round(x), 1, cap).astype(int)


def padding_share(prompt_bucket: int, prompt_lengths, lengths, max_new_tokens: int) -> dict:
    """Share of the step's token positions that are padding under the trainer's layout: each
    row is the prompt bucket + the response trimmed to collect.response_bucket(longest)."""
    import numpy as np

    from scope_jax.collect import response_bucket

    m = response_bucket(int(np.max(lengths)), max_new_tokens)
    real = float(np.sum(prompt_lengths) + np.sum(lengths))
    total = float(len(lengths) * (prompt_bucket + m))
    return {"seq_len": prompt_bucket + m, "padding_share": 1.0 - real / total}


def packed_padding(prompt_lengths, lengths, shards: int, capacity: int) -> dict:
    """The packed step's layout at a length mix: scope_jax.packing.plan of the rollouts (prompt
    + response real tokens) on `shards` batch shards, rows of `capacity` tokens."""
    import numpy as np

    from scope_jax import packing

    p = packing.plan(np.asarray(prompt_lengths) + np.asarray(lengths), shards, capacity)
    return {"capacity": capacity, "micro_batches": p.micro_batches, "rows": shards * p.micro_batches,
            "slots_per_row": int(p.rollout.shape[2]), "padding_share": p.padding}


def kv_cache(arch: dict, rows_per_chip: int, cache_len: int, tensor: int, dtype_bytes: int = 2) -> dict:
    """Sampler KV-cache bytes per chip and the bytes one decode step reads at a given length."""
    kv = arch.get("num_key_value_heads") or arch["num_attention_heads"]
    d = arch.get("head_dim") or arch["hidden_size"] // arch["num_attention_heads"]
    kv_per_chip = kv // tensor if kv % tensor == 0 else kv  # replicated when not divisible
    per_slot = 2 * arch["num_hidden_layers"] * kv_per_chip * d * dtype_bytes
    return {"bytes": rows_per_chip * cache_len * per_slot, "bytes_per_slot_per_row": per_slot}


# ---------------------------------------------------------------------------------------------
# The tool.
# ---------------------------------------------------------------------------------------------


def _extrapolate(points: dict[int, float], depth: int) -> float:
    """Linear fit through (layers, value) points evaluated at `depth`."""
    (l0, v0), (l1, v1) = sorted(points.items())[0], sorted(points.items())[-1]
    return v0 + (v1 - v0) * (depth - l0) / (l1 - l0) if l1 != l0 else v0


def run(cfg, *, layers: list[int], rows: int, seq_len: int, response_len: int, teacher: bool = True,
        score_rows: int = 0, score_seq_len: int = 0) -> dict:
    """Compiles the step (rows x seq_len: rollouts, or with config.packing packed rows) and the
    teacher's scoring pass (score_rows x score_seq_len rollouts; default rows x seq_len) at each
    depth; returns the report (see the module docstring)."""
    import jax

    from scope_jax import algorithms, scoring, step
    from scope_jax import sharding as shd
    from scope_jax.models import hf_config

    mesh = shd.make_mesh(cfg.mesh)
    student = hf_config(cfg, "student")
    depth = int(student["num_hidden_layers"])
    report = {"mesh": {k: int(v) for k, v in mesh.shape.items()}, "rows": rows, "seq_len": seq_len,
              "response_len": response_len, "micro_batches": int(cfg.micro_batches), "steps": {}}
    for n_layers in layers:
        c = cfg.copy_and_resolve_references()
        c.arch = c.get("arch") or {}
        c.student = ""  # use cfg.arch.student with the overridden depth
        c.arch.student = dict(student, num_hidden_layers=n_layers)
        t0 = time.perf_counter()
        compiled = step.lower_step(c, rows=rows, seq_len=seq_len, response_len=response_len, mesh=mesh).compile()
        r = compiled_report(compiled)
        r["compile_s"] = time.perf_counter() - t0
        # packed rows run the lm_head on every position (the loss slots are gathered after it)
        head = seq_len if cfg.get("packing") else response_len
        ideal = ideal_flops(c.arch.student, rows, seq_len, head, c.model.remat_policy != "none")
        r["ideal_flops_per_chip"] = {k: v / mesh.size for k, v in ideal.items()}
        r["flops_vs_ideal"] = r["matmul_flops"] / r["ideal_flops_per_chip"]["total"]
        if teacher and algorithms.get(cfg.algo).loads_teacher:
            t0 = time.perf_counter()
            scored = scoring.lower_score(cfg, "teacher", rows=score_rows or rows, seq_len=score_seq_len or seq_len,
                                         response_len=response_len, mesh=mesh, num_layers=n_layers).compile()
            r["teacher_score"] = compiled_report(scored)
            r["teacher_score"]["compile_s"] = time.perf_counter() - t0
        report["steps"][n_layers] = r
        print(f"[{n_layers} layers] temp {r['temp_bytes'] / 2**30:.2f} GiB, args {r['argument_bytes'] / 2**30:.2f} GiB, "
              f"{r['matmul_flops'] / 1e12:.2f} TF/chip ({r['flops_vs_ideal']:.2f}x ideal), "
              f"compile {r['compile_s']:.0f} s", file=sys.stderr)
    if len(layers) >= 2:
        ex = {}
        for key in ("temp_bytes", "argument_bytes", "matmul_flops"):  # compile time: too noisy to fit
            ex[key] = _extrapolate({n: report["steps"][n][key] for n in layers}, depth)
        if all("teacher_score" in report["steps"][n] for n in layers):
            tdepth = int(hf_config(cfg, "teacher")["num_hidden_layers"])
            ex["teacher_score_temp_bytes"] = _extrapolate(
                {n: report["steps"][n]["teacher_score"]["temp_bytes"] for n in layers}, tdepth)
        report["extrapolated_to_depth"] = {"layers": depth, **ex}
    return report


def rollout_run(cfg, *, layers: list[int]) -> dict:
    """Compiles the continuous engine's programs (scope_jax.rollout.lower_rollout: prefill,
    decode block, weight sync in config.rollout's layout and pool) at each depth and reports,
    per chip: the weights in the rollout layout, the page pool, arguments, temporaries, and
    the collectives of one decode step (the decode block's loop body counted once); "memory"
    is arguments + temporaries of the larger of prefill and decode block (their page pool is
    donated: outputs alias it). With two or more depths, extrapolated to the real depth."""
    import jax

    from scope_jax import rollout
    from scope_jax import sharding as shd
    from scope_jax.models import hf_config

    mesh = shd.make_mesh(cfg.mesh)
    student = hf_config(cfg, "student")
    depth = int(student["num_hidden_layers"])
    t = rollout.rollout_tensor(cfg)
    report = {"mesh": {k: int(v) for k, v in mesh.shape.items()}, "tensor": t,
              "kv_tokens_per_chip": int(cfg.rollout.kv_tokens_per_chip), "depths": {}}
    for n_layers in layers:
        c = cfg.copy_and_resolve_references()
        c.arch = c.get("arch") or {}
        c.student = ""
        c.arch.student = dict(student, num_hidden_layers=n_layers)
        t0 = time.perf_counter()
        lowered = rollout.lower_rollout(c, mesh=mesh)
        compiled = {name: low.compile() for name, low in lowered.items()}
        r = {name: compiled_report(comp) for name, comp in compiled.items()}
        r["compile_s"] = time.perf_counter() - t0
        infos = lowered["decode_block"].args_info[0]
        shardings = compiled["decode_block"].input_shardings[0]

        def per_chip(i):  # bytes of one chip's shards of decode-block argument i
            return sum(math.prod(sh.shard_shape(x.shape)) * x.dtype.itemsize
                       for x, sh in zip(jax.tree.leaves(infos[i]), jax.tree.leaves(shardings[i])))

        r["weights_bytes"], r["pool_bytes"] = per_chip(0), per_chip(1)
        r["memory_bytes"] = max(r[k]["argument_bytes"] + r[k]["temp_bytes"]
                                for k in ("decode_block", "prefill"))
        r["collective_bytes_per_decode_step"] = r["decode_block"]["collective_bytes"]
        report["depths"][n_layers] = r
        print(f"[rollout, {n_layers} layers] memory {r['memory_bytes'] / 2**30:.2f} GiB/chip "
              f"(weights {r['weights_bytes'] / 2**30:.2f}, pool {r['pool_bytes'] / 2**30:.2f}, "
              f"decode temp {r['decode_block']['temp_bytes'] / 2**30:.2f}, prefill temp "
              f"{r['prefill']['temp_bytes'] / 2**30:.2f}), collectives per decode step "
              f"{sum(r['collective_bytes_per_decode_step'].values()) / 2**20:.2f} MiB, "
              f"compile {r['compile_s']:.0f} s", file=sys.stderr)
    if len(layers) >= 2:
        ex = {key: _extrapolate({n: report["depths"][n][key] for n in layers}, depth)
              for key in ("memory_bytes", "weights_bytes", "pool_bytes")}
        for prog in ("decode_block", "prefill"):
            for key in ("argument_bytes", "temp_bytes"):
                ex[f"{prog}_{key}"] = _extrapolate(
                    {n: report["depths"][n][prog][key] for n in layers}, depth)
        report["extrapolated_to_depth"] = {"layers": depth, **ex}
        print(f"rollout memory per chip at {depth} layers: {ex['memory_bytes'] / 2**30:.2f} GiB "
              f"(weights {ex['weights_bytes'] / 2**30:.2f}, pool {ex['pool_bytes'] / 2**30:.2f})",
              file=sys.stderr)
    return report


_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file[:variant] (configs/*.py)")
_FAKE = flags.DEFINE_integer("fake_devices", 0, "XLA:CPU devices to fake (sets XLA_FLAGS before jax starts)")
_LAYERS = flags.DEFINE_string("layers", "", "comma-separated student depths to compile (default: the real one)")
_ROWS = flags.DEFINE_integer("rows", 0, "rows of the step (default: prompts_per_step x num_samples; "
                             "with config.packing the packed rows of the length mix's plan)")
_SEQ = flags.DEFINE_integer("seq_len", 0, "tokens per row (default: prompt bucket + max_new_tokens; "
                            "with config.packing, config.packing)")
_NO_TEACHER = flags.DEFINE_bool("no_teacher", False, "skip the teacher-scoring pass")
_MEDIAN = flags.DEFINE_float("median", 4000, "median response length of the padding mix")
_CAP_SHARE = flags.DEFINE_float("cap_share", 0.05, "share of responses at max_new_tokens in the mix")
_JSON = flags.DEFINE_string("json", "", "also write the report to this file")
_ROLLOUT = flags.DEFINE_enum("rollout", "on", ["on", "off", "only"],
                             "compile the continuous engine's programs too (rollout_run); "
                             "'only': skip the train step")


def main(argv) -> None:
    del argv
    if _FAKE.value:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={_FAKE.value}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import numpy as np

    from scope_jax import sampling
    from scope_jax import sharding as shd
    from scope_jax.models import hf_config

    cfg = _CONFIG.value
    # --rows: the rollouts without packing, the packed rows with it
    rollouts = (_ROWS.value if _ROWS.value and not cfg.packing
                else cfg.prompts_per_step * cfg.num_samples)
    bucket = sampling.prompt_bucket(cfg.data.max_prompt_len)
    m = int(cfg.sampling.max_new_tokens)
    mesh = shd.make_mesh(cfg.mesh)
    lengths = response_lengths(rollouts, median=_MEDIAN.value, cap=m, cap_share=_CAP_SHARE.value)
    prompts = np.minimum(np.random.default_rng(1).integers(64, 512, rollouts), bucket)
    mix = {"median": _MEDIAN.value, "cap_share": _CAP_SHARE.value,
           **padding_share(bucket, prompts, lengths, m)}
    if cfg.packing:
        mix["packed"] = packed_padding(prompts, lengths, shd.batch_shards(mesh), int(cfg.packing))
        # one draw's batch shards may need one packed row more than another's: 10 draws' spread
        draws = [packed_padding(np.minimum(np.random.default_rng(seed + 1).integers(64, 512, rollouts), bucket),
                                response_lengths(rollouts, median=_MEDIAN.value, cap=m, cap_share=_CAP_SHARE.value,
                                                 seed=seed), shd.batch_shards(mesh), int(cfg.packing))["padding_share"]
                 for seed in range(10)]
        mix["packed"]["padding_share_10_draws"] = {"mean": float(np.mean(draws)), "min": min(draws), "max": max(draws)}
    depth = int(hf_config(cfg, "student")["num_hidden_layers"])
    layers = [int(x) for x in _LAYERS.value.split(",") if x] or [depth]
    rollout_report = None if _ROLLOUT.value == "off" else rollout_run(cfg, layers=layers)
    if _ROLLOUT.value == "only":
        text = json.dumps({"rollout": rollout_report}, indent=1, default=float)
        print(text)
        if _JSON.value:
            with open(_JSON.value, "w") as f:
                f.write(text)
        return
    rows = _ROWS.value or (mix["packed"]["rows"] if cfg.packing else rollouts)
    seq_len = _SEQ.value or cfg.packing or bucket + m
    response_len = min(m, seq_len - 1)
    report = run(cfg, layers=layers, rows=rows, seq_len=seq_len, response_len=response_len,
                 teacher=not _NO_TEACHER.value,  # packed: the teacher's pass takes the step's packed rows
                 score_rows=0 if cfg.packing else rollouts, score_seq_len=0 if cfg.packing else bucket + m)
    report["padding_at_length_mix"] = mix
    print(f"padding at the length mix: {mix['padding_share']:.1%} trimmed to the longest response"
          + (f", {mix['packed']['padding_share']:.1%} packed ({mix['packed']['micro_batches']} "
             f"micro-batches of one {cfg.packing}-token row per batch shard; 10 draws: mean "
             f"{np.mean(draws):.1%}, max {max(draws):.1%})" if cfg.packing else ""),
          file=sys.stderr)
    rows_per_chip = max(1, rollouts // shd.batch_shards(mesh))
    cache = kv_cache(hf_config(cfg, "student"), rows_per_chip, bucket + m - 1, mesh.shape["tensor"])
    report["sampler"] = {
        "rows_per_chip": rows_per_chip, "cache_len": bucket + m - 1,
        "kv_cache_bytes_per_chip": cache["bytes"],
        "decode_step_bytes_read_full_cache": cache["bytes"],
        "decode_step_bytes_read_at_median_length": rows_per_chip * (bucket + int(_MEDIAN.value))
        * cache["bytes_per_slot_per_row"]}
    if rollout_report is not None:
        report["rollout"] = rollout_report
    text = json.dumps(report, indent=1, default=float)
    print(text)
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            f.write(text)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
