"""Experiment tracking: scalars to TensorBoard event files (tensorboardX) and, when configured,
to Weights & Biases. The JSONL files (metrics.jsonl, results.json) stay the record; this is the
view practitioners watch:

    tensorboard --logdir runs/

Training writes the events beside {workdir}/metrics.jsonl (tags are the JSONL keys: loss,
accuracy, correct/ess, wrong/max_weight, time_s, ...); tools/eval.py writes them in
{out}/<model>/ (tags <benchmark>/avg_at_k, <benchmark>/pass_at_k, <benchmark>/pass_curve with
k as the step).
"""

from __future__ import annotations

import numbers
import os


def _scalars(row: dict) -> dict[str, float]:
    """The numeric entries of a metrics row (bools and strings dropped), as floats."""
    return {k: float(v) for k, v in row.items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool) and k != "step"}


class MetricsWriter:
    """Writes rows of scalars, one row per step, to TensorBoard and optionally to W&B.

    logdir: directory of the event files. start_step: a resumed run's first step; TensorBoard
    discards the events of steps >= start_step left by the interrupted run (purge_step), as the
    JSONL writer drops their lines. wandb_project: when non-empty, also log to this W&B project
    (wandb is imported only then; a clear error when it is not installed). config: a dict
    recorded with the W&B run.
    """

    def __init__(self, logdir: str, *, start_step: int = 0, wandb_project: str = "",
                 wandb_entity: str = "", run_name: str = "", config: dict | None = None):
        from tensorboardX import SummaryWriter

        self.logdir = logdir
        self._tb = SummaryWriter(logdir, purge_step=start_step or None, flush_secs=10)
        self._wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ImportError(
                    f"W&B logging is configured (wandb_project={wandb_project!r}, config key "
                    "logging.wandb_project) but the wandb package is not installed: "
                    "pip install wandb, or set the project to ''") from e
            self._wandb = wandb.init(project=wandb_project, entity=wandb_entity or None,
                                     name=run_name or None, config=config, dir=logdir)

    @classmethod
    def for_training(cls, cfg, start_step: int) -> "MetricsWriter":
        """The train loop's writer: events in cfg.workdir; W&B when cfg.logging.wandb_project."""
        lg = cfg.get("logging", None)
        get = lambda key: (lg.get(key, "") if lg is not None else "") or ""
        project = get("wandb_project")
        return cls(cfg.workdir, start_step=start_step, wandb_project=project,
                   wandb_entity=get("wandb_entity"), run_name=get("run_name"),
                   config=cfg.to_dict() if project else None)

    def write(self, step: int, row: dict, prefix: str = "") -> None:
        """Logs the numeric entries of `row` at `step` (tag = prefix + key), nan / inf included."""
        scalars = {prefix + k: v for k, v in _scalars(row).items()}
        for tag, value in scalars.items():
            self._tb.add_scalar(tag, value, global_step=int(step))
        self._tb.flush()  # a killed run keeps its steps (a step takes seconds; a flush is cheap)
        if self._wandb is not None:
            self._wandb.log(scalars, step=int(step))

    def close(self) -> None:
        self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_eval_summaries(out_dir: str, results: dict, macro: dict | None = None, step: int = 0) -> None:
    """TensorBoard events of an evaluation, one run per model in out_dir/<model>/.

    results: model -> benchmark -> summary (scope_jax.evaluation.evaluate's summary: avg_at_k,
    pass_at_k, pass_curve [K], ...); macro: model -> summary over benchmarks. step: the training
    step of the evaluated checkpoint, when known (the x axis of avg_at_k / pass_at_k).
    """
    for model, per_bench in results.items():
        items = list(per_bench.items()) + ([("macro", macro[model])] if macro and model in macro else [])
        with MetricsWriter(os.path.join(out_dir, model)) as w:
            for bench, s in items:
                w.write(step, {"avg_at_k": s["avg_at_k"], "pass_at_k": s["pass_at_k"]}, prefix=f"{bench}/")
                for k, p in enumerate(s.get("pass_curve") or [], start=1):
                    w.write(k, {"pass_curve": p}, prefix=f"{bench}/")
