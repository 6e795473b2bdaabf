"""Rollout throughput: scope_jax.sampling.generate vs transformers (PyTorch) generate.

Both run the same random Qwen3 checkpoint (written here with transformers' save_pretrained and
loaded by each side), the same batch of prompts and the same number of new tokens: EOS is
disabled on both sides so every row runs the full budget and the token counts match. Times are
wall-clock over `--repeats` runs after one warm-up run; the JAX warm-up (trace + compile + one
run) is reported on its own line. transformers runs with its KV cache (use_cache=True).

    .venv/bin/python tools/bench_sampling.py                  # tiny (batch 32 x 128) and ~100M
    .venv/bin/python tools/bench_sampling.py --configs tiny --modes greedy --repeats 5
    .venv/bin/python tools/bench_sampling.py --configs tiny --early-eos  # budget 4096 vs 64
    # against another version of the sampler, in the same process on the same model:
    .venv/bin/python tools/bench_sampling.py --configs tiny --baseline ../main/scope_jax/sampling.py
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time

import numpy as np

CONFIGS = {
    # the tests' tiny shape (tests/tiny_hf.py): 2 layers, hidden 64, GQA 4/2 heads, vocab 160
    "tiny": dict(model=dict(vocab_size=160, hidden_size=64, intermediate_size=96,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16),
                 batch=32, prompt_len=32, new_tokens=128),
    # ~100M parameters (24.6M of them the tied 32k x 768 embedding)
    "100m": dict(model=dict(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                            num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                            head_dim=64),
                 batch=8, prompt_len=32, new_tokens=64),
}
MODES = {"greedy": dict(temperature=0.0),
         "sample": dict(temperature=0.6, top_k=20, top_p=0.95)}  # the paper's eval settings


def write_checkpoint(path: str, model_kw: dict) -> int:
    """Saves a seeded random Qwen3 (float32, tied embeddings) to path; returns its size."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(max_position_embeddings=4096, tie_word_embeddings=True,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0, **model_kw)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # larger than the default init so the logits are not near-uniform
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def time_interleaved(fns, repeats: int) -> tuple[list[float], list[float], list[list[float]]]:
    """Times each of `fns` once as warm-up, then `repeats` rounds calling them in turn (so a
    load change on a shared machine hits both sides alike). Returns (first-call seconds,
    median seconds, every round's seconds) per function."""
    first, times = [], [[] for _ in fns]
    for fn in fns:
        t0 = time.perf_counter()
        fn()
        first.append(time.perf_counter() - t0)
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return first, [float(np.median(ts)) for ts in times], times


def load_baseline(path: str):
    """The `generate` of another sampling.py (e.g. main's), imported under its own name so
    both versions run in this process on the same model."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline_sampling", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module.generate


def paired_ratio(base: list[float], new: list[float]) -> str:
    """Median and range over rounds of base time / new time (> 1: new is faster)."""
    r = np.asarray(base) / np.asarray(new)
    return f"{np.median(r):.2f}x (rounds {r.min():.2f}-{r.max():.2f}x)"


def bench(name: str, spec: dict, modes: list[str], repeats: int, batch: int | None,
          new_tokens: int | None, baseline=None, repetition_penalty: float = 1.0) -> list[tuple]:
    import jax
    import torch
    import transformers

    from scope_jax.models import load_hf
    from scope_jax.sampling import generate

    batch = batch or spec["batch"]
    new_tokens = new_tokens or spec["new_tokens"]
    prompt_len = spec["prompt_len"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        n_params = write_checkpoint(tmp, spec["model"])
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        model = load_hf(tmp)
    vocab = spec["model"]["vocab_size"]
    prompts = np.random.default_rng(0).integers(3, vocab, size=(batch, prompt_len))
    print(f"\n== {name}: {n_params / 1e6:.1f}M params, batch {batch}, prompt {prompt_len}, "
          f"{new_tokens} new tokens, torch threads {torch.get_num_threads()}, "
          f"jax devices {jax.devices()}, load average {os.getloadavg()[0]:.1f}, repetition "
          f"penalty {repetition_penalty}")
    hf.generation_config.eos_token_id = None  # run the full budget
    penalty = {} if repetition_penalty == 1.0 else dict(repetition_penalty=repetition_penalty)
    for mode in modes:
        kw = dict(MODES[mode], **penalty)

        def run_jax(generate=generate):
            out = generate(model, prompts.tolist(), max_new_tokens=new_tokens,
                           key=jax.random.key(0), **kw)
            jax.block_until_ready(out.tokens)
            assert out.tokens.shape == (batch, new_tokens) and bool(out.response_mask.all())
            return out

        def run_hf():
            ids = torch.as_tensor(prompts)
            hf_kw = (dict(do_sample=False) if kw["temperature"] == 0 else
                     dict(do_sample=True, temperature=kw["temperature"], top_k=kw["top_k"],
                          top_p=kw["top_p"])) | penalty
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), use_cache=True,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  eos_token_id=None, pad_token_id=0, **hf_kw)
            assert out.shape == (batch, prompt_len + new_tokens), out.shape
            return out

        fns = [run_jax, run_hf] + ([lambda: run_jax(baseline)] if baseline else [])
        first, med, times = time_interleaved(fns, repeats)
        (jax_first, hf_first), (jax_t, hf_t) = first[:2], med[:2]
        if baseline:
            new, base = run_jax(), run_jax(baseline)
            print(f"[{mode}] baseline: {batch * new_tokens / med[2]:9.0f} tok/s ({med[2]:.3f} "
                  f"s/run; first call {first[2]:.2f} s); speed-up over it "
                  f"{paired_ratio(times[2], times[0])}; tokens equal: "
                  f"{np.array_equal(new.tokens, base.tokens)}, max |logprobs difference| "
                  f"{np.max(np.abs(np.asarray(new.logprobs) - np.asarray(base.logprobs))):.1e}")
        if mode == "greedy":  # same checkpoint, so the greedy tokens should agree too
            same = np.mean(np.asarray(run_jax().tokens) ==
                           run_hf()[:, prompt_len:].numpy())
            agree = f", greedy tokens equal: {same:.1%}"
        else:
            agree = ""
        toks = batch * new_tokens
        print(f"[{mode}] scope_jax: {toks / jax_t:9.0f} tok/s ({jax_t:.3f} s/run; first call "
              f"incl. compile {jax_first:.2f} s)")
        print(f"[{mode}] transformers: {toks / hf_t:6.0f} tok/s ({hf_t:.3f} s/run; first call "
              f"{hf_first:.2f} s)")
        print(f"[{mode}] ratio scope_jax / transformers: {hf_t / jax_t:.2f}x{agree}")
        rows.append((name, mode, batch, new_tokens, toks / jax_t, toks / hf_t, hf_t / jax_t))
    return rows


def bench_early_eos(name: str, spec: dict, modes: list[str], repeats: int, baseline=None,
                    budgets: tuple[int, int] = (64, 4096)) -> None:
    """Cost of a large token budget when every row ends within 3 steps: generate with
    max_new_tokens = budgets[1] against budgets[0], the same prompts and EOS ids (the tokens
    the rows produce at step 3, found by a probe run, so every row stops by then); for the
    baseline's generate too when given."""
    import jax

    from scope_jax.models import load_hf
    from scope_jax.sampling import generate

    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, spec["model"])
        model = load_hf(tmp)
    prompts = np.random.default_rng(0).integers(
        3, spec["model"]["vocab_size"], size=(spec["batch"], spec["prompt_len"])).tolist()
    print(f"\n== {name}, early EOS: batch {spec['batch']}, prompt {spec['prompt_len']}, "
          f"max_new_tokens {budgets[1]} vs {budgets[0]}, load average {os.getloadavg()[0]:.1f}")
    sides = [("scope_jax", generate)] + ([("baseline", baseline)] if baseline else [])
    for mode in modes:
        kw = dict(MODES[mode], key=jax.random.key(0))
        eos = sorted(set(np.asarray(generate(model, prompts, max_new_tokens=3, **kw).tokens)[
            :, 2].tolist()))

        def run(gen, m):
            out = gen(model, prompts, max_new_tokens=m, eos_ids=eos, **kw)
            jax.block_until_ready(out.tokens)
            assert int(np.max(out.lengths)) <= 3, np.asarray(out.lengths)
            return out

        fns = [functools.partial(run, gen, m) for _, gen in sides for m in budgets]
        first, med, times = time_interleaved(fns, repeats)
        for k, (side, _) in enumerate(sides):
            (first_s, first_l), (short, long) = first[2 * k:2 * k + 2], med[2 * k:2 * k + 2]
            print(f"[{mode}] {side}: max_new_tokens {budgets[0]}: {short * 1e3:.1f} ms/run "
                  f"(first call {first_s:.2f} s); {budgets[1]}: {long * 1e3:.1f} ms/run (first "
                  f"call {first_l:.2f} s); cost ratio {budgets[1]} / {budgets[0]}: "
                  f"{paired_ratio(times[2 * k + 1], times[2 * k])} (first calls "
                  f"{first_l / first_s:.2f}x)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=None, help="override every config's batch")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--early-eos", action="store_true",
                        help="instead: generate(max_new_tokens=4096) vs 64 when rows end early")
    parser.add_argument("--baseline", default=None, metavar="SAMPLING_PY",
                        help="also time the generate of this sampling.py (e.g. main's) on the "
                             "same model, interleaved")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="on both sides (not with --baseline or --early-eos)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own, the core count)")
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    baseline = load_baseline(args.baseline) if args.baseline else None
    if args.repetition_penalty != 1.0 and (baseline or args.early_eos):
        parser.error("--repetition-penalty goes without --baseline and --early-eos")
    if args.early_eos:
        for name in args.configs:
            bench_early_eos(name, CONFIGS[name], args.modes, args.repeats, baseline)
        return
    rows = []
    for name in args.configs:
        rows += bench(name, CONFIGS[name], args.modes, args.repeats, args.batch, args.new_tokens,
                      baseline, args.repetition_penalty)
    print("\n| config | mode | batch | new tokens | scope_jax tok/s | transformers tok/s | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, mode, b, m, a, h, r in rows:
        print(f"| {name} | {mode} | {b} | {m} | {a:.0f} | {h:.0f} | {r:.2f}x |")


if __name__ == "__main__":
    main()
