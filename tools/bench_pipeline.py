"""Step time of SCOPE against GRPO on the toy, serial and pipelined, co-located and remote, in one run.

    python -m tools.bench_pipeline                           # the toy in runs/toy (built if missing)
    python -m tools.bench_pipeline --toy_dir runs/toy --steps 4 --rounds 3 --chunks 4

Runs train.train in this process, a few steps at a time, for each variant:

    grpo             GRPO (no teacher), the reference of every ratio
    scope_serial     SCOPE, co-located teacher, chunks=1, overlap off: every stage in series
    scope_pipelined  SCOPE, co-located teacher, chunks=C, overlap on
    scope_remote     SCOPE, teacher on a tools.serve_teacher subprocess, chunks=C, overlap on
    grpo_chunked     GRPO, chunks=C, overlap on (what chunking alone costs)

Rounds interleave the variants (round 0 warms the compilation cache and is dropped); each run
starts a fresh workdir at step 0, so every round sees the same prompts and shapes, and its
first step (tracing, cache loads) is dropped too. Prints JSON: per variant the median step time,
its ratio to GRPO's (and the range of the per-round ratios), the median of each stage's time
(`time/<stage>_s`) and of the teacher's and the verifier's time on the critical path
(`critical/score_teacher_s`, `critical/verify_s`), the last as a fraction of GRPO's step too.
The server shares this machine's CPUs with the trainer, so on a small machine the remote
variant's generation is slowed by the server's work; `critical/score_teacher_s` is the figure
that carries over to a teacher on its own hardware.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("time_s", "time/generate_s", "time/verify_s", "time/score_old_s", "time/score_teacher_s",
          "time/score_ref_s", "time/update_s", "critical/score_teacher_s", "critical/verify_s")


def variants(chunks: int) -> dict[str, dict]:
    """Variant name -> config overrides (flattened keys); "remote" marks the served teacher."""
    piped = {"pipeline.chunks": chunks, "pipeline.overlap": True}
    return {
        "grpo": {"algo": "grpo"},
        "scope_serial": {"algo": "scope", "pipeline.chunks": 1, "pipeline.overlap": False},
        "scope_pipelined": {"algo": "scope", **piped},
        "scope_remote": {"algo": "scope", "remote": True, **piped},
        "grpo_chunked": {"algo": "grpo", **piped},
    }


def _serve(model_dir: str, log_path: str) -> tuple[subprocess.Popen, str]:
    """tools.serve_teacher on a free local port; (process, API base) once /health answers."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "tools.serve_teacher", "--model", model_dir, "--port", str(port)],
                            cwd=ROOT, stdout=log, stderr=log)
    deadline = time.time() + 300
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, f"http://127.0.0.1:{port}/v1"
        except httpx.HTTPError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"the teacher server did not start; see {log_path}") from None
            time.sleep(0.2)


def _run(paths: dict, overrides: dict, workdir: str, steps: int, url: str) -> list[dict]:
    """`steps` steps of configs/toy.py with `overrides` in a fresh workdir; its metrics rows."""
    from configs import toy as toy_config
    from scope_jax import train

    cfg = toy_config.get_config()
    remote = overrides.get("remote", False)
    cfg.update_from_flattened_dict({k: v for k, v in overrides.items() if k != "remote"})
    cfg.update_from_flattened_dict({
        "workdir": workdir, "toy_dir": "", "student": paths["student"], "data.train_files": paths["train"],
        "teacher": "" if remote else paths["teacher"], "teacher_url": url if remote else "",
        "num_steps": steps, "checkpoint_every": 10 ** 6, "export": False, "optim.warmup_steps": 0})
    train.train(cfg)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def summarize(rows: dict[str, list[list[dict]]], reference: str = "grpo") -> dict:
    """Per variant: medians of STAGES over its kept rows, and its step time as a ratio to the
    reference's (median over all rows; range over the rounds' medians)."""
    med = lambda xs: statistics.median(xs) if xs else 0.0
    ref_rounds = [med([r["time_s"] for r in rnd]) for rnd in rows[reference]]
    ref = med([r["time_s"] for rnd in rows[reference] for r in rnd])
    out = {}
    for name, rounds in rows.items():
        flat = [r for rnd in rounds for r in rnd]
        ratios = [med([r["time_s"] for r in rnd]) / g for rnd, g in zip(rounds, ref_rounds)]
        stats = {k: round(med([r.get(k, 0.0) for r in flat]), 3) for k in STAGES}
        out[name] = {"steps": len(flat), "step_over_grpo": round(stats["time_s"] / ref, 3),
                     "step_over_grpo_range": [round(min(ratios), 3), round(max(ratios), 3)],
                     "teacher_critical_over_grpo_step": round(stats["critical/score_teacher_s"] / ref, 3),
                     "median_s": stats}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--toy_dir", default="runs/toy", help="the toy (scope_jax.toy.build_toy; built if missing)")
    p.add_argument("--steps", type=int, default=4, help="steps per run (the first is dropped)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (round 0 is dropped)")
    p.add_argument("--chunks", type=int, default=4, help="pipeline.chunks of the pipelined variants")
    p.add_argument("--only", default="", help="comma-separated variants (default: all)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import jax

    from scope_jax import toy

    tmp = tempfile.mkdtemp(prefix="bench_pipeline_")
    # Every run re-jits its step; the cache turns the later compiles into loads.
    jax.config.update("jax_compilation_cache_dir", os.path.join(tmp, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    paths = toy.toy_paths(a.toy_dir) if os.path.exists(os.path.join(a.toy_dir, "manifest.json")) \
        else toy.build_toy(a.toy_dir)
    chosen = variants(a.chunks)
    if a.only:
        chosen = {k: v for k, v in chosen.items() if k in a.only.split(",") or k == "grpo"}
    server, url = _serve(paths["teacher"], os.path.join(tmp, "server.log")) \
        if any(v.get("remote") for v in chosen.values()) else (None, "")
    rows = {name: [] for name in chosen}
    t0 = time.perf_counter()
    try:
        for rnd in range(a.rounds):
            for name, overrides in chosen.items():
                got = _run(paths, overrides, os.path.join(tmp, f"{name}_{rnd}"), a.steps, url)
                if rnd:  # round 0 fills the compilation cache
                    rows[name].append(got[1:])
                print(f"round {rnd} {name}: " + " ".join(f"{r['time_s']:.2f}" for r in got), file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    report = {"variants": summarize(rows), "chunks": a.chunks, "steps_kept_per_run": a.steps - 1,
              "rounds_kept": a.rounds - 1, "wall_s": round(time.perf_counter() - t0),
              "cpus": os.cpu_count(), "devices": jax.device_count(), "toy": a.toy_dir}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
