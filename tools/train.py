"""Train with SCOPE or a baseline from an ml_collections config.

    python -m tools.train --config configs/toy.py --config.algo=scope --config.workdir=runs/toy_scope
    python -m tools.train --config configs/toy.py:opd            # a named variant (configs/common.py)
    python -m tools.train --config configs/paper_r1_1p5b.py --dry_run   # shapes and shardings only

Writes {workdir}/config.json (the run's identity), {workdir}/metrics.jsonl (one JSON object per
step) and TensorBoard events beside it (scope_jax.tracking; W&B too with
--config.logging.wandb_project=NAME), Orbax checkpoints in {workdir}/checkpoints and, at the end,
a Hugging Face export in {workdir}/export. Resumes from the newest verified checkpoint when the
workdir holds the same run (--config.resume=force: even when it does not).

Exit status: 0 = finished (or stopped by SIGTERM after a checkpoint) with a finite model;
1 = refused or failed, with one line on stderr naming the key, file or tensor (invalid config,
a workdir holding a different run or in use by another trainer, a teacher whose tokenizer or
identity differs, non-finite training or model, I/O error); 130 = stopped by Ctrl-C (SIGINT):
the current step finishes, a checkpoint is written, one line says which (a second Ctrl-C stops
at once, without waiting for the step).
"""

import json
import logging
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "build mesh, shardings and shapes with jax.eval_shape; no weights")


def check_overrides(argv: list[str]) -> None:
    """Exits naming the key and the closest valid ones for a --config.KEY that does not exist
    (ml_collections would raise a bare AttributeError / KeyError while parsing flags)."""
    from scope_jax import config as config_lib

    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config."):].split("=", 1)[0]
        if key in config_lib.SCHEMA or key.split(".")[0] in config_lib.FREE:
            continue
        group = config_lib.group_keys(key)
        if group:
            raise SystemExit(f"error: --config.{key}: {key} is a group of config keys, not a key; set one of "
                             f"them, e.g. --config.{group[0]}=... (its keys: {', '.join(group)})")
        raise SystemExit(f"error: --config.{key}: unknown config key; closest valid: "
                         f"{', '.join(config_lib.closest(key)) or 'none'}")


# TensorStore (under Orbax) reports OS errors inside its messages: '... "PATH": ... [os_error_code='28']',
# sometimes with a '[tensorstore_spec=...]' JSON (holding other quoted strings) before the code.
_TS_OS_ERROR = re.compile(r"\[os_error_code='(\d+)'\]")
_QUOTED = re.compile(r'"([^"]+)"')


def _ts_io_error(text: str) -> str | None:
    """'PATH: reason (errno N)' of a TensorStore message with an os_error_code: the last quoted
    absolute path before it (outside the spec), else the last quoted string."""
    m = _TS_OS_ERROR.search(text)
    if not m:
        return None
    quoted = _QUOTED.findall(text[:m.start()].split("[tensorstore_spec=")[0])
    paths = [q for q in quoted if q.startswith("/")] or quoted
    if not paths:
        return None
    code = int(m.group(1))
    return f"{paths[-1]}: {os.strerror(code)} (errno {code})"


def io_error_line(e: BaseException) -> str | None:
    """'PATH: reason (errno N)' for the first I/O error in e's chain (an OSError, or a
    TensorStore error carrying an os_error_code), else None."""
    seen, x = set(), e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, OSError) and x.filename:
            return f"{x.filename}: {x.strerror or type(x).__name__} (errno {x.errno})"
        line = _ts_io_error(str(x))
        if line:
            return line
        x = x.__cause__ or x.__context__
    return None


class _NoOrbaxTracebacks(logging.Filter):
    """Orbax logs each failed async write with a traceback from every thread it passed through
    (hundreds of lines for one full disk); keep its one-line messages, drop the tracebacks."""

    def filter(self, record):
        if "orbax" in record.pathname and record.exc_info:
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_closed_loop(previous):
    """sys.unraisablehook that drops RuntimeError('Event loop is closed'): TensorStore callbacks
    of a failed Orbax write land on a closed asyncio loop and print one traceback each (dozens
    for one full disk), burying the real error; everything else goes to `previous`."""
    def hook(unraisable):
        if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed":
            return
        previous(unraisable)
    return hook


def main(argv):
    del argv
    sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("absl").addFilter(_NoOrbaxTracebacks())
    cfg = _CONFIG.value
    from scope_jax import checkpoint, train
    from scope_jax import config as config_lib
    from scope_jax.data import DataError
    from scope_jax.models.hf import CheckpointError

    if _DRY_RUN.value:
        print(json.dumps(train.dry_run(cfg), indent=2))
        return
    from scope_jax.teacher import TeacherError

    from scope_jax.compat import TokenizerMismatch

    expected = (config_lib.ConfigError, checkpoint.RunMismatch, checkpoint.NonFiniteError, DataError,
                CheckpointError, TeacherError, checkpoint.WorkdirLocked, TokenizerMismatch)
    try:
        config_lib.validate(cfg)
        if cfg.get("toy_dir"):  # the toy configs: build the toy task and models once (or reuse them)
            import fcntl

            from scope_jax import toy

            os.makedirs(cfg.toy_dir, exist_ok=True)
            with open(os.path.join(cfg.toy_dir, "build.lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # a trainer started meanwhile waits, then reuses the build
                toy.build_toy(cfg.toy_dir, settings=toy.toy_settings(cfg.toy_family))
        last = train.train(cfg)
    except expected as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt as e:  # Ctrl-C: train.Interrupted after its checkpoint, else at once
        done = str(e) if isinstance(e, train.Interrupted) else (
            f"interrupted (Ctrl-C){f' ({e})' if str(e) else ''}; checkpoints in {cfg.workdir}/checkpoints hold "
            "every saved step: the same command resumes")
        print(done, file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)
    except Exception as e:  # noqa: BLE001 - Orbax and asyncio wrap I/O errors in their own
        line = io_error_line(e)
        if line is None:
            raise  # a bug: keep the traceback
        # Exit now: Orbax / TensorStore callbacks still pending would print "Event loop is
        # closed" tracebacks during interpreter shutdown, after this line. The workers and the
        # checkpoint manager were closed by train()'s `finally`.
        print(f"error: {line}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    print(json.dumps({k: last[k] for k in ("step", "loss", "accuracy") if k in last}))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    check_overrides(sys.argv)
    app.run(main)
