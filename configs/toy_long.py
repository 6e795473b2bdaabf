"""The long toy (issue 22): configs/toy.py on scope_jax.toy.FAMILIES["long"], a running-state
program with resets whose worked solutions run to ~120-235 tokens, with errors at any step and
recovery by construction (design record: docs/study_longtoy.md).

    python -m tools.make_toy --family long --out runs/toy_long          # or let tools/train build it
    python -m tools.premise --toy-dir runs/toy_long --out runs/premise/toy_long --problems 128 --continuations 2
    python -m tools.train --config configs/toy_long.py:scope --config.num_steps=30

The second design, FAMILIES["long_styles"] (the student also writes a second style the teacher
never saw), is long_config("long_styles", variant); tools/study.py --toys long_styles uses it.

Only what the longer responses need changes from configs/toy.py: the response budget (320
tokens: the longest worked solution is ~240) and the prompt budget (the program is in the
prompt, up to ~100 tokens). The RL settings are the toy's (8 rollouts, T = 0.6, tau = 1).
"""

from configs.toy_blindspot import family_config


def long_config(family: str = "long", variant: str = ""):
    """configs/toy.py on the runs/toy_<family> build of a long-toy family ("long" or
    "long_styles", scope_jax.toy.FAMILIES) with `variant` applied, and the long budgets."""
    c = family_config(family, variant)
    c.data.max_prompt_len = 128
    c.sampling.max_new_tokens = 320
    return c


def get_config(variant: str = ""):
    return long_config("long", variant)
