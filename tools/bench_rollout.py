"""Rollout engines measured: the continuous engine against the static sampler (issue 20, item 6).

    # (a) the engine's scheduler replayed on length traces at the realistic mix, per chip of the
    #     config's pod, in a memory-bound model of a v5e chip, against the static sampler:
    python -m tools.bench_rollout --replay --config configs/paper_r1_1p5b.py --json out.json
    # (b) tokens/s at a skewed mix of per-row budgets, (c) at equal lengths, on the tiny model:
    python -m tools.bench_rollout --skewed --equal --json out.json
    python -m tools.bench_rollout --quick --json out.json          # every mode, smoke sizes
    python -m tools.bench_rollout --device-run                     # (b), (c) at GPU sizes

(a) Replay. A trace is one RL step's rollouts: config.prompts_per_step prompts of 64..511 tokens
(uniform, one length per prompt, shared by its config.num_samples samples) and their response
lengths from tools.scale_check.response_lengths (lognormal, median 4,000, 5% at the
config.sampling.max_new_tokens cap). Both sides see the same trace; each figure is per chip,
and the tool reports the median over --draws traces with the min-max spread.

  * static: scope_jax.sampling.generate as train() runs it on config.mesh. The rows are split
    evenly over the batch shards (train.batch_shards); the program is one SPMD program whose
    while loop stops when every row of the whole batch is done, so every chip runs
    max(length) - 1 decode steps (token 0 comes from the prefill). The step that produces
    token i attends over the cache of its phase (sampling._phase_ends, sampling.FIRST_PHASE):
    prompt bucket (sampling.prompt_bucket of the longest prompt) + phase end - 1 slots, for
    every row of the chip, finished or not. The weights it reads are the float32 params
    all-gathered over fsdp (XLA hoists the gather out of the loop; the loop reads the copies),
    still split over tensor.
  * continuous: the rows are split evenly over the rollout instances (one instance = the
    chips of config.rollout.mesh; the pod's chips / its size instances), and each instance's
    rows are replayed through scope_jax.engine.replay: the engine's own Scheduler (slots,
    page pool, admission, preemption) fed the lengths instead of a model, every row with the
    budget max_new_tokens (the scheduler does not know a row's length in advance). Weights:
    the params in the compute dtype (config.model.dtype), sharded by the model's rules on
    config.rollout.mesh.

Modelled decode time per RL step (memory-bound, as the issue's model): each decode step reads
the weights once (all params but the input embedding table, of which a lookup reads a few
rows) plus the KV it attends over (bytes per token per chip: tools.scale_check.kv_cache, KV
heads split over tensor when they divide, else replicated), at --hbm_gbps (819: a v5e).
Prefill is left out on both sides (compute-bound; the prefill tokens are reported). The RL
step waits for the slowest instance, so `modelled_decode_s` is the slowest instance's time
(the static sampler's chips all take the same time).

Shares: `useful_row_steps` = decode row-steps that produce a token / (rows or slots x decode
steps); `live_kv_reads` = KV tokens of live context attended / KV tokens read (static: the
whole phase cache of every row; continuous: the live rows' whole pages);
`decode_steps_over_longest` = decode steps / (longest row's length - 1), the longest row of
the same instance (of the whole batch for the static sampler), the worst instance of a draw.
Not modelled: a finished or empty slot's one-token read per step (the engine gives dead slots
kv_len 1), KV writes, and the host's time between blocks.

(f) The toy's own rollouts (--toy): configs/toy.py's collection batches (prompts_per_step
training prompts x num_samples, EOS on, its temperature, top-k / top-p and budget) on the toy
student, continuous vs static through rollout.engine_from_config: what decides the toy
config's rollout.engine.

(b), (c) Tokens per second on this process's device, every engine on one random Qwen3
checkpoint (tools/bench_sampling.write_checkpoint; preset "cpu": its "tiny" shape, "device":
its "100m") written by transformers: `continuous` and `static` through
scope_jax.rollout.make_engine (continuous with its defaults, or --engine-option), transformers'
continuous batching (the ContinuousBatchingManager under generate_batch, one max_new_tokens
per request) and google-tunix's Sampler in its own venv (tools/tunix_sampler_driver.py; one
budget per call, so every row runs the longest budget). tokens/s = the tokens the rows asked
for (sum of budgets) / wall seconds; rounds interleave the engines after one warm-up call each
(bench_sampling.time_interleaved) and ratios are per round against `static`. EOS is off and
decoding greedy in (b); (c) runs bench_sampling.MODES. Each run also checks that the
continuous engine's greedy tokens equal the static sampler's, and how many of the static
sampler's greedy tokens the other engines reproduce.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

V5E_HBM_GBPS = 819.0  # v5e HBM bandwidth, GB/s


# ---------------------------------------------------------------------------------------------
# (a) The replay: traces, bytes, the static sampler's cost and the engine's
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Mix:
    """The length mix of a trace: responses lognormal (median, cap_share of them at the cap),
    prompts uniform in [prompt_min, prompt_max]."""

    median: float = 4000.0
    cap_share: float = 0.05
    prompt_min: int = 64
    prompt_max: int = 511


def trace(prompts: int, samples: int, cap: int, mix: Mix, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One RL step's rollouts: (prompt lengths int [prompts * samples], response lengths int
    [same]), prompt j's samples at rows j*samples .. (j+1)*samples-1 (the samplers' order)."""
    from tools.scale_check import response_lengths

    n = prompts * samples
    lengths = response_lengths(n, median=mix.median, cap=cap, cap_share=mix.cap_share, seed=seed)
    p = np.random.default_rng(seed + 1).integers(mix.prompt_min, mix.prompt_max + 1, prompts)
    return np.repeat(p, samples), lengths


def mesh_axes(axes) -> dict[str, int]:
    """{axis: size} over scope_jax.sharding.MESH_AXES from a config's mesh (missing: 1)."""
    from scope_jax import sharding as shd

    d = axes.to_dict() if hasattr(axes, "to_dict") else dict(axes)
    unknown = set(d) - set(shd.MESH_AXES)
    if unknown or any(int(v) < 1 for v in d.values()):
        raise ValueError(f"mesh {d}: axes must be among {shd.MESH_AXES} with sizes >= 1 "
                         "(no -1: the replay has no devices to fill it from)")
    return {a: int(d.get(a, 1)) for a in shd.MESH_AXES}


def weight_bytes_per_chip(cfg, axes: dict[str, int], dtype) -> int:
    """Bytes of the student's params one chip reads per decode step: every param but the input
    embedding table (unless tied to the unembedding), in `dtype`, sharded as the model's rules
    shard it on a mesh of `axes` ({axis: size}; no devices needed)."""
    import jax

    from scope_jax import sharding as shd
    from scope_jax.models import abstract_model, hf_config

    mesh = jax.sharding.AbstractMesh(tuple(axes[a] for a in shd.MESH_AXES), shd.MESH_AXES)
    _, params, _ = abstract_model(cfg, "student", mesh)
    tied = bool(hf_config(cfg, "student").get("tie_word_embeddings", False))
    total = 0
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not tied and getattr(path[0], "key", None) == "embed_tokens":
            continue  # a lookup reads one row per token, not the table
        total += math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(dtype).itemsize
    return total


def kv_bytes_per_token(cfg, tensor: int, dtype) -> int:
    """KV-cache bytes one token of one row takes on one chip (tools.scale_check.kv_cache)."""
    from scope_jax.models import hf_config
    from tools.scale_check import kv_cache

    arch = hf_config(cfg, "student")
    return kv_cache(arch, 1, 1, tensor, np.dtype(dtype).itemsize)["bytes_per_slot_per_row"]


def static_cost(prompt_lens, lengths, *, shards: int, max_new_tokens: int,
                first_phase: int | None = None) -> dict[str, np.ndarray]:
    """The static sampler's decode work per chip (sampling.generate's rule, module docstring).

    prompt_lens, lengths: int [N] (N a multiple of `shards`; rows split in contiguous blocks).
    Returns per chip (arrays [shards]): decode_steps, useful_row_steps, row_steps, kv_live (KV
    tokens of live context attended), kv_read (KV tokens read), plus scalars prompt_bucket and
    cache_tokens (KV slots the chip holds at the last step: rows x that phase's cache).
    """
    from scope_jax import sampling

    p, n_tok = np.asarray(prompt_lens, np.int64), np.asarray(lengths, np.int64)
    if p.shape != n_tok.shape or p.ndim != 1 or len(p) % shards:
        raise ValueError(f"static_cost: {len(p)} prompts / {len(n_tok)} lengths must be one row "
                         f"each and a multiple of the {shards} batch shards")
    if n_tok.min() < 1 or n_tok.max() > max_new_tokens:
        raise ValueError(f"static_cost: lengths must be in [1, {max_new_tokens}]")
    first = sampling.FIRST_PHASE if first_phase is None else first_phase
    bucket = sampling.prompt_bucket(int(p.max()))
    ends = np.asarray(sampling._phase_ends(max_new_tokens, first))
    steps = int(n_tok.max()) - 1  # one SPMD loop for the whole batch; token 0 is the prefill's
    i = np.arange(1, steps + 1)  # the token each decode step produces
    cache = bucket + ends[np.searchsorted(ends, i, side="right")] - 1  # that step's phase cache
    rows = len(p) // shards
    decoded = n_tok - 1  # decode steps that produce a token, per row
    live = decoded * p + decoded * (decoded + 1) // 2  # sum over g = 1..L-1 of (p + g)
    per_chip = lambda x: x.reshape(shards, rows).sum(axis=1)
    return {"decode_steps": np.full(shards, steps), "useful_row_steps": per_chip(decoded),
            "row_steps": np.full(shards, rows * steps), "kv_live": per_chip(live),
            "kv_read": np.full(shards, rows * int(cache.sum())), "prompt_bucket": bucket,
            "cache_tokens": rows * int(cache[-1] if steps else bucket + ends[0] - 1)}


@dataclasses.dataclass(frozen=True)
class Layout:
    """The continuous engine's rollout layout at a config: `chips` per instance (an engine
    group: rollout.rollout_tensor(cfg) chips), `instances` on the pod, and the scheduler's
    settings (config.rollout)."""

    axes: dict
    chips: int
    instances: int
    slots: int
    page_size: int
    block: int
    num_pages: int
    kv_tokens_per_chip: int
    order: str
    prefill_tokens: int | None


def layout(cfg) -> Layout:
    """The continuous engine's layout from config.rollout (mesh, slots, page_size, block,
    kv_tokens_per_chip, order, prefill_tokens); the pod's chips are config.mesh's."""
    from scope_jax import rollout

    r = cfg.get("rollout")
    need = ("mesh", "slots", "page_size", "block", "kv_tokens_per_chip")
    missing = [k for k in need if r is None or k not in r]
    if missing:
        raise ValueError(f"config.rollout lacks {['rollout.' + k for k in missing]}: the replay "
                         "needs the continuous engine's settings")
    chips = rollout.rollout_tensor(cfg)
    pod = math.prod(mesh_axes(cfg.mesh).values())
    if chips < 1 or pod % chips:
        raise ValueError(f"config.rollout.mesh.tensor={chips} does not divide the pod's {pod} "
                         "chips (config.mesh)")
    page = int(r.page_size)
    return Layout(axes={"data": 1, "fsdp": 1, "tensor": chips}, chips=chips,
                  instances=pod // chips, slots=int(r.slots), page_size=page, block=int(r.block),
                  num_pages=int(r.kv_tokens_per_chip) // page,
                  kv_tokens_per_chip=int(r.kv_tokens_per_chip), order=str(r.get("order", "longest")),
                  prefill_tokens=int(r.prefill_tokens) if r.get("prefill_tokens") else None)


def engine_cost(prompt_lens, lengths, lay: Layout, *, max_new_tokens: int) -> dict[str, np.ndarray]:
    """The continuous engine's decode work per instance (arrays [instances]): each instance's
    contiguous block of rows replayed through scope_jax.engine.replay with every row's budget
    max_new_tokens. Keys as static_cost's, plus longest (the instance's longest row),
    prefill_tokens, preemptions."""
    from scope_jax import engine, rollout

    p, n_tok = np.asarray(prompt_lens), np.asarray(lengths)
    if len(p) % lay.instances:
        raise ValueError(f"engine_cost: {len(p)} rows do not split evenly over "
                         f"{lay.instances} rollout instances")
    rows = len(p) // lay.instances
    slots = min(lay.slots, rollout._pow2(rows))  # the engine's own rule (ContinuousEngine.generate)
    keys = ("decode_steps", "useful_row_steps", "row_steps", "kv_live", "kv_read",
            "prefill_tokens", "preemptions")
    out = {k: np.zeros(lay.instances, np.int64) for k in keys + ("longest",)}
    for k in range(lay.instances):
        sl = slice(k * rows, (k + 1) * rows)
        s = engine.replay(p[sl].tolist(), n_tok[sl].tolist(), [max_new_tokens] * rows,
                          slots=slots, num_pages=lay.num_pages, page_size=lay.page_size,
                          block=lay.block, order=lay.order, prefill_tokens=lay.prefill_tokens)
        for key in keys:
            out[key][k] = getattr(s, key)
        out["longest"][k] = n_tok[sl].max()
    return out


def _spread(x) -> dict:
    x = np.asarray(x, float)
    return {"median": float(np.median(x)), "min": float(x.min()), "max": float(x.max())}


def replay_report(cfg, *, draws: int, mix: Mix, hbm_gbps: float = V5E_HBM_GBPS,
                  seed: int = 0) -> dict:
    """(a): static vs continuous over `draws` traces at `mix` (module docstring); the headline
    keys are medians over the draws, with their min-max under '<key>_range'."""
    import jax.numpy as jnp

    from scope_jax import rollout

    m = int(cfg.sampling.max_new_tokens)
    static_axes, lay = mesh_axes(cfg.mesh), layout(cfg)
    rows_per_instance = int(cfg.prompts_per_step) * int(cfg.num_samples) // lay.instances
    shards = math.prod(static_axes[a] for a in ("data", "fsdp"))  # train.batch_shards' axes
    compute, param = jnp.dtype(cfg.model.dtype), jnp.dtype(cfg.model.param_dtype)
    # static: the f32 params gathered over fsdp, still split over tensor; cache in compute dtype
    w_static = weight_bytes_per_chip(cfg, dict(static_axes, data=1, fsdp=1), param)
    kv_static = kv_bytes_per_token(cfg, static_axes["tensor"], compute)
    w_engine = weight_bytes_per_chip(cfg, lay.axes, compute)
    kv_engine = kv_bytes_per_token(cfg, lay.axes["tensor"], compute)
    bw = hbm_gbps * 1e9
    per_draw, cache_tokens = [], 0
    for d in range(draws):
        p, n_tok = trace(int(cfg.prompts_per_step), int(cfg.num_samples), m, mix, seed + d)
        st = static_cost(p, n_tok, shards=shards, max_new_tokens=m)
        en = engine_cost(p, n_tok, lay, max_new_tokens=m)
        cache_tokens = max(cache_tokens, st["cache_tokens"])
        st_s = (st["decode_steps"] * w_static + st["kv_read"] * kv_static) / bw
        en_s = (en["decode_steps"] * w_engine + en["kv_read"] * kv_engine) / bw
        per_draw.append({
            "seed": seed + d, "longest": int(n_tok.max()),
            "static_useful_row_steps": st["useful_row_steps"].sum() / st["row_steps"].sum(),
            "static_useful_row_steps_worst_chip": float(np.min(st["useful_row_steps"] / st["row_steps"])),
            "static_live_kv_reads": st["kv_live"].sum() / st["kv_read"].sum(),
            "static_decode_steps_over_longest": float(np.max(
                st["decode_steps"] / np.maximum(1, n_tok.max() - 1))),
            "static_modelled_decode_s": float(st_s.max()),
            "static_kv_read_bytes_per_chip": float(st["kv_read"].max() * kv_static),
            "useful_row_steps": en["useful_row_steps"].sum() / en["row_steps"].sum(),
            "useful_row_steps_worst_instance": float(np.min(en["useful_row_steps"] / en["row_steps"])),
            "live_kv_reads": en["kv_live"].sum() / en["kv_read"].sum(),
            "live_kv_reads_worst_instance": float(np.min(en["kv_live"] / en["kv_read"])),
            "decode_steps_over_longest": float(np.max(
                en["decode_steps"] / np.maximum(1, en["longest"] - 1))),
            "modelled_decode_s": float(en_s.max()),
            "modelled_decode_s_median_instance": float(np.median(en_s)),
            "kv_read_bytes_per_chip": float(en["kv_read"].max() * kv_engine),
            "prefill_tokens_per_instance": float(en["prefill_tokens"].max()),
            "preemptions": int(en["preemptions"].sum()),
            "speedup": float(st_s.max() / en_s.max()),
        })
    keys = [k for k in per_draw[0] if k not in ("seed",)]
    report = {}
    for k in keys:
        s = _spread([r[k] for r in per_draw])
        report[k] = s["median"]
        report[k + "_range"] = [s["min"], s["max"]]
    report.update({
        "draws": draws, "mix": dataclasses.asdict(mix), "rollouts": int(cfg.prompts_per_step) *
        int(cfg.num_samples), "max_new_tokens": m, "hbm_gbps": hbm_gbps,
        "static": {"mesh": static_axes, "batch_shards": shards, "rows_per_chip":
                   int(cfg.prompts_per_step) * int(cfg.num_samples) // shards,
                   "weight_bytes_per_step": w_static, "kv_bytes_per_token": kv_static,
                   "kv_cache_bytes_per_chip": cache_tokens * kv_static},
        "continuous": {**dataclasses.asdict(lay), "rows_per_instance": rows_per_instance,
                       "slots_used": min(lay.slots, rollout._pow2(rows_per_instance)),
                       "weight_bytes_per_step": w_engine,
                       "kv_bytes_per_token": kv_engine,
                       "kv_pool_bytes_per_chip": lay.num_pages * lay.page_size * kv_engine},
        "per_draw": per_draw})
    return report


# ---------------------------------------------------------------------------------------------
# (b), (c) Tokens per second on one device: the engines on the same checkpoint, interleaved
# ---------------------------------------------------------------------------------------------

# Sizes: rows and length mix of (b), batch x new tokens of (c) (tools/bench_sampling.py's
# setting for "tiny"), the model (bench_sampling.CONFIGS), interleaved rounds.
PRESETS = {
    "cpu": dict(model="tiny", rows=128, median=64, cap=512, prompt_min=8, prompt_max=64,
                equal_batch=32, equal_prompt=32, equal_tokens=128, repeats=5, draws=20),
    "quick": dict(model="tiny", rows=16, median=16, cap=64, prompt_min=4, prompt_max=16,
                  equal_batch=4, equal_prompt=8, equal_tokens=16, repeats=1, draws=1),
    # an H200: the ~100M model; (b) at 4x the CPU rows
    "device": dict(model="100m", rows=512, median=64, cap=512, prompt_min=8, prompt_max=64,
                   equal_batch=64, equal_prompt=32, equal_tokens=128, repeats=3, draws=20),
}


def skewed_mix(rows: int, median: float, cap: int, prompt_min: int, prompt_max: int,
               vocab: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """(b)'s workload: `rows` random prompts of prompt_min..prompt_max ids in [3, vocab) and
    per-row budgets lognormal with this median, 5% at `cap`
    (tools.scale_check.response_lengths)."""
    from tools.scale_check import response_lengths

    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, int(n)).tolist()
               for n in rng.integers(prompt_min, prompt_max + 1, rows)]
    return prompts, response_lengths(rows, median=median, cap=cap, cap_share=0.05,
                                     seed=seed).tolist()


def _ratios(base: list[float], new: list[float]) -> dict:
    """Per-round base time / new time (> 1: new is faster): median and range."""
    r = np.asarray(base) / np.asarray(new)
    return {"median": float(np.median(r)), "min": float(r.min()), "max": float(r.max())}


class HFContinuous:
    """transformers' continuous batching (ContinuousBatchingManager, the engine under
    generate_batch), one manager kept across calls, with a max_new_tokens per request
    (generate_batch itself takes one for all), EOS off, greedy; on CUDA when torch sees a GPU
    and jax runs on one too, else on the CPU."""

    def __init__(self, path: str, cap: int, rows: int, longest_prompt: int, page_size: int = 16):
        import jax
        import torch
        import transformers
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32).eval()
        if jax.default_backend() == "gpu" and torch.cuda.is_available():
            self.model = self.model.to("cuda")
        self.device = str(next(self.model.parameters()).device)
        gen = transformers.GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0,
                                            max_new_tokens=cap)
        # A cache for every row at its whole budget, sized here: left to itself the manager
        # sizes its cache from the free memory (on a CPU, over 10 GB of host RAM).
        blocks = rows * -(-(longest_prompt + cap) // page_size)
        self.manager = self.model.init_continuous_batching(
            generation_config=gen, continuous_batching_config=ContinuousBatchingConfig(
                page_size=page_size, num_blocks=blocks))
        self.manager.start()
        self.calls = 0

    def generate(self, prompts, budgets) -> list[list[int]]:
        """Every row's generated ids (len budgets[i]), in input order."""
        self.calls += 1
        ids = [self.manager.add_request(p, request_id=f"c{self.calls}_{i}", max_new_tokens=int(b),
                                        eos_token_id=-1)
               for i, (p, b) in enumerate(zip(prompts, budgets))]
        done = {}
        with self.torch.no_grad():
            while len(done) < len(ids):
                r = self.manager.get_result(timeout=1)
                if r is not None and r.is_finished():
                    if r.error is not None:
                        raise RuntimeError(f"transformers request {r.request_id}: {r.error}")
                    done[r.request_id] = r.generated_tokens
                elif r is None and not self.manager.is_running():
                    raise RuntimeError("transformers' continuous batching thread stopped")
        return [list(done[i]) for i in ids]

    def close(self):
        self.manager.stop(block=True, timeout=30)


class TunixDriver:
    """tools/tunix_sampler_driver.py in tunix's own venv, one request per call (see there)."""

    def __init__(self, python: str, path: str):
        import subprocess

        here = os.path.dirname(os.path.abspath(__file__))
        env = dict(os.environ, PYTHONPATH="")  # tunix's venv only, not this checkout
        self.proc = subprocess.Popen([python, os.path.join(here, "tunix_sampler_driver.py"),
                                      "--checkpoint", path], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=sys.stderr, text=True, env=env)

    def generate(self, prompts, steps: int, tokens: bool = False) -> dict:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_steps": int(steps),
                                          "tokens": tokens}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the tunix driver exited (code {self.proc.wait()}); its error "
                               "is above")
        return json.loads(line)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def _jax_engines(model, cap: int, options: dict, **settings):
    """{"static", "continuous"}: scope_jax.rollout engines on `model`, EOS off; `options` go
    to make_engine for the continuous one (its defaults when empty)."""
    from scope_jax import rollout

    s = rollout.Settings(max_new_tokens=cap, stop_ids=(), pad_id=0, **settings)
    return {"static": rollout.make_engine("static", model, s),
            "continuous": rollout.make_engine("continuous", model, s, **options)}


def _run_jax(engine, prompts, budgets=None, key=None):
    import jax

    out = engine.generate(prompts, key=key, max_new_tokens=budgets)
    jax.block_until_ready(out.tokens)
    return out


def _same_greedy(a, b) -> bool:
    """Two SamplerOutputs hold the same lengths and the same tokens within them (their token
    arrays may be of different widths: the static engine's is the largest per-row budget)."""
    la, lb = np.asarray(a.lengths), np.asarray(b.lengths)
    ta, tb = np.asarray(a.tokens), np.asarray(b.tokens)
    return bool(np.array_equal(la, lb) and all(np.array_equal(ta[i, :n], tb[i, :n])
                                               for i, n in enumerate(la)))


def _agreement(static_out, rows: list[list[int]]) -> float:
    """Share of the static sampler's greedy tokens another engine reproduced, position by
    position (rows[i]: its tokens of row i, at least lengths[i] of them)."""
    toks, lens = np.asarray(static_out.tokens), np.asarray(static_out.lengths)
    same = sum(int(np.sum(toks[i, :n] == np.asarray(rows[i][:n]))) for i, n in enumerate(lens))
    return same / max(1, int(lens.sum()))


def skewed_bench(p: dict, *, repeats: int, tunix_python: str, options: dict,
                 peers: bool = True) -> dict:
    """(b): tokens/s at a skewed mix of per-row budgets (EOS off, greedy): continuous, static,
    transformers' continuous batching and tunix's sampler (when its venv is there), on the same
    random checkpoint; interleaved rounds after one warm-up call each."""
    import jax

    from scope_jax.models import load_hf
    from tools.bench_sampling import CONFIGS, time_interleaved, write_checkpoint

    # rope theta 1e6 (Qwen3's own): tunix 0.1.7's Qwen3 ignores the config's theta and uses it
    spec = dict(CONFIGS[p["model"]]["model"], rope_theta=1e6)
    prompts, budgets = skewed_mix(p["rows"], p["median"], p["cap"], p["prompt_min"],
                                  p["prompt_max"], spec["vocab_size"])
    tokens = int(sum(budgets))
    out = {"model": p["model"], "rows": p["rows"], "median": p["median"], "cap": p["cap"],
           "prompt_len": [p["prompt_min"], p["prompt_max"]], "tokens": tokens,
           "longest": int(max(budgets)), "repeats": repeats}
    with tempfile.TemporaryDirectory() as tmp:
        out["params"] = write_checkpoint(tmp, spec)
        model = load_hf(tmp)
        eng = _jax_engines(model, p["cap"], options, temperature=0.0)
        fns = {"continuous": lambda: _run_jax(eng["continuous"], prompts, budgets),
               "static": lambda: _run_jax(eng["static"], prompts, budgets)}
        hf, tunix, skipped = None, None, {}
        if peers:
            hf = HFContinuous(tmp, p["cap"], len(prompts), max(len(q) for q in prompts))
            fns["transformers_generate_batch"] = lambda: hf.generate(prompts, budgets)
        if not peers:
            skipped["transformers_generate_batch"] = skipped["tunix"] = "--no-peers"
        elif not os.path.exists(tunix_python):
            skipped["tunix"] = f"no tunix venv at {tunix_python} (--tunix-python)"
        elif jax.default_backend() != "cpu":
            skipped["tunix"] = (f"its venv holds a CPU jax; this run is on "
                                f"{jax.default_backend()}")
        else:
            tunix = TunixDriver(tunix_python, tmp)
            # tunix has one budget per call: every row decodes the longest budget
            fns["tunix"] = lambda: tunix.generate(prompts, max(budgets))
        try:
            first, med, times = time_interleaved(list(fns.values()), repeats)
            static_out = _run_jax(eng["static"], prompts, budgets)
            cont_out = _run_jax(eng["continuous"], prompts, budgets)
            agree = {"continuous": _same_greedy(cont_out, static_out)}
            if hf is not None:
                agree["transformers_generate_batch"] = _agreement(static_out,
                                                                  hf.generate(prompts, budgets))
            if tunix is not None:
                agree["tunix"] = _agreement(static_out, tunix.generate(prompts, max(budgets),
                                                                       tokens=True)["tokens"])
        finally:
            if hf is not None:
                hf.close()
            if tunix is not None:
                tunix.close()
    names = list(fns)
    ref = names.index("static")
    out["engines"] = {
        n: {"tokens_per_s": tokens / med[k], "median_s": med[k], "first_call_s": first[k],
            "over_static": _ratios(times[ref], times[k])} for k, n in enumerate(names)}
    out["skipped"] = skipped
    out["transformers_device"] = None if hf is None else hf.device
    out["greedy_continuous_equals_static"] = agree.pop("continuous")
    out["greedy_agreement_with_static"] = agree
    return out


def equal_bench(p: dict, *, repeats: int, options: dict) -> dict:
    """(c): continuous vs static at equal lengths (tools/bench_sampling.py's setting: every row
    the same prompt length and budget, EOS off), greedy and sampled (bench_sampling.MODES)."""
    import jax

    from scope_jax.models import load_hf
    from tools.bench_sampling import CONFIGS, MODES, time_interleaved, write_checkpoint

    spec = CONFIGS[p["model"]]["model"]
    b, n, m = p["equal_batch"], p["equal_prompt"], p["equal_tokens"]
    prompts = np.random.default_rng(0).integers(3, spec["vocab_size"], size=(b, n)).tolist()
    out = {"model": p["model"], "batch": b, "prompt_len": n, "new_tokens": m, "repeats": repeats,
           "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, spec)
        model = load_hf(tmp)
    for mode, kw in MODES.items():
        eng = _jax_engines(model, m, options, **kw)
        key = jax.random.key(0)
        fns = [lambda e=eng[k]: _run_jax(e, prompts, key=key) for k in ("continuous", "static")]
        first, med, times = time_interleaved(fns, repeats)
        same = _same_greedy(*(f() for f in fns))
        out["modes"][mode] = {
            "continuous_tokens_per_s": b * m / med[0], "static_tokens_per_s": b * m / med[1],
            "continuous_over_static": _ratios(times[1], times[0]),
            "first_call_s": {"continuous": first[0], "static": first[1]},
            "same_tokens": same}
    return out


# ---------------------------------------------------------------------------------------------
# The tool
# ---------------------------------------------------------------------------------------------

def toy_bench(*, repeats: int, options: dict, toy_dir: str = "runs/toy", steps: int = 3) -> dict:
    """(f) The toy's own rollouts: configs/toy.py's collection (prompts_per_step training
    prompts x num_samples, its rollout temperature, top-k / top-p, budget and stop ids: EOS on)
    on the toy student (built under toy_dir if missing), through rollout.engine_from_config
    with rollout.engine static and continuous (its config options, --engine-option over
    them), `steps` different prompt batches per round; tokens/s = tokens generated / seconds."""
    import jax
    from transformers import AutoTokenizer

    from configs import toy as toy_config
    from scope_jax import rollout, toy
    from scope_jax.models import load_hf
    from tools.bench_sampling import time_interleaved

    paths = toy.build_toy(toy_dir)
    cfg = toy_config.get_config("scope")
    model = load_hf(paths["student"])
    tokenizer = AutoTokenizer.from_pretrained(paths["student"])
    settings = rollout.settings_from_config(cfg, model_config=model.config, tokenizer=tokenizer)
    with open(paths["train"]) as f:
        problems = [json.loads(line)["problem"] for line in f]
    n = int(cfg.prompts_per_step)
    ids = tokenizer([toy.prompt_text(p, tokenizer) for p in problems[:steps * n]],
                    add_special_tokens=False)["input_ids"]
    batches = [ids[i * n:(i + 1) * n] for i in range(steps)]
    cfg.rollout.engine = "continuous"
    cont = {**rollout.engine_options(cfg), **options}
    engines = {"continuous": rollout.make_engine("continuous", model, settings, **cont),
               "static": rollout.make_engine("static", model, settings)}
    tokens = {k: 0 for k in engines}

    def run(kind):
        def fn():
            total = 0
            for i, prompts in enumerate(batches):
                out = engines[kind].generate(prompts, num_samples=int(cfg.num_samples),
                                             key=jax.random.key(i))
                total += int(np.asarray(out.lengths).sum())
            tokens[kind] = total
            return out
        return fn

    first, med, times = time_interleaved([run("continuous"), run("static")], repeats)
    outs = {k: run(k)() for k in engines}
    same = bool(np.array_equal(np.asarray(outs["continuous"].tokens),
                               np.asarray(outs["static"].tokens)))
    return {"config": "configs/toy.py", "prompts_per_step": n, "num_samples": int(cfg.num_samples),
            "steps": steps, "repeats": repeats, "max_new_tokens": settings.max_new_tokens,
            "temperature": settings.temperature, "tokens": tokens["static"],
            "mean_length": tokens["static"] / (steps * n * int(cfg.num_samples)),
            "continuous_options": cont,
            "engines": {k: {"tokens_per_s": tokens[k] / med[i], "median_s": med[i],
                            "first_call_s": first[i]} for i, k in enumerate(("continuous", "static"))},
            "continuous_over_static": _ratios(times[1], times[0]),
            "sampled_tokens_equal": same}


def _literal(item: str, flag: str) -> tuple[str, object]:
    """("key", value) from "key=value"; value a Python literal, else the string itself."""
    import ast

    key, eq, value = item.partition("=")
    if not eq or not key:
        raise ValueError(f"{flag} {item!r}: expected key=value")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def load_config(spec: str, overrides: list[str] = ()):
    """A config file's get_config(variant) from "path[:variant]" (as tools/train.py's --config),
    with "key=value" overrides (flattened keys, Python literals) applied."""
    import importlib.util

    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {spec}: no file {path}")
    module_spec = importlib.util.spec_from_file_location("bench_rollout_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cfg = module.get_config(variant) if variant else module.get_config()
    cfg.update_from_flattened_dict(dict(_literal(item, "--set") for item in overrides))
    return cfg


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/paper_r1_1p5b.py",
                    help="experiment config file[:variant] of the replay")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. --set rollout.slots=16 (repeatable)")
    ap.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                    help="make_engine option of the continuous engine in (b), (c), e.g. "
                         "--engine-option order='longest' (repeatable; default: its defaults)")
    ap.add_argument("--replay", action="store_true", help="(a) the scheduler replay")
    ap.add_argument("--skewed", action="store_true", help="(b) tokens/s at a skewed mix")
    ap.add_argument("--equal", action="store_true", help="(c) tokens/s at equal lengths")
    ap.add_argument("--toy", action="store_true",
                    help="(f) the toy's own rollouts (configs/toy.py, the toy student; builds "
                         "runs/toy if missing)")
    ap.add_argument("--quick", action="store_true", help="smoke-test sizes (< 1 minute on a CPU)")
    ap.add_argument("--device-run", action="store_true",
                    help="(b), (c) at sizes meant for a GPU (the ~100M model; its time on an "
                         "H200 is not measured yet)")
    ap.add_argument("--draws", type=int, default=0, help="replay traces (default: the preset's)")
    ap.add_argument("--repeats", type=int, default=0,
                    help="interleaved rounds of (b), (c) (default: the preset's)")
    ap.add_argument("--rows", type=int, default=0, help="rows of (b) (default: the preset's)")
    ap.add_argument("--hbm-gbps", type=float, default=V5E_HBM_GBPS,
                    help="HBM bandwidth of the modelled chip, GB/s")
    ap.add_argument("--tunix-python", default="/work/tunix-venv/bin/python",
                    help="python of a venv with google-tunix 0.1.7 (skipped when missing)")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch.set_num_threads for transformers (1: on a shared CPU 2+ "
                         "threads collapse)")
    ap.add_argument("--no-peers", action="store_true",
                    help="(b) without transformers and tunix (the project's engines only)")
    ap.add_argument("--json", default="", help="also write the report to this file")
    a = ap.parse_args(argv)
    if a.quick and a.device_run:
        ap.error("--quick and --device-run are two presets: pick one")
    return a


def machine() -> dict:
    """Where the numbers come from: scope_jax.toy.machine_info + the jax device and the date."""
    import jax

    from scope_jax import toy

    info = toy.machine_info()
    dev = jax.devices()[0]
    return {**info, "device": f"{dev.platform}: {dev.device_kind} x{jax.device_count()}",
            "line": toy.format_machine(info), "load_average": os.getloadavg()[0],
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _print_replay(r: dict) -> None:
    c, s = r["continuous"], r["static"]
    print(f"\n== (a) replay: {r['rollouts']} rollouts, {r['draws']} draws; static: "
          f"{s['rows_per_chip']} rows/chip on mesh {s['mesh']}; continuous: {c['instances']} "
          f"instances of {c['chips']} chips, {c['rows_per_instance']} rows each, {c['slots_used']} "
          f"slots, a pool of {c['kv_tokens_per_chip']} tokens, pages of {c['page_size']}, blocks of {c['block']} (median over draws, [range])")
    print("| per chip | static | continuous |\n|---|---|---|")
    for label, key in (("useful decode row-steps", "useful_row_steps"),
                       ("live share of KV reads", "live_kv_reads"),
                       ("decode steps / longest row's", "decode_steps_over_longest"),
                       ("modelled decode s per RL step", "modelled_decode_s")):
        sv, sr, cv, cr = (r["static_" + key], r["static_" + key + "_range"], r[key],
                          r[key + "_range"])
        print(f"| {label} | {sv:.3g} [{sr[0]:.3g}-{sr[1]:.3g}] | {cv:.3g} [{cr[0]:.3g}-{cr[1]:.3g}] |")
    print(f"| weights read per step (GB) | {s['weight_bytes_per_step'] / 1e9:.3g} | "
          f"{c['weight_bytes_per_step'] / 1e9:.3g} |")
    print(f"| KV memory per chip (GiB) | {s['kv_cache_bytes_per_chip'] / 2**30:.3g} | "
          f"{c['kv_pool_bytes_per_chip'] / 2**30:.3g} (pool) |")
    print(f"speed-up (slowest instance, what the RL step waits for): {r['speedup']:.2f}x "
          f"[{r['speedup_range'][0]:.2f}-{r['speedup_range'][1]:.2f}]; median instance "
          f"{r['modelled_decode_s_median_instance']:.1f} s")


def _print_tps(name: str, r: dict) -> None:
    if name == "skewed":
        print(f"\n== (b) skewed mix: {r['rows']} rows, budgets lognormal median {r['median']} cap "
              f"{r['cap']} ({r['tokens']} tokens, longest {r['longest']}), model {r['model']}, "
              f"EOS off, greedy, {r['repeats']} interleaved rounds")
        print("| engine | tokens/s | over static (median [range]) | first call s |\n|---|---|---|---|")
        for n, e in r["engines"].items():
            o = e["over_static"]
            print(f"| {n} | {e['tokens_per_s']:.0f} | {o['median']:.2f}x [{o['min']:.2f}-"
                  f"{o['max']:.2f}] | {e['first_call_s']:.1f} |")
        for n, why in r["skipped"].items():
            print(f"| {n} | - | not run: {why} | - |")
        print(f"greedy tokens continuous == static: {r['greedy_continuous_equals_static']}; "
              "share of static's greedy tokens reproduced: " + ", ".join(
                  f"{k} {v:.1%}" for k, v in r["greedy_agreement_with_static"].items()))
    else:
        print(f"\n== (c) equal lengths: batch {r['batch']} x prompt {r['prompt_len']} x "
              f"{r['new_tokens']} new tokens, model {r['model']}, {r['repeats']} rounds")
        print("| mode | continuous tok/s | static tok/s | continuous / static | same tokens |"
              "\n|---|---|---|---|---|")
        for mode, e in r["modes"].items():
            o = e["continuous_over_static"]
            print(f"| {mode} | {e['continuous_tokens_per_s']:.0f} | {e['static_tokens_per_s']:.0f} "
                  f"| {o['median']:.2f}x [{o['min']:.2f}-{o['max']:.2f}] | {e['same_tokens']} |")


def _print_toy(r: dict) -> None:
    print(f"\n== (f) the toy's rollouts: {r['config']}, {r['steps']} batches of "
          f"{r['prompts_per_step']} prompts x {r['num_samples']} samples, temperature "
          f"{r['temperature']}, budget {r['max_new_tokens']}, EOS on (mean length "
          f"{r['mean_length']:.1f}), {r['repeats']} rounds; continuous {r['continuous_options']}")
    print("| engine | tokens/s | first call s |\n|---|---|---|")
    for n, e in r["engines"].items():
        print(f"| {n} | {e['tokens_per_s']:.0f} | {e['first_call_s']:.1f} |")
    o = r["continuous_over_static"]
    print(f"continuous / static: {o['median']:.2f}x [{o['min']:.2f}-{o['max']:.2f}]; sampled "
          f"tokens equal: {r['sampled_tokens_equal']}")


def main(argv=None) -> dict:
    """Runs the modes asked for (none: all; with --device-run: (b) and (c)); returns the report
    (the replay's keys at the top level, then "skewed", "equal")."""
    a = parse_args(argv)
    if not a.device_run:  # the CPU sizes measure the CPU even where an accelerator is present
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    modes = [m for m in ("replay", "skewed", "equal", "toy") if getattr(a, m)]
    modes = modes or (["skewed", "equal"] if a.device_run else ["replay", "skewed", "equal"])
    preset = "quick" if a.quick else "device" if a.device_run else "cpu"
    p = dict(PRESETS[preset])
    p["rows"] = a.rows or p["rows"]
    repeats, draws = a.repeats or p["repeats"], a.draws or p["draws"]
    options = dict(_literal(item, "--engine-option") for item in a.engine_option)
    if "skewed" in modes or "equal" in modes:
        import torch

        torch.set_num_threads(a.torch_threads)
    info = machine()
    report = {"command": "python -m tools.bench_rollout " + " ".join(
        sys.argv[1:] if argv is None else argv), "machine": info, "modes": modes,
        "preset": preset, "torch_threads": a.torch_threads, "engine_options": options}
    print(f"{info['date']}; {info['line']}; device {info['device']}; load average "
          f"{info['load_average']:.1f}; torch threads {a.torch_threads}", flush=True)
    t0 = time.perf_counter()
    if "replay" in modes:
        r = replay_report(load_config(a.config, a.set), draws=draws, mix=Mix(), hbm_gbps=a.hbm_gbps)
        report.update(config=a.config, **r)  # headline keys at the top (the checks' interface)
        _print_replay(r)
    if "skewed" in modes:
        report["skewed"] = skewed_bench(p, repeats=repeats, tunix_python=a.tunix_python,
                                        options=options, peers=not a.no_peers)
        _print_tps("skewed", report["skewed"])
    if "equal" in modes:
        report["equal"] = equal_bench(p, repeats=repeats, options=options)
        _print_tps("equal", report["equal"])
    if "toy" in modes:
        report["toy"] = toy_bench(repeats=repeats, options=options)
        _print_toy(report["toy"])
    report["wall_s"] = time.perf_counter() - t0
    if a.json:
        with open(a.json, "w") as f:
            f.write(json.dumps(report, indent=1, default=float))
    print(f"\nwall {report['wall_s']:.0f} s" + (f"; report in {a.json}" if a.json else ""))
    return report


if __name__ == "__main__":
    main()
