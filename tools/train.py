"""Train with SCOPE or a baseline from an ml_collections config.

    python -m tools.train --config configs/toy.py --config.algo=scope --config.workdir=runs/toy_scope
    python -m tools.train --config configs/toy.py:opd            # a named variant (configs/common.py)
    python -m tools.train --config configs/paper_r1_1p5b.py --dry_run   # shapes and shardings only

Writes {workdir}/metrics.jsonl (one JSON object per step) and TensorBoard events beside it
(scope_jax.tracking; W&B too with --config.logging.wandb_project=NAME), Orbax checkpoints in
{workdir}/checkpoints and, at the end, a Hugging Face export in {workdir}/export.
Resumes from the latest checkpoint in the workdir when there is one.
"""

import json
import logging

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "build mesh, shardings and shapes with jax.eval_shape; no weights")


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    cfg = _CONFIG.value
    from scope_jax import train

    if _DRY_RUN.value:
        print(json.dumps(train.dry_run(cfg), indent=2))
        return
    last = train.train(cfg)
    print(json.dumps({k: last[k] for k in ("step", "loss", "accuracy") if k in last}))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
