"""The blind-spot toy: configs/toy.py with a teacher that saw only 5% of the training problems
with a product (scope_jax.toy.FAMILIES["blindspot"]), so its guidance after the student's errors
on products is unreliable (the paper's section 7 premise; measured by tools/premise.py).

    python -m tools.make_toy --family blindspot --out runs/toy_blindspot      # build it first
    python -m tools.train --config configs/toy_blindspot.py:opd_n --config.num_steps=30

toy_dir is empty: the trainer's automatic build (scope_jax.train) builds the default family
only, so this toy is built by tools/make_toy.py (as above) or tools/study.py.
"""

from configs import common, toy


def get_config(variant: str = ""):
    c = toy.get_config()
    c.toy_family = "blindspot"
    c.toy_dir = ""
    c.workdir = "runs/toy_blindspot_scope"
    c.student = "runs/toy_blindspot/student"
    c.teacher = "runs/toy_blindspot/teacher"
    c.data.train_files = "runs/toy_blindspot/data/train.jsonl"
    return common.apply_variant(c, variant)
