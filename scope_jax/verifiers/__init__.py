"""Host-side answer verifiers: model output in, correctness label out. Math answers are parsed,
never eval'd; code runs only inside the bubblewrap sandbox (scope_jax.verifiers.code)."""
from scope_jax.verifiers.code import (
    CodeTests,
    SandboxUnavailable,
    extract_code,
    require_sandbox,
    verify_code,
)
from scope_jax.verifiers.math import (
    REASONS,
    extract_answer,
    extract_boxed,
    extract_final_number,
    extract_gsm8k_gold,
    gold_answers,
    verify,
)
from scope_jax.verifiers.pool import InlineVerifier, Verifier, verify_batch
from scope_jax.verifiers.result import VerifyResult

__all__ = [
    "CodeTests",
    "SandboxUnavailable",
    "extract_code",
    "require_sandbox",
    "verify_code",
    "InlineVerifier",
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
