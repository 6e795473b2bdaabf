"""What makes a run resumable and honest: checkpoints with checksums, the run's identity, metrics.

Checkpoints ({workdir}/checkpoints/<step>, Orbax) hold two items: `state` (the TrainState as a
flat path -> array dict) and `checksums` (JSON: per leaf its shape, dtype and the CRC-32 of its
bytes). Orbax 0.12 stores no checksum of the array data (only the zarr3 shard index carries a
crc32c), so a flipped byte in a chunk restores silently; the CRC catches it. A restore checks,
newest first: the checksums item reads, its leaves match the template (else `RunMismatch`: a
different model is not a corrupt checkpoint), the state reads, every CRC matches and every leaf
is finite. A checkpoint that fails is moved to {checkpoints}/corrupt/<step>-<reason> (never
deleted) and the next older one is tried, so the run continues past the bad step.

Multi-host: each process can only read its addressable shards, so CRCs are per shard (keyed by
the shard's index in the global array) and the JSON item is written by process 0: only the
shards that process 0 holds are checksummed; every process checks finiteness of its own shards
and the processes agree (any failure on any process fails the checkpoint everywhere). Single
host: every leaf is checksummed whole, independent of the mesh.

{workdir}/config.json is the run's identity: the resolved config and fingerprints (config.json
hash, tensor names and shapes) of the student and teacher checkpoints. A later run in the same
workdir must agree on every key that changes what the run means (see `ALLOWED_CHANGES`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scope_jax import algorithms
from scope_jax.models import hf

log = logging.getLogger(__name__)

# Config keys a resumed run may change (logged): they do not change what the run computes.
# Everything else (algo, num_samples, prompts_per_step, data.*, student, teacher, seed, scope.*,
# grpo.*, optim.*, sampling.*, model.*, ...) refuses unless --config.resume=force.
ALLOWED_CHANGES = ("workdir", "num_steps", "checkpoint_every", "max_to_keep", "async_checkpointing",
                   "export", "max_nonfinite_steps", "toy_dir", "resume", "verifier.num_workers",
                   "micro_batches", "packing", "mesh", "logging", "model.remat_policy", "model.logprob_chunk",
                   # where the teacher runs (the server must serve the same teacher: not checkable)
                   "teacher_url", "teacher_client",
                   # the order of work, not the math (collect.Collector); pipeline.chunks does change it
                   "pipeline.overlap")
# Keys added after runs existed, with the value that keeps what those runs computed: a run
# identity written before a key existed reads as having it at this value.
ADDED_KEYS = {"pipeline.chunks": 1}


class RunMismatch(ValueError):
    """The workdir holds a different run (config key, model fingerprint or checkpoint layout)."""


class NonFiniteError(FloatingPointError):
    """Parameters, optimizer state or logits hold NaN / inf; the message names the tensor."""


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _flat(tree) -> tuple[dict[str, Any], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): x for p, x in leaves}, treedef


def _host_pieces(x) -> list[tuple[str, np.ndarray]]:
    """(key, host copy) of what this process holds of one leaf: the whole array on one host,
    else each addressable shard once (replica 0), keyed by its index in the global array."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return [("", np.asarray(jax.device_get(x)))]
    out = []
    for s in x.addressable_shards:
        if s.replica_id == 0:
            key = ",".join(f"{i.start or 0}:{i.stop if i.stop is not None else n}"
                           for i, n in zip(s.index, x.shape))
            out.append((key, np.asarray(s.data)))
    return out


def _crc(a: np.ndarray) -> str:
    return f"{zlib.crc32(np.ascontiguousarray(a).view(np.uint8)):08x}"


def _all_processes(flag: bool) -> bool:
    """True where `flag` holds on every process."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag))))


def _is_float(x) -> bool:
    return jnp.issubdtype(getattr(x, "dtype", np.float32), jnp.inexact)


def _finite(a: np.ndarray) -> bool:
    return bool(np.isfinite(a.astype(np.float32) if a.dtype.itemsize < 4 else a).all())


def scan(flat: dict[str, Any]) -> tuple[dict[str, dict], str | None]:
    """One pass over a host copy of a flat {path: array} dict (this process's pieces, see module doc).

    Returns (checksums: per leaf path {"shape", "dtype", "crc32": {piece key: hex}},
    the path of the first floating-point leaf holding NaN / inf, or None).
    """
    sums, bad = {}, None
    for name, x in flat.items():
        pieces = _host_pieces(x)
        sums[name] = {"shape": list(np.shape(x)), "dtype": str(x.dtype),
                      "crc32": {k: _crc(a) for k, a in pieces}}
        if bad is None and _is_float(x):
            bad = next((name + (f"[{k}]" if k else "") for k, a in pieces if not _finite(a)), None)
    return sums, bad


def first_nonfinite(tree) -> str | None:
    """Path of the first floating-point leaf of `tree` holding NaN / inf (this process's pieces), or None."""
    return scan(_flat(tree)[0])[1]


def check_finite(tree, what: str) -> None:
    """Raises NonFiniteError on every process when any process holds a NaN / inf in `tree`."""
    bad = first_nonfinite(tree)
    if not _all_processes(bad is None):
        raise NonFiniteError(f"{what}: {bad or 'a leaf on another process'} is not finite")


class Checkpointer:
    """Orbax CheckpointManager around a TrainState: checksummed saves, verified restores."""

    def __init__(self, directory: str, *, max_to_keep: int, async_save: bool = True):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=async_save))

    def save(self, state, *, wait: bool = False) -> None:
        """Saves `state` (a pytree with a scalar `step`); refuses non-finite leaves (NonFiniteError).

        The CRCs are taken from a host copy of the state (one device -> host transfer per save).
        """
        flat, _ = _flat(state)
        sums, bad = scan(flat)
        if not _all_processes(bad is None):
            raise NonFiniteError(f"refusing to write checkpoint {int(state.step)}: "
                                 f"{bad or 'a leaf on another process'} is not finite")
        args = self._ocp.args
        self.manager.save(int(state.step), force=True, args=args.Composite(
            state=args.StandardSave(flat), checksums=args.JsonSave(sums)))
        if wait:
            self.manager.wait_until_finished()

    def _verify(self, step: int, flat_template: dict) -> tuple[dict | None, str, str]:
        """(restored flat state or None, reason, detail); reason '' when it is good."""
        args = self._ocp.args
        try:
            sums = self.manager.restore(step, args=args.Composite(checksums=args.JsonRestore()))["checksums"]
            if not isinstance(sums, dict):
                raise ValueError(f"checksums item is a {type(sums).__name__}")
        except Exception as e:  # noqa: BLE001 - whatever the cause, this step cannot be trusted
            return None, "unreadable", f"checksums: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        for name, x in flat_template.items():
            want = sums.get(name)
            if want is None or tuple(want["shape"]) != tuple(np.shape(x)) or want["dtype"] != str(x.dtype):
                raise RunMismatch(
                    f"{self.directory}/{step} holds a different model: leaf {name} is "
                    f"{'absent' if want is None else (tuple(want['shape']), want['dtype'])} there, "
                    f"{(tuple(np.shape(x)), str(x.dtype))} here; use the workdir of that run, or a new one")
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), flat_template)
        try:
            got = self.manager.restore(step, args=args.Composite(state=args.StandardRestore(abstract)))["state"]
        except Exception as e:  # noqa: BLE001
            return None, "unreadable", f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        now, bad = scan(got)
        for name, piece in now.items():
            stored = sums[name]["crc32"]
            for key, crc in piece["crc32"].items():
                if key in stored and crc != stored[key]:
                    return None, "checksum", f"leaf {name}{f'[{key}]' if key else ''}: CRC-32 {crc}, saved {stored[key]}"
        if bad is not None:
            return None, "nonfinite", f"leaf {bad} holds NaN or inf"
        return got, "", ""

    def restore_latest(self, template):
        """The newest checkpoint that verifies (see module doc), as `template`'s type, or None.

        Raises RunMismatch when a readable checkpoint was written for a different layout.
        """
        flat, treedef = _flat(template)
        for step in sorted(self.manager.all_steps(), reverse=True):
            got, reason, detail = self._verify(step, flat)
            if not _all_processes(not reason):
                reason, detail = reason or "other-process", detail or "failed verification on another process"
                got = None
            if got is None:
                self._move_aside(step, reason, detail)
                continue
            log.info("restored %s/%d (checksums and finiteness verified)", self.directory, step)
            return jax.tree_util.tree_unflatten(treedef, [got[k] for k in flat])
        return None

    def _move_aside(self, step: int, reason: str, detail: str) -> None:
        dest = os.path.join(self.directory, "corrupt", f"{step}-{reason}")
        if jax.process_index() == 0:
            if os.path.exists(dest):
                dest = f"{dest}-{_stamp()}"
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"scope_jax move aside {step}")
        self.manager.reload()
        log.error("checkpoint %s/%d failed verification (%s: %s); moved to %s; falling back to an "
                  "earlier one", self.directory, step, reason, detail, dest)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# --------------------------------------------------------------------------------------------
# The run's identity: {workdir}/config.json.
# --------------------------------------------------------------------------------------------


def fingerprint(path: str) -> dict | None:
    """{"config_sha256", "tensors": {name: [shape, dtype]}} of a Hugging Face checkpoint
    directory (headers only: no weights are read), or None for an empty path."""
    if not path:
        return None
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    tensors = {}
    for file in hf.checkpoint_files(path):
        header, _ = hf._read_header(file)
        tensors.update({n: [list(i["shape"]), i["dtype"]] for n, i in header.items()})
    return {"config_sha256": digest, "tensors": dict(sorted(tensors.items()))}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def identity(cfg) -> dict:
    """The resolved config (JSON types) and the fingerprints of the models it names."""
    config = json.loads(json.dumps(cfg.to_dict(), default=str))
    # A teacher on its server (config.teacher_url) has no local files to fingerprint.
    uses_teacher = algorithms.loads_local_teacher(cfg)
    return {"config": config, "student": fingerprint(cfg.student),
            "teacher": fingerprint(cfg.teacher) if uses_teacher else None}


def _allowed(key: str) -> bool:
    return any(key == a or key.startswith(a + ".") for a in ALLOWED_CHANGES)


def differences(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(meaning-changing, allowed) differences between two identities, one line each.

    A moved student / teacher directory with the same fingerprint is an allowed change.
    """
    a, b = _flatten(old.get("config", {})), _flatten(new["config"])
    a = {**{k: v for k, v in ADDED_KEYS.items() if k in b}, **a}
    refuse, allow = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") == b.get(key, "<absent>"):
            continue
        line = f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}"
        same_model = key in ("student", "teacher") and old.get(key) == new.get(key) and new.get(key)
        (allow if _allowed(key) or same_model else refuse).append(line)
    for role in ("student", "teacher"):
        o, n = old.get(role), new.get(role)
        if o == n or o is None or n is None:
            continue
        if o["config_sha256"] != n["config_sha256"]:
            refuse.append(f"{role} fingerprint: config.json sha256 {o['config_sha256'][:12]} -> {n['config_sha256'][:12]}")
        changed = sorted(k for k in set(o["tensors"]) | set(n["tensors"]) if o["tensors"].get(k) != n["tensors"].get(k))
        if changed:
            refuse.append(f"{role} fingerprint: tensors differ ({len(changed)}), first {changed[0]}: "
                          f"{o['tensors'].get(changed[0])} -> {n['tensors'].get(changed[0])}")
    return refuse, allow


def check_identity(workdir: str, ident: dict, *, force: bool = False) -> None:
    """Compares `ident` with {workdir}/config.json (written when absent; process 0 writes).

    Raises RunMismatch naming every meaning-changing key unless `force`; with `force` the old
    file is kept as config.json.replaced-<time>. Allowed changes are logged.
    """
    path = os.path.join(workdir, "config.json")
    write = jax.process_index() == 0
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise RunMismatch(f"{path}: unreadable run identity ({e}); move it away, or --config.resume=force") from None
        refuse, allow = differences(old, ident)
        for line in allow:
            log.info("resume: %s changed (allowed): %s", path, line)
        if refuse and not force:
            raise RunMismatch(
                f"{path}: this workdir holds a different run; differing keys: " + "; ".join(refuse)
                + ". Use a new workdir, or --config.resume=force if you mean to continue it")
        if refuse:
            log.warning("resume=force: continuing %s despite: %s", workdir, "; ".join(refuse))
            if write:
                shutil.copy(path, f"{path}.replaced-{_stamp()}")
        if not refuse and not allow:
            return
    if write:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(ident, f, indent=1, sort_keys=True)
        os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# metrics.jsonl
# --------------------------------------------------------------------------------------------


class Metrics:
    """metrics.jsonl writer. On resume, rows of steps >= start_step (the steps the restored
    state will redo) and unparseable lines (a write cut by kill -9) move to
    metrics.jsonl.replaced-<time>; nothing is dropped silently."""

    def __init__(self, path: str, start_step: int):
        self.path = path
        self.tail_skipped = 0  # skipped steps at the end of the kept rows
        if not os.path.exists(path):
            open(path, "w").close()
            return
        kept, moved = [], []
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    ok = row["step"] < start_step
                except (ValueError, KeyError, TypeError):
                    ok = False
                (kept if ok else moved).append(line if line.endswith("\n") else line + "\n")
                if ok:
                    self.tail_skipped = self.tail_skipped + 1 if row.get("skipped") else 0
        if not moved:
            return
        aside = f"{path}.replaced-{_stamp()}"
        with open(aside, "a") as f:
            f.writelines(moved)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
        log.warning("%s: %d row(s) at or after step %d moved to %s (the resumed run redoes them)",
                    path, len(moved), start_step, aside)

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
