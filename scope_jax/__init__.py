"""scope_jax: SCOPE on-policy distillation and its baselines in JAX / Flax NNX.

Submodules are imported on demand so that `import scope_jax.losses` pulls in only jax and numpy.
"""

__version__ = "0.1.0"
