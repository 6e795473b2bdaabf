"""The outcome of checking one response, shared by every verifier (math, code, the pool)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """Outcome of checking one response.

    reward: 1.0 if the response's final answer equals a gold answer, else 0.0.
    reason: one of the checking verifier's REASONS (scope_jax.verifiers.math / code).
    extracted: the final answer taken from the response (None when there is none).
    detail: a human-readable note for failures (why parsing was refused, the error raised).
    """

    reward: float
    reason: str
    extracted: str | None = None
    detail: str = ""
