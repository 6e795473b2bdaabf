"""Host-side answer verifiers: model output in, correctness label out (never eval'd)."""
from scope_jax.verifiers.math import (
    REASONS,
    Verifier,
    VerifyResult,
    extract_answer,
    extract_boxed,
    extract_final_number,
    extract_gsm8k_gold,
    gold_answers,
    verify,
    verify_batch,
)

__all__ = [
    "REASONS",
    "Verifier",
    "VerifyResult",
    "extract_answer",
    "extract_boxed",
    "extract_final_number",
    "extract_gsm8k_gold",
    "gold_answers",
    "verify",
    "verify_batch",
]
