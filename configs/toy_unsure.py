"""The unsure-teacher toy: configs/toy.py with a teacher trained on worked solutions whose
product results are off by one 60% of the time (scope_jax.toy.FAMILIES["unsure"]), so it is
unsure, and often wrong, exactly on products.

    python -m tools.train --config configs/toy_unsure.py:scope --config.num_steps=30   # builds it first
"""

from configs.toy_blindspot import family_config


def get_config(variant: str = ""):
    return family_config("unsure", variant)
