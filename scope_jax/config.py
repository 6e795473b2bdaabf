"""The trainer's config contract: every key it reads, its type and range, checked before any
model loads (`validate`). configs/common.py's `base()` must define exactly these keys
(tests/test_robust.py checks it), plus an optional free-form `arch` (dry runs).
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Callable

from scope_jax.algorithms import ALGORITHMS
from scope_jax.sampling import prompt_bucket
from scope_jax.sharding import partition_problem

ALGOS = tuple(ALGORITHMS)
_DTYPES = ("float32", "bfloat16")


def _one_of(*values) -> Callable[[Any], str | None]:
    return lambda v: None if v in values else f"must be one of {values}"


def _num(lo=None, hi=None, *, lo_open=False, hi_open=False, integer=False):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            return f"must be {'an int' if integer else 'a number'}, got {type(v).__name__}"
        if not math.isfinite(v):
            return "must be finite"
        if lo is not None and (v <= lo if lo_open else v < lo):
            return f"must be {'>' if lo_open else '>='} {lo}"
        if hi is not None and (v >= hi if hi_open else v > hi):
            return f"must be {'<' if hi_open else '<='} {hi}"
        return None
    return check


def _int(lo=None):
    return _num(lo, integer=True)


def _type(*types):
    return lambda v: None if isinstance(v, types) else f"must be {' or '.join(t.__name__ for t in types)}, got {type(v).__name__}"


def _files(v):
    if isinstance(v, str):
        return None if v else "must name at least one file"
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, str) and x for x in v):
        return None
    return "must be a path or a non-empty list of paths"


def _opt_ids(v):
    return None if v is None or (isinstance(v, (list, tuple)) and all(isinstance(x, int) for x in v)) \
        else "must be None or a list of token ids"


def _opt_pos(v):
    return None if v is None else _num(0, lo_open=True)(v)


_BOOL, _STR = _type(bool), _type(str)

SCHEMA: dict[str, Callable[[Any], str | None]] = {
    "workdir": lambda v: None if isinstance(v, str) and v else "must be a non-empty path",
    "algo": _one_of(*ALGOS),
    "seed": _int(0),
    "num_steps": _int(1),
    "checkpoint_every": _int(1),
    "max_to_keep": _int(1),
    "async_checkpointing": _BOOL,
    "export": _BOOL,
    "max_nonfinite_steps": _int(1),
    "resume": _one_of("auto", "force"),
    "student": lambda v: None if isinstance(v, str) and v else "must name a Hugging Face checkpoint directory",
    "teacher": _STR,
    "teacher_url": _STR,
    "teacher_client.model": _STR,
    "teacher_client.batch_size": _int(1),
    "teacher_client.max_concurrency": _int(1),
    "teacher_client.timeout_s": _num(0, lo_open=True),
    "teacher_client.retries": _int(0),
    "teacher_client.backoff_s": _num(0),
    "logging.wandb_project": _STR,
    "logging.wandb_entity": _STR,
    "logging.run_name": _STR,
    "tokenizer": _STR,
    "toy_dir": _STR,
    "toy_family": _STR,  # scope_jax.toy.toy_settings checks the name when the toy is built
    "data.train_files": _files,
    "data.spec": _STR,
    "data.style": _one_of("chat", "raw", "deepmath"),
    "data.instruction": _STR,
    "data.max_prompt_len": _int(1),
    "data.on_error": _one_of("raise", "skip"),
    "prompts_per_step": _int(1),
    "num_samples": _int(1),
    "micro_batches": _int(1),
    "pipeline.chunks": _int(1),
    "pipeline.overlap": _BOOL,
    "packing": _int(0),
    "sampling.max_new_tokens": _int(1),
    "sampling.temperature": _num(0),
    "sampling.top_k": _int(0),
    "sampling.top_p": _num(0, 1, lo_open=True),
    "sampling.eos_ids": _opt_ids,
    "sampling.repetition_penalty": _num(0, lo_open=True),
    "recompute_old_logprobs": _BOOL,
    "logprob_temperature": _opt_pos,
    "teacher_temperature": _num(0, lo_open=True),
    "optim.lr": _num(0, lo_open=True),
    "optim.warmup_steps": _int(0),
    "optim.weight_decay": _num(0),
    "optim.b1": _num(0, 1, hi_open=True),
    "optim.b2": _num(0, 1, hi_open=True),
    "optim.eps": _num(0),
    "optim.grad_clip": _num(0, lo_open=True),
    "scope.tau": _num(0, lo_open=True),
    "scope.reduction": _one_of("paper", "token_mean"),
    "scope.distill": _one_of("reinforce", "kl", "ppo"),
    "scope.kl": _one_of("k1", "k2", "k3"),
    "scope.kl_clip": _opt_pos,
    "scope.clip_eps": _num(0, lo_open=True),
    "scope.student_weighting": _one_of("paper", "reversed", "uniform"),
    "scope.teacher_weighting": _one_of("paper", "reversed", "uniform"),
    "grpo.kl_coef": _num(0),
    "grpo.clip_eps": _num(0, lo_open=True),
    "grpo.kl_clip": _opt_pos,
    "grpo.normalize_std": _BOOL,
    "kd_only_correct": _BOOL,
    "verifier.num_workers": _int(1),
    "verifier.timeout_s": _num(0, lo_open=True),
    "model.dtype": _one_of(*_DTYPES),
    "model.param_dtype": _one_of(*_DTYPES),
    "model.teacher_dtype": _one_of(*_DTYPES),
    "model.remat_policy": _one_of("full", "minimal", "none"),  # scope_jax.models.REMAT_POLICIES
    "model.logprob_chunk": _int(1),
    "rollout.engine": _one_of("static", "continuous"),  # scope_jax.rollout.ENGINES
    "rollout.mesh.tensor": lambda v: None if v == -1 else _int(1)(v),
    "rollout.kv_tokens_per_chip": _int(1),
    "rollout.slots": _int(1),
    "rollout.page_size": _int(1),
    "rollout.block": _int(1),
    "rollout.prefill_tokens": _int(1),
    "rollout.order": _one_of("fifo", "longest"),  # scope_jax.engine.ORDERS
}
FREE = ("mesh", "arch")  # sub-dicts whose keys are free (mesh axes; architecture dicts)


def flat_keys(cfg) -> dict[str, Any]:
    """Dotted key -> value of a ConfigDict / dict, not descending into FREE."""
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            key = prefix + k
            if hasattr(v, "items") and key not in FREE:
                walk(v, key + ".")
            else:
                out[key] = v
    walk(cfg, "")
    return out


def closest(key: str) -> list[str]:
    """The valid keys nearest `key` (difflib), for 'did you mean' messages."""
    names = list(SCHEMA) + list(FREE)
    leaf = key.rsplit(".", 1)[-1]
    hits = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
    hits += [n for n in difflib.get_close_matches(leaf, [n.rsplit(".", 1)[-1] for n in names], n=3, cutoff=0.5)
             for n in [m for m in names if m.rsplit(".", 1)[-1] == n] if n not in hits]
    return hits[:3] or sorted(n for n in names if n.startswith(key.split(".")[0] + "."))[:5]


def group_keys(key: str) -> list[str]:
    """The keys of group `key` (e.g. "optim" -> ["optim.b1", ...]); [] when it is no group."""
    return sorted(k for k in SCHEMA if k.startswith(key + "."))


def problems(cfg) -> list[str]:
    """Every problem of `cfg`, one line each naming the key (empty when it is valid)."""
    flat = flat_keys(cfg)
    out = []
    for key in flat:
        if key not in SCHEMA and key not in FREE and group_keys(key):
            out.append(f"config.{key}={flat[key]!r}: {key} is a group of keys ({', '.join(group_keys(key))}), "
                       "not a value")
        elif key not in SCHEMA and key not in FREE:
            out.append(f"config.{key}: unknown key; closest valid: {', '.join(closest(key)) or 'none'}")
    for key, check in SCHEMA.items():
        if key not in flat:
            out.append(f"config.{key}: missing")
            continue
        why = check(flat[key])
        if why:
            out.append(f"config.{key}={flat[key]!r}: {why}")
    if any(": unknown key" not in line for line in out):  # the checks below need valid values
        return out
    mesh = flat.get("mesh")
    if not hasattr(mesh, "items") or not all(isinstance(v, int) and (v == -1 or v >= 1) for v in mesh.values()):
        out.append(f"config.mesh={mesh!r}: must map axis names to sizes >= 1 (one may be -1)")
    if ALGORITHMS[cfg["algo"]].loads_teacher and not (cfg["teacher"] or cfg["teacher_url"]):
        out.append(f"config.teacher: algo={cfg['algo']!r} needs a teacher checkpoint directory "
                   "(or config.teacher_url, a teacher server)")
    batch = cfg["prompts_per_step"] * cfg["num_samples"]
    why = partition_problem(cfg["micro_batches"], batch)  # the mesh's part: sharding.check_partition
    if why:
        out.append(why)
    # With packing the plan makes the micro-batches, so micro_batches must stay 1.
    if cfg["packing"] and cfg["micro_batches"] != 1:
        out.append(f"config.micro_batches={cfg['micro_batches']}: with config.packing the packing plan "
                   "sets the micro-batches (one packed row per batch shard each); leave it at 1")
    if cfg["prompts_per_step"] % cfg["pipeline"]["chunks"]:
        out.append(f"config.pipeline.chunks={cfg['pipeline']['chunks']}: must divide prompts_per_step="
                   f"{cfg['prompts_per_step']} (every chunk holds the same number of prompts)")
    if cfg["pipeline"]["chunks"] != 1 and cfg["rollout"]["engine"] == "continuous":
        out.append(f"config.pipeline.chunks={cfg['pipeline']['chunks']}: the continuous engine streams "
                   "each row to the verifier and a teacher server as it ends (chunks are the static "
                   "engine's overlap); leave it at 1")
    out += _rollout_problems(cfg)
    if cfg["packing"]:
        longest = prompt_bucket(cfg["data"]["max_prompt_len"]) + cfg["sampling"]["max_new_tokens"]
        if cfg["packing"] < longest:
            out.append(f"config.packing={cfg['packing']}: a packed row must hold any rollout, "
                       f"prompt bucket + sampling.max_new_tokens = {longest} tokens; set it >= {longest}")
    return out


def _rollout_problems(cfg) -> list[str]:
    """The rollout group's cross-key checks (the continuous engine's pool and layout)."""
    r, out = cfg["rollout"], []
    kv, page = r["kv_tokens_per_chip"], r["page_size"]
    longest = cfg["data"]["max_prompt_len"] + cfg["sampling"]["max_new_tokens"]
    if r["engine"] == "continuous" and kv < -(-longest // page) * page:
        out.append(f"config.rollout.kv_tokens_per_chip={kv}: the page pool must hold one whole "
                   f"rollout, data.max_prompt_len + sampling.max_new_tokens = {longest} tokens "
                   f"in pages of rollout.page_size={page}; set it >= {-(-longest // page) * page}")
    mesh = cfg["mesh"]
    train_tensor = mesh.get("tensor", 1) if hasattr(mesh, "get") else 1
    t = r["mesh"]["tensor"]
    if t == -1 and train_tensor == -1:
        out.append("config.rollout.mesh.tensor=-1 (the training mesh's tensor axis) needs "
                   "config.mesh.tensor to be a size, not -1")
    elif t not in (-1, 1) and t != train_tensor:
        out.append(f"config.rollout.mesh.tensor={t}: must be 1 (each chip its own engine, the "
                   f"weights replicated), -1 or config.mesh.tensor={train_tensor} (the heads "
                   "split within a host as the training layout splits them)")
    return out


class ConfigError(ValueError):
    """An invalid config; the message names every offending key."""


def validate(cfg) -> None:
    """Raises ConfigError listing every problem of `cfg` (unknown keys with the closest valid
    names, wrong types, out-of-range values, inconsistent combinations); None when valid."""
    out = problems(cfg)
    if out:
        raise ConfigError("invalid config:\n  " + "\n  ".join(out))
