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

{workdir}/config.json is the run's identity: the resolved config and fingerprints of the student
and teacher: for a checkpoint directory its config.json hash, tensor names and shapes, and a
CRC-32 of each tensor's bytes (read in chunks; cached by file status, so a resume whose files
are untouched reads nothing); for a teacher server what it serves (scope_jax.compat). A later
run in the same workdir must agree on every key that changes what the run means (see
`ALLOWED_CHANGES`) and on both models' content: a moved model with the same content is allowed.

{workdir}/run.lock (`WorkdirLock`) makes a workdir single-writer: an exclusive flock held for the
whole run by process 0; a second trainer refuses at once, naming the holder. The kernel drops the
lock with its process, so a kill -9 leaves no stale lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scope_jax import algorithms, compat
from scope_jax.models import hf

log = logging.getLogger(__name__)

# Config keys a resumed run may change (logged): they do not change what the run computes.
# Everything else (algo, num_samples, prompts_per_step, data.*, student, teacher, seed, scope.*,
# grpo.*, optim.*, sampling.*, model.*, ...) refuses unless --config.resume=force.
ALLOWED_CHANGES = ("workdir", "num_steps", "checkpoint_every", "max_to_keep", "async_checkpointing",
                   "export", "max_nonfinite_steps", "toy_dir", "resume", "verifier.num_workers",
                   "micro_batches", "packing", "mesh", "logging", "model.remat_policy", "model.logprob_chunk",
                   # where the teacher runs: its fingerprint (content, or what the server serves)
                   # must still match, see `model_changes`
                   "teacher_url", "teacher_client",
                   # the order of work, not the math (collect.Collector); pipeline.chunks does change it
                   "pipeline.overlap",
                   # which engine generates, and its layout and pool: the rollouts depend on the
                   # per-row keys only (scope_jax.rollout), not on how they are scheduled
                   "rollout")
# Keys added after runs existed, with the value that keeps what those runs computed: a run
# identity written before a key existed reads as having it at this value.
ADDED_KEYS = {"pipeline.chunks": 1}


class RunMismatch(ValueError):
    """The workdir holds a different run (config key, model fingerprint or checkpoint layout)."""


class NonFiniteError(FloatingPointError):
    """Parameters, optimizer state or logits hold NaN / inf; the message names the tensor."""


class WorkdirLocked(RuntimeError):
    """Another trainer holds the workdir's lock; the message names its pid and host."""


# Python reprs that exception texts of native libraries carry ("<bound method pybind11_...>",
# "<... object at 0x7f...>"): noise in a message meant for a user. Innermost first (they nest).
_REPR = re.compile(r"<[^<>]*(?:0x[0-9a-fA-F]+|bound method|built-in method|pybind11|\bREPR\b)[^<>]*>")


def error_text(e: BaseException, limit: int = 300) -> str:
    """'Type: first line of the message' of an exception, without Python repr fragments."""
    text, prev = (str(e).splitlines() or [""])[0], None
    while text != prev:
        prev, text = text, _REPR.sub("REPR", text)
    text = re.sub(r"\s+", " ", re.sub(r"\(?REPR\)?", "", text)).strip(" :,")
    return f"{type(e).__name__}: {text[:limit]}" if text else type(e).__name__


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
            return None, "unreadable", f"checksums: {error_text(e)}"
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
            return None, "unreadable", error_text(e)
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


_CHUNK = 16 << 20  # bytes per read when hashing weights


def tensor_crcs(file: str) -> dict[str, str]:
    """{tensor name: CRC-32 hex of its bytes} of one safetensors file, read in 16 MiB chunks
    (per tensor, so a re-sharded copy of the same weights has the same fingerprint)."""
    header, start = hf._read_header(file)
    out = {}
    with open(file, "rb") as f:
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            lo, hi = info["data_offsets"]
            f.seek(start + lo)
            crc, left = 0, hi - lo
            while left > 0:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    raise OSError(f"{file}: tensor {name!r} ends at byte {start + hi}, past the end of the file")
                crc, left = zlib.crc32(chunk, crc), left - len(chunk)
            out[name] = f"{crc:08x}"
    return out


def _file_key(file: str) -> list[int]:
    """What identifies a file's content without reading it: device, inode, size, mtime and
    ctime (ns). Any write changes ctime, which no user can set back; a moved directory keeps it."""
    st = os.stat(file)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def fingerprint(path: str, known: dict | None = None) -> dict | None:
    """{"config_sha256", "tensors": {name: [shape, dtype]}, "crc32": {name: CRC-32 of its bytes},
    "files": {file: its _file_key}} of a Hugging Face checkpoint directory, or None for an empty
    path. `known`: an earlier fingerprint; the CRCs of files whose key is unchanged are taken
    from it instead of read again."""
    if not path:
        return None
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    tensors, crcs, files = {}, {}, {}
    old_files, old_crcs = (known or {}).get("files") or {}, (known or {}).get("crc32") or {}
    for file in hf.checkpoint_files(path):
        header, _ = hf._read_header(file)
        names = {n: [list(i["shape"]), i["dtype"]] for n, i in header.items()}
        tensors.update(names)
        key = files[os.path.basename(file)] = _file_key(file)
        if old_files.get(os.path.basename(file)) == key and all(n in old_crcs for n in names):
            crcs.update({n: old_crcs[n] for n in names})
        else:
            crcs.update(tensor_crcs(file))
    return {"config_sha256": digest, "tensors": dict(sorted(tensors.items())), "crc32": dict(sorted(crcs.items())),
            "files": files}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _stored(workdir: str) -> dict:
    """{workdir}/config.json as a dict, or {} when absent or unreadable (check_identity reports that)."""
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            old = json.load(f)
        return old if isinstance(old, dict) else {}
    except (OSError, ValueError):
        return {}


def identity(cfg) -> dict:
    """The resolved config (JSON types) and the fingerprints of the models it names: the
    student's checkpoint, and the teacher's checkpoint or, on a server (config.teacher_url),
    what the server serves (scope_jax.compat.served_fingerprint)."""
    config = json.loads(json.dumps(cfg.to_dict(), default=str))
    old = _stored(cfg.workdir)
    teacher = None
    if algorithms.loads_local_teacher(cfg):
        teacher = fingerprint(cfg.teacher, old.get("teacher"))
    elif algorithms.get(cfg.algo).loads_teacher and cfg.get("teacher_url"):
        teacher = compat.served_fingerprint(cfg, (old.get("teacher") or {}).get("probe_ids"))
    return {"config": config, "student": fingerprint(cfg.student, old.get("student")), "teacher": teacher}


def _allowed(key: str) -> bool:
    return any(key == a or key.startswith(a + ".") for a in ALLOWED_CHANGES)


def _where(fp: dict) -> str:
    return f"served by {fp['url']} as {fp['model']!r}" if fp.get("served") else "a checkpoint directory"


def model_changes(role: str, o: dict | None, n: dict | None) -> list[str]:
    """What differs between two fingerprints of the `role` model, one line each (empty: the same
    model). Checkpoints compare config.json, tensor names and shapes, and per-tensor CRCs (an
    identity written before CRCs existed compares the rest); a served teacher compares model id,
    max_model_len, the probe's ids and its log-probs (to scope_jax.compat.PROBE_ATOL). A teacher
    that moved between a directory and a server cannot be compared: that is a change too."""
    if o is None or n is None:
        return []
    if bool(o.get("served")) != bool(n.get("served")):
        return [f"{role}: was {_where(o)}, now {_where(n)}; their identities cannot be compared "
                "(a served teacher is fingerprinted by what it serves)"]
    if n.get("served"):
        return [f"{role} {line}" for line in compat.served_changes(o, n)]
    out = []
    if o["config_sha256"] != n["config_sha256"]:
        out.append(f"{role} fingerprint: config.json sha256 {o['config_sha256'][:12]} -> {n['config_sha256'][:12]}")
    changed = sorted(k for k in set(o["tensors"]) | set(n["tensors"]) if o["tensors"].get(k) != n["tensors"].get(k))
    if changed:
        out.append(f"{role} fingerprint: tensors differ ({len(changed)}), first {changed[0]}: "
                   f"{o['tensors'].get(changed[0])} -> {n['tensors'].get(changed[0])}")
    if "crc32" in o and "crc32" in n:
        differ = sorted(k for k in set(o["crc32"]) & set(n["crc32"]) if o["crc32"][k] != n["crc32"][k])
        if differ:
            out.append(f"{role} weights: {len(differ)} of {len(n['crc32'])} tensors hold other values, first "
                       f"{differ[0]}: CRC-32 {o['crc32'][differ[0]]} -> {n['crc32'][differ[0]]}")
    return out


def differences(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(meaning-changing, allowed) differences between two identities, one line each.

    A moved student / teacher directory with the same content is an allowed change.
    """
    a, b = _flatten(old.get("config", {})), _flatten(new["config"])
    a = {**{k: v for k, v in ADDED_KEYS.items() if k in b}, **a}
    changes = {role: model_changes(role, old.get(role), new.get(role)) for role in ("student", "teacher")}
    refuse, allow = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") == b.get(key, "<absent>"):
            continue
        line = f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}"
        same_model = key in ("student", "teacher") and new.get(key) and old.get(key) and not changes[key]
        (allow if _allowed(key) or same_model else refuse).append(line + (" (same content)" if same_model else ""))
    for role in ("student", "teacher"):
        refuse += changes[role]
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
        if not refuse and not allow and old == ident:
            return  # (a changed fingerprint cache or a newly recorded fingerprint is rewritten)
    if write:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(ident, f, indent=1, sort_keys=True)
        os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# metrics.jsonl
# --------------------------------------------------------------------------------------------


def _json_safe(x):
    """x with every non-finite float replaced by None (JSON has no NaN / Infinity)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


_STEP = re.compile(r'"step"\s*:\s*(\d+)')


class Metrics:
    """metrics.jsonl writer: one row per step; non-finite numbers are written as null.

    On resume, rows of steps >= start_step (the steps the restored state will redo) move to
    metrics.jsonl.replaced-<time>. A line that is not a JSON row is damaged: when it belongs to a
    step before start_step (its step read from the text, else from its neighbours' steps) it is
    never redone, so it stays in place as {"step": N, "damaged": "<the line>"}, keeping one row per
    step; at or after start_step (a write cut by kill -9) it moves aside with the redone rows, as
    does a damaged line whose step cannot be told. Nothing is dropped silently.
    """

    def __init__(self, path: str, start_step: int):
        self.path = path
        self.tail_skipped = 0  # skipped steps at the end of the kept rows
        if not os.path.exists(path):
            open(path, "w").close()
            return
        with open(path, errors="replace") as f:
            lines = [(n, line if line.endswith("\n") else line + "\n") for n, line in enumerate(f, 1) if line.strip()]
        rows = []
        for _, line in lines:
            try:
                row = json.loads(line)
                rows.append(row if isinstance(row, dict) and isinstance(row.get("step"), int) else None)
            except ValueError:
                rows.append(None)
        kept, moved, damaged = [], [], []
        before = -1  # the step of the previous line (read, or told for a damaged one)
        for i, ((n, line), row) in enumerate(zip(lines, rows)):
            after = next((r["step"] for r in rows[i + 1:] if r is not None), None)
            step = row["step"] if row is not None else self._damaged_step(line, before, after)
            before = step if step is not None else before
            if step is None or step >= start_step:
                moved.append(line)
                continue
            if row is None:
                damaged.append((n, step, line))
                row = {"step": step, "damaged": line.rstrip("\n")[:2000]}
                line = json.dumps(row) + "\n"
            kept.append(line)
            self.tail_skipped = self.tail_skipped + 1 if row.get("skipped") else 0
        for n, step, line in damaged:
            log.error("%s:%d: the row of step %d is damaged (not a JSON object: %r); its values are lost and "
                      "the step is not redone (it precedes the restored step %d): kept as a row marked "
                      "\"damaged\"", path, n, step, line.strip()[:120], start_step)
        if not moved and not damaged:
            return
        aside = f"{path}.replaced-{_stamp()}"
        with open(aside, "a") as f:
            f.writelines(moved + [line for _, _, line in damaged])
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
        if moved:
            log.warning("%s: %d line(s) at or after step %d (or unreadable) moved to %s (the resumed run "
                        "redoes those steps)", path, len(moved), start_step, aside)

    @staticmethod
    def _damaged_step(line: str, before: int, after: int | None) -> int | None:
        """The step a damaged line belongs to: written in it, else the one between its
        neighbours' steps (before + 1 == after - 1), else None."""
        m = _STEP.search(line)
        if m:
            return int(m.group(1))
        return before + 1 if after is not None and after == before + 2 else None

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(_json_safe(row), allow_nan=False) + "\n")


# --------------------------------------------------------------------------------------------
# One writer per workdir.
# --------------------------------------------------------------------------------------------


class WorkdirLock:
    """An exclusive flock on {workdir}/run.lock, held by process 0 until `release` (or until its
    process ends: the kernel drops it, so a killed run leaves no stale lock). The file names the
    holder (pid, host, start time) for the refusal a second trainer prints. Every process
    calls it; all raise WorkdirLocked when process 0 cannot take it."""

    def __init__(self, workdir: str):
        self.path = os.path.join(os.path.abspath(workdir), "run.lock")
        self._fd, problem = None, None
        if jax.process_index() == 0:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
                os.close(fd)
                problem = (f"{self.path}: the workdir is in use by another trainer "
                           f"({holder or 'which has not written its pid yet'}); one writer per workdir: "
                           "wait for it, stop it, or use another workdir")
            else:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since "
                              f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n".encode(), 0)
                self._fd = fd
        if not _all_processes(problem is None):
            self.release()
            raise WorkdirLocked(problem or f"{self.path}: process 0 could not lock the workdir (see its log)")

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
