"""The blind-spot toy: configs/toy.py with a teacher that saw only 5% of the training problems
with a product (scope_jax.toy.FAMILIES["blindspot"]). Measured premise (tools/premise.py,
README): its recovery does not fall with teacher PPL; configs/toy_unsure.py is the second design.

    python -m tools.train --config configs/toy_blindspot.py:opd_n --config.num_steps=30

tools/train.py builds the toy in runs/toy_blindspot on first use (or reuses it), as
`python -m tools.make_toy --family blindspot --out runs/toy_blindspot` would.
"""

from configs import common, toy


def family_config(family: str, variant: str = ""):
    """configs/toy.py pointed at the runs/toy_<family> build, with `variant` applied."""
    c = toy.get_config()
    c.toy_family = family
    c.toy_dir = f"runs/toy_{family}"
    c.workdir = f"runs/toy_{family}_scope"
    c.student = f"runs/toy_{family}/student"
    c.teacher = f"runs/toy_{family}/teacher"
    c.data.train_files = f"runs/toy_{family}/data/train.jsonl"
    return common.apply_variant(c, variant)


def get_config(variant: str = ""):
    return family_config("blindspot", variant)
