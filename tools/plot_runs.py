"""Training curves of several runs on one figure, from their metrics.jsonl, saved as a PNG.

    python -m tools.plot_runs runs/demo/scope runs/demo/opd --out runs/demo/curves.png
    python -m tools.plot_runs scope=runs/a/metrics.jsonl opd=runs/b --smooth 10

A run is a workdir (its metrics.jsonl) or a .jsonl file, optionally NAME=PATH (the name defaults
to the directory's base name). Panels, each drawn when some run has its keys: loss, accuracy
(the verifier's fraction of correct rollouts), max weight and effective sample size per SCOPE
path (correct/*, wrong/*), and stage times (keys ending in _s: time_s, rollout_s, ...; not rollouts_per_s).
--smooth N plots the trailing mean over N steps.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

# (panel title, y label, keys): a key matches exactly.
PANELS = (
    ("loss", "loss", ("loss",)),
    ("accuracy", "fraction correct", ("accuracy",)),
    ("max weight per path", "mean over prompts", ("correct/max_weight", "wrong/max_weight")),
    ("ESS per path", "1 / sum w^2", ("correct/ess", "wrong/ess")),
)
STAGES = "stage times"  # the panel of keys ending in "_s"


def read_metrics(path: str) -> list[dict]:
    """Rows of a metrics.jsonl (or of a workdir's), in file order; a bad line raises naming it."""
    file = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: no metrics.jsonl (expected a run's workdir or a .jsonl file)")
    rows = []
    with open(file) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or "step" not in row:
                raise ValueError(f"{file}:{n}: expected an object with a 'step' field")
            rows.append(row)
    return rows


def _trailing_mean(y: np.ndarray, n: int) -> np.ndarray:
    """Mean of the last n values at each point (fewer at the start)."""
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, y.size + 1)
    lo = np.maximum(idx - n, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def series(runs: dict[str, list[dict]], smooth: int = 1) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """panel title -> line label -> (steps [N], values [N]); panels and lines without data are left out.

    A line is labelled by the run name, plus the key when the panel has several keys. Rows
    missing a key are skipped for that key; a resumed run's repeated steps keep the last row.
    In panels of several keys a line that is 0 at every step is left out (OPD reports its
    absent correct path's weights as 0).
    """
    out: dict[str, dict] = {}
    stage_keys = sorted({k for rows in runs.values() for r in rows for k in r
                         if k.endswith("_s") and not k.endswith("per_s")})
    panels = list(PANELS) + ([(STAGES, "seconds per step", tuple(stage_keys))] if stage_keys else [])
    for title, _, keys in panels:
        lines = {}
        for name, rows in runs.items():
            by_step = {}
            for r in rows:
                by_step[int(r["step"])] = r
            for key in keys:
                pts = [(s, float(r[key])) for s, r in sorted(by_step.items())
                       if isinstance(r.get(key), (int, float))]
                if not pts:
                    continue
                steps, values = (np.asarray(v) for v in zip(*pts))
                if len(keys) > 1 and not values.any():
                    continue  # e.g. OPD's correct-path weights: reported as 0, there is no such path
                label = name if len(keys) == 1 else f"{name}: {key}"
                lines[label] = (steps, _trailing_mean(values, smooth) if smooth > 1 else values)
        if lines:
            out[title] = lines
    return out


def plot_runs(runs: dict[str, list[dict]], out: str, *, smooth: int = 1, title: str | None = None) -> str:
    """Draws series(runs, smooth) as one figure of panels and saves it as a PNG; returns `out`.

    Uses matplotlib's object API (no pyplot backend switch, so a notebook's inline backend is
    left alone).
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    data = series(runs, smooth)
    if not data:
        raise ValueError(f"no plottable metrics in runs {sorted(runs)}")
    ylabels = {t: y for t, y, _ in PANELS} | {STAGES: "seconds per step"}
    cols = min(3, len(data))
    rows = -(-len(data) // cols)
    fig = Figure(figsize=(5 * cols, 3.4 * rows), dpi=110)
    for i, (panel, lines) in enumerate(data.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        for label, (x, y) in lines.items():
            ax.plot(x, y, label=label, linewidth=1.2)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabels[panel])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out)
    return out


def _named(arg: str) -> tuple[str, str]:
    """'NAME=PATH' or 'PATH' -> (name, path); the name defaults to the run directory's name."""
    if "=" in arg and not os.path.exists(arg):
        name, path = arg.split("=", 1)
        return name, path
    path = os.path.normpath(arg)
    base = os.path.dirname(path) if path.endswith(".jsonl") else path
    return os.path.basename(base) or path, arg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="workdir or metrics.jsonl, optionally NAME=PATH")
    p.add_argument("--out", default="runs/curves.png", help="PNG to write (default runs/curves.png)")
    p.add_argument("--smooth", type=int, default=1, help="trailing mean over this many steps")
    p.add_argument("--title")
    args = p.parse_args(argv)
    if args.smooth < 1:
        p.error(f"--smooth must be >= 1, got {args.smooth}")
    runs = {}
    for arg in args.runs:
        name, path = _named(arg)
        if name in runs:
            p.error(f"run name {name!r} given twice; use NAME=PATH")
        runs[name] = read_metrics(path)
    print(plot_runs(runs, args.out, smooth=args.smooth, title=args.title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
