"""Metrics views: TensorBoard events and W&B (scope_jax.tracking) and the run plots
(tools/plot_runs.py). The trainer's own events are checked in test_train.py; the values here are
read back with tensorboard's EventAccumulator, an independent reader."""

import json
import sys
import types

import numpy as np
import pytest

from scope_jax import tracking
from tools import plot_runs


def _scalars(logdir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_writer_logs_numeric_entries_and_a_restart_replaces_later_steps(tmp_path):
    with tracking.MetricsWriter(str(tmp_path)) as w:
        for step in range(4):
            w.write(step, {"step": step, "loss": 1.0 / (step + 1), "correct/ess": 2.0, "flag": True,
                           "note": "text"})
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["correct/ess", "loss"]  # no step, bool or string
    assert _scalars(tmp_path, "loss") == [(s, pytest.approx(1.0 / (s + 1))) for s in range(4)]
    import time

    time.sleep(1.1)  # event file names carry the second they were opened
    with tracking.MetricsWriter(str(tmp_path), start_step=2) as w:  # resumed from step 2
        w.write(2, {"loss": 7.0})
    assert _scalars(tmp_path, "loss") == [(0, 1.0), (1, 0.5), (2, 7.0)]


def test_eval_summaries_one_run_per_model(tmp_path):
    s = {"avg_at_k": 0.25, "pass_at_k": 0.5, "pass_curve": [0.25, 0.4, 0.5]}
    tracking.write_eval_summaries(str(tmp_path), {"scope": {"math500": s}, "opd": {"math500": s}},
                                  macro={"scope": {"avg_at_k": 0.3, "pass_at_k": 0.6}}, step=200)
    assert _scalars(tmp_path / "scope", "math500/avg_at_k") == [(200, 0.25)]
    assert _scalars(tmp_path / "scope", "macro/pass_at_k") == [(200, pytest.approx(0.6))]
    assert _scalars(tmp_path / "opd", "math500/pass_curve") == [(1, 0.25), (2, pytest.approx(0.4)), (3, 0.5)]


class _FakeWandb(types.ModuleType):
    """Records what the writer asks of wandb (no network, no account)."""

    def __init__(self):
        super().__init__("wandb")
        self.calls = []

    def init(self, **kw):
        self.calls.append(("init", kw))
        run = types.SimpleNamespace()
        run.log = lambda data, step: self.calls.append(("log", data, step))
        run.finish = lambda: self.calls.append(("finish",))
        return run


def test_wandb_only_when_configured(tmp_path, monkeypatch):
    from configs import toy

    cfg = toy.get_config()
    cfg.workdir = str(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    tracking.MetricsWriter.for_training(cfg, 0).close()  # not configured: never imported
    cfg.logging.wandb_project = "scope-toy"
    with pytest.raises(ImportError, match="logging.wandb_project.*pip install wandb"):
        tracking.MetricsWriter.for_training(cfg, 0)

    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg.logging.run_name = "toy-scope"
    w = tracking.MetricsWriter.for_training(cfg, 0)
    w.write(3, {"step": 3, "loss": 0.5, "rollouts": 8})
    w.close()
    (_, init), log, finish = fake.calls
    assert init["project"] == "scope-toy" and init["name"] == "toy-scope" and init["entity"] is None
    assert init["config"]["algo"] == "scope" and init["dir"] == cfg.workdir
    assert log == ("log", {"loss": 0.5, "rollouts": 8.0}, 3) and finish == ("finish",)
    assert _scalars(cfg.workdir, "loss") == [(3, 0.5)]  # TensorBoard as well


def _write_run(path, rows):
    path.mkdir(parents=True)
    with open(path / "metrics.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_plot_runs_series_and_png(tmp_path):
    scope = [{"step": s, "loss": 10.0 - s, "accuracy": 0.1 * s, "correct/ess": 1.0 + s,
              "wrong/ess": 2.0, "correct/max_weight": 0.5, "wrong/max_weight": 0.6,
              "time_s": 2.0, "rollout_s": 1.5, "rollouts_per_s": 4.0} for s in range(5)]
    scope[3]["step"] = 2  # a resumed run repeats step 2: the later row counts
    scope[4]["step"] = 3
    opd = [{"step": s, "loss": 5.0, "accuracy": 0.2, "time_s": 1.0, "correct/ess": 0.0, "wrong/ess": 8.0}
           for s in range(3)]
    _write_run(tmp_path / "scope", scope)
    _write_run(tmp_path / "opd", opd)
    runs = {"scope": plot_runs.read_metrics(str(tmp_path / "scope")),
            "opd": plot_runs.read_metrics(str(tmp_path / "opd" / "metrics.jsonl"))}

    data = plot_runs.series(runs)
    assert list(data) == ["loss", "accuracy", "max weight per path", "ESS per path", "stage times"]
    steps, loss = data["loss"]["scope"]
    assert steps.tolist() == [0, 1, 2, 3] and loss.tolist() == [10.0, 9.0, 7.0, 6.0]
    # OPD's correct path does not exist (reported as 0): left out; rollouts_per_s is no stage time
    assert set(data["ESS per path"]) == {"scope: correct/ess", "scope: wrong/ess", "opd: wrong/ess"}
    assert set(data["stage times"]) == {"scope: rollout_s", "scope: time_s", "opd: time_s"}
    smooth = plot_runs.series(runs, smooth=2)["loss"]["scope"][1]
    assert smooth.tolist() == [10.0, 9.5, 8.0, 6.5]  # trailing means, by hand

    out = tmp_path / "curves.png"
    assert plot_runs.main([str(tmp_path / "scope"), f"baseline={tmp_path / 'opd'}", "--out", str(out)]) == 0
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_runs_rejects_bad_input(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"step": 0, "loss": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not JSON"):
        plot_runs.read_metrics(str(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot_runs.read_metrics(str(tmp_path))
    with pytest.raises(ValueError, match="no plottable metrics"):
        plot_runs.plot_runs({"x": [{"step": 0, "other": 1.0}]}, str(tmp_path / "x.png"))
    assert plot_runs._trailing_mean(np.array([1.0, 2.0, 3.0]), 5).tolist() == [1.0, 1.5, 2.0]
