"""SCOPE and its baselines end to end: sample -> verify -> score -> update -> checkpoint.

    python -m tools.train --config configs/toy.py --config.algo=scope --config.workdir=runs/x

This file is the host loop (`train`) and the dry run (`dry_run`). The pieces it wires, with the
mesh in effect: scope_jax.collect.Collector (generate, verify, score a step's rollouts through
scope_jax.rollout and scope_jax.scoring), scope_jax.step (the jitted, donated update;
`lower_step` lowers it without weights), the teacher (scope_jax.teacher) and Orbax
(scope_jax.checkpoint). docs/architecture.md draws the modules. Algorithms (config.algo):

    scope  correct rollouts -> MLE weighted by student PPL; wrong -> OPD weighted by teacher PPL
    opd    every rollout -> OPD with uniform weights (num_samples=1 is the paper's baseline)
    grpo   group-normalised rewards, PPO clip, k3 KL to the initial student
    kd     off-policy: SFT on the teacher's own (verified) samples

Resume order: the run's newest checkpoint in {workdir}/checkpoints that verifies (checksums,
finite leaves; a failing one is moved to checkpoints/corrupt/, see scope_jax.checkpoint), else
the initial Hugging Face checkpoint (config.student). {workdir}/config.json must describe the
same run. Data order and PRNG keys are pure functions of (seed, step), so a resumed run repeats
exactly what an uninterrupted one would have done. A run that ends on non-finite steps or with
a non-finite model raises (no export).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from transformers import AutoTokenizer

from scope_jax import algorithms, checkpoint, compat, data, rollout, sampling, scoring, tracking
from scope_jax import config as config_lib
from scope_jax import sharding as shd
from scope_jax import teacher as teachers
from scope_jax.collect import Collector
from scope_jax.models import abstract_model, dtype_named, load_hf, save_hf
from scope_jax.models.hf import check_finite
from scope_jax.step import TrainState, build_step, lower_step, make_optimizer, state_shardings
from scope_jax.verifiers import Verifier

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The host loop.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Stop:
    """Set by SIGTERM or SIGINT (Ctrl-C): the loop writes a checkpoint after the current step and
    exits (SIGINT: raising Interrupted). A second SIGINT raises KeyboardInterrupt at once."""

    requested: bool = False
    signum: int = 0

    def __call__(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt("second interrupt: stopped at once, without waiting for the step")
        log.warning("signal %d: checkpointing after this step, then exiting", signum)
        self.requested, self.signum = True, signum


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT after writing its checkpoint; the message says which."""


def _load_models(cfg, mesh):
    if cfg.get("teacher_url"):  # refuse what a remote teacher cannot do before reading weights
        teachers.check_remote_config(cfg)
    m = cfg.model
    student = load_hf(cfg.student, dtype=dtype_named(m.dtype), param_dtype=dtype_named(m.param_dtype), mesh=mesh,
                      remat=m.remat_policy)
    teacher = None
    if algorithms.loads_local_teacher(cfg):  # else it lives on its server (config.teacher_url)
        teacher = load_hf(cfg.teacher, dtype=dtype_named(m.teacher_dtype), mesh=mesh)
        # A NaN teacher is named at load (its tensor, or its logits), as the student export is.
        if jax.process_count() == 1:
            check_finite(teacher, f"teacher {cfg.teacher}")
        else:
            checkpoint.check_finite(nnx.to_pure_dict(nnx.state(teacher)), f"teacher {cfg.teacher}: parameter")
    return student, teacher


def _load_prompts(cfg, tokenizer):
    examples = []
    for f in ([cfg.data.train_files] if isinstance(cfg.data.train_files, str) else list(cfg.data.train_files)):
        examples.extend(data.load_examples(f, cfg.data.spec or None, on_error=cfg.data.on_error))
    ids, kept = data.encode_prompts(examples, tokenizer, max_prompt_len=cfg.data.max_prompt_len,
                                    instruction=cfg.data.instruction or None, style=cfg.data.style)
    items = [(tok, examples[i].answer) for tok, i in zip(ids, kept)]
    if len(items) < cfg.prompts_per_step:
        raise ValueError(f"only {len(items)} usable prompts, fewer than prompts_per_step={cfg.prompts_per_step}")
    return data.PromptLoader(items, batch_size=cfg.prompts_per_step, seed=cfg.seed)


def _to_host(metrics: dict) -> dict:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def train(cfg) -> dict:
    """Runs cfg.num_steps of cfg.algo; returns the last step's metrics. See the module docstring.

    One writer per workdir: holds {workdir}/run.lock for the whole run (checkpoint.WorkdirLock;
    raises checkpoint.WorkdirLocked when another trainer holds it)."""
    config_lib.validate(cfg)  # before the workdir exists
    shd.initialize_distributed()
    os.makedirs(cfg.workdir, exist_ok=True)
    with checkpoint.WorkdirLock(cfg.workdir):
        return _train_locked(cfg)


def _train_locked(cfg) -> dict:
    """train() under the workdir's lock (train() validated cfg and made the workdir)."""
    compat.check_tokenizers(cfg)  # student and teacher tokenizers map text to the same ids
    # Before any weights load: the workdir must hold this run (or none), see scope_jax.checkpoint.
    checkpoint.check_identity(cfg.workdir, checkpoint.identity(cfg), force=cfg.resume == "force")
    mesh = shd.make_mesh(cfg.mesh)
    shd.check_partition(cfg.micro_batches, mesh, cfg.prompts_per_step * cfg.num_samples)
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.student)
    loader = _load_prompts(cfg, tokenizer)
    student, teacher = _load_models(cfg, mesh)
    graphdef, params = nnx.split(student)
    params = nnx.to_pure_dict(params)
    # GRPO's reference is the initial student; a copy, because the train state is donated.
    ref_params = jax.tree.map(jnp.copy, params) if algorithms.get(cfg.algo).reference(cfg) else None
    optimizer = make_optimizer(cfg)
    state = TrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))

    ckpt = checkpoint.Checkpointer(os.path.join(cfg.workdir, "checkpoints"), max_to_keep=cfg.max_to_keep,
                                   async_save=cfg.async_checkpointing)
    restored = ckpt.restore_latest(state)  # verified: checksums and finite leaves
    if restored is None:
        checkpoint.check_finite(params, f"{cfg.student}: the initial student's parameter")
    state = restored if restored is not None else state
    start = int(state.step)
    log.info("%s from step %d (%s)", "resuming" if restored is not None else "starting", start,
             ckpt.directory if restored is not None else cfg.student)
    metrics_out = (checkpoint.Metrics(os.path.join(cfg.workdir, "metrics.jsonl"), start)
                   if jax.process_index() == 0 else None)
    board = tracking.MetricsWriter.for_training(cfg, start) if jax.process_index() == 0 else None  # TensorBoard / W&B

    state_sh = state_shardings(optimizer, nnx.to_pure_dict(shd.model_shardings(student, mesh)), mesh, params)
    state, batch_sh = jax.device_put(state, state_sh), shd.batch_sharding(mesh)
    step_fn = shd.under_mesh(build_step(cfg, graphdef, optimizer, state_sh, mesh), mesh)
    alg = algorithms.get(cfg.algo)
    # Who scores the rollouts: the loaded teacher, or the server at config.teacher_url.
    teacher_scorer = teachers.from_config(cfg, teacher, mesh) if alg.teacher_scores else None
    stop = _Stop()
    previous = signal.signal(signal.SIGTERM, stop)
    previous_int = signal.signal(signal.SIGINT, stop)  # Ctrl-C: as SIGTERM, then Interrupted
    teacher_nan = []  # steps whose teacher log-probs held NaN / inf (issue 23)
    verifier = Verifier(num_workers=cfg.verifier.num_workers, timeout_s=cfg.verifier.timeout_s)
    collector = Collector(
        cfg=cfg, loader=loader, tokenizer=tokenizer, verifier=verifier, graphdef=graphdef,
        score=shd.under_mesh(scoring.make_score(cfg), mesh), mesh=mesh,
        # The same stop ids as evaluation (sampling.stop_ids), plus config.sampling.eos_ids.
        settings=rollout.settings_from_config(cfg, model_config=student.config, tokenizer=tokenizer,
                                              checkpoint=cfg.student),
        policy=teacher if alg.samples_with == "teacher" else student, key=jax.random.key(cfg.seed),
        reference=ref_params, teacher_scorer=teacher_scorer)
    # The streak of skipped steps continues across a resume (from the kept metrics rows).
    bad_in_a_row, last = metrics_out.tail_skipped if metrics_out is not None else 0, {}
    if jax.process_count() > 1:
        bad_in_a_row = int(multihost_utils.broadcast_one_to_all(np.int32(bad_in_a_row)))
    try:
        progress = _progress(start, cfg.num_steps) if jax.process_index() == 0 else None
        for step in range(start, cfg.num_steps):
            t0 = time.perf_counter()
            try:
                batch, packed, info = collector.collect(step, state.params)
            except teachers.TeacherError as e:
                # The teacher's server is gone: keep every finished step, then stop.
                ckpt.manager.wait_until_finished()
                if int(state.step) not in ckpt.manager.all_steps():
                    ckpt.save(state, wait=True)
                raise teachers.TeacherError(
                    f"{e}\nstep {step} was not trained; checkpoint {int(state.step)} in {ckpt.directory} "
                    "holds every finished step: the same command resumes from it") from e
            t1 = time.perf_counter()
            if alg.teacher_scores and checkpoint.first_nonfinite(batch.teacher_logprobs) is not None:
                teacher_nan.append(step)
                log.error("step %d: the teacher's log-probs hold NaN or inf: teacher %s", step,
                          cfg.teacher_url or cfg.teacher)
            if packed is not None:  # config.packing: several rollouts per row, planned by the collector
                state, m = step_fn(state, jax.device_put(batch, batch_sh), jax.device_put(packed, batch_sh))
            else:
                state, m = step_fn(state, jax.device_put(batch, batch_sh))
            m = _to_host(m)
            dt = time.perf_counter() - t0
            # accuracy: the verifier's fraction of correct rollouts (the loss's own "accuracy"
            # leaves out empty responses and is 0 by construction for OPD).
            row = {"step": step, **m, **info, "accuracy": m["reward"], "time_s": dt,
                   "rollout_s": t1 - t0, "time/update_s": dt - (t1 - t0),
                   "rollouts_per_s": info["rollouts"] / dt}
            if jax.process_index() == 0:
                metrics_out.write(row)
                board.write(step, row)
                progress(step, row)
            last = row
            bad_in_a_row = bad_in_a_row + 1 if m["skipped"] else 0
            if m["skipped"]:
                log.error("step %d: non-finite loss (%s), gradient norm (%s) or updated parameters; "
                          "update skipped (%d in a row)", step, m["loss"], m["grad_norm"], bad_in_a_row)
                # A run may not end on a streak of skipped steps either (K = the limit, or the
                # whole run when it is shorter): its model failed its last batches.
                limit = cfg.max_nonfinite_steps
                if bad_in_a_row >= (min(limit, cfg.num_steps) if step + 1 == cfg.num_steps else limit):
                    raise checkpoint.NonFiniteError(
                        f"{bad_in_a_row} non-finite step(s) in a row, up to step {step} of {cfg.num_steps} "
                        f"(max_nonfinite_steps={cfg.max_nonfinite_steps}); no export written. "
                        + (f"The teacher's log-probs were non-finite in step(s) {teacher_nan}: the teacher "
                           f"{cfg.teacher_url or cfg.teacher} (teacher_temperature={cfg.teacher_temperature}) failed, "
                           "not the student. " if teacher_nan else "")
                        + f"{_last_good(ckpt, step + 1 - bad_in_a_row, step)}")
            done = step + 1
            if stop.requested or done % cfg.checkpoint_every == 0 or done == cfg.num_steps:
                ckpt.save(state, wait=stop.requested)
            if stop.requested:
                log.warning("stopped by signal after step %d; checkpoint %d written", step, done)
                if stop.signum == signal.SIGINT:
                    raise Interrupted(f"interrupted (Ctrl-C) after step {step}: checkpoint {done} written in "
                                      f"{ckpt.directory}; the same command resumes from it")
                break
        else:
            if cfg.export and int(state.step) == cfg.num_steps:
                _check_finite_model(graphdef, state.params, loader, ckpt)
                _export(cfg, graphdef, state.params, tokenizer, save_hf)
    finally:
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous)
        verifier.close()
        if teacher_scorer is not None:
            teacher_scorer.close()
        ckpt.close()
        if board is not None:
            board.close()
    return last


def _last_good(ckpt, first_bad: int, last_bad: int) -> str:
    """Which checkpoint to go back to: checkpoint N holds the state after steps 0..N-1, and a
    skipped step leaves parameters and optimizer state as they were, so every checkpoint N with
    N <= last_bad holds a state from before the first skipped step (first_bad..last_bad skipped)."""
    ckpt.manager.wait_until_finished()
    good = [s for s in ckpt.manager.all_steps() if s <= last_bad]
    if not good:
        return ("No checkpoint holds a state from before the first skipped step: start again from the initial "
                "student, e.g. with a lower optim.lr in a new workdir.")
    n = max(good)
    why = ("the state step {f} started from" if n == first_bad else
           "the state from before the first skipped step {f}" + (" (the skipped steps changed nothing)" if n > first_bad else ""))
    return (f"Newest checkpoint holding {why.format(f=first_bad)}: {ckpt.directory}/{n}; continue from it with other "
            "settings (e.g. a lower optim.lr) and --config.resume=force, or in a new workdir.")


def _check_finite_model(graphdef, params, loader, ckpt) -> None:
    """Raises NonFiniteError unless every parameter, and the logits of one training prompt, are finite."""
    what = f"final model, no export written (checkpoints: {ckpt.directory}): parameter"
    checkpoint.check_finite(params, what)
    if jax.process_count() > 1:  # the logits check runs on one host's model only (not yet global)
        return
    ids = jnp.asarray([loader.batch_at(0)[0][0]], jnp.int32)
    if not bool(jnp.isfinite(nnx.merge(graphdef, params)(ids)).all()):
        raise checkpoint.NonFiniteError(f"{what}s are finite but the logits of the first training prompt are not")


def _progress(start: int, total: int):
    """A tqdm bar showing step, rollouts/s, accuracy and loss (plain log lines if tqdm is absent)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return lambda step, row: log.info("step %d %s", step, row)
    bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, mininterval=0)

    def update(step, row):
        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.3f}",
                        rps=f"{row['rollouts_per_s']:.1f}", refresh=False)
        bar.update(1)
        if step + 1 == total:
            bar.close()

    return update


def _export(cfg, graphdef, params, tokenizer, save_hf) -> None:
    """Final Hugging Face checkpoint (config.json + safetensors + tokenizer) in {workdir}/export."""
    path = os.path.join(cfg.workdir, "export")
    if os.path.exists(path):
        shutil.rmtree(path)
    save_hf(nnx.merge(graphdef, params), path)
    tokenizer.save_pretrained(path)
    log.info("exported %s", path)


# --------------------------------------------------------------------------------------------
# Dry run: the whole step's shapes and shardings on the configured mesh, without weights.
# --------------------------------------------------------------------------------------------


def dry_run(cfg) -> dict:
    """Builds the mesh and the parameter shardings, and lowers the train step train() runs
    (lower_step: no weights are created, nothing is compiled); reports parameters and bytes
    per device. tools/scale_check.py compiles the same step for memory, FLOPs and collectives."""
    mesh = shd.make_mesh(cfg.mesh)
    report = {"mesh": {k: int(v) for k, v in mesh.shape.items()}, "devices": int(mesh.size)}
    for role in ("student", "teacher") if algorithms.loads_local_teacher(cfg) else ("student",):
        _, params, shardings = abstract_model(cfg, role, mesh)
        leaves, shard_leaves = jax.tree.leaves(params), jax.tree.leaves(shardings)
        per_device = sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                         for x, s in zip(leaves, shard_leaves))
        report[role] = {"params": int(sum(math.prod(x.shape) for x in leaves)),
                        "param_bytes_per_device": int(per_device)}
    rows = cfg.prompts_per_step * cfg.num_samples  # global: the step takes the global batch
    p, r = sampling.prompt_bucket(cfg.data.max_prompt_len), int(cfg.sampling.max_new_tokens)
    # Packed: the most packed rows a batch can need, one rollout per row of config.packing tokens.
    lowered = lower_step(cfg, rows=rows, seq_len=cfg.packing or p + r, response_len=r, mesh=mesh)
    new_state, metrics = lowered.out_info
    report["batch"] = {"rollouts": rows, "sequence": cfg.packing or p + r,
                       "micro_batches": int(cfg.micro_batches), "packing": int(cfg.packing)}
    report["train_step"] = {"metrics": sorted(metrics), "state_leaves": len(jax.tree.leaves(new_state))}
    return report
