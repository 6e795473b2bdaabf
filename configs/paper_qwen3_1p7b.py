"""Setup 2 of the paper: Qwen3-1.7B-Base <- Qwen3-8B on DeepMath (Qwen3 architecture).

    python -m tools.train --config configs/paper_qwen3_1p7b.py \
        --config.student=/ckpt/Qwen3-1.7B-Base --config.teacher=/ckpt/Qwen3-8B \
        --config.data.train_files=/data/deepmath.parquet --config.workdir=gs://bucket/scope_qwen3
    python -m tools.train --config configs/paper_qwen3_1p7b.py:grpo ...   # variants: configs/common.py
    python -m tools.train --config configs/paper_qwen3_1p7b.py --dry_run

Same hyper-parameters as setup 1 (the paper's setup: scope_jax/losses.py docstring). The paper evaluates this student with
repetition penalty 1.08 (training samples without one, as here):
    python -m tools.eval --model runs/paper_qwen3_1p7b/export --data math500 --data aime24 \
        --repetition-penalty 1.08 --out runs/paper_qwen3_1p7b/eval
"""

import ml_collections

from configs import common

QWEN3_1P7B_BASE = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=2048,
    intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
    head_dim=128, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
    tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643)
QWEN3_8B = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=4096,
    intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
    tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645)


def get_config(variant: str = ""):
    c = common.base()
    c.workdir = "runs/paper_qwen3_1p7b"
    c.num_steps = 500
    c.data.train_files = "data/deepmath.parquet"
    c.data.spec = "deepmath"
    c.data.style = "deepmath"
    c.data.max_prompt_len = 4096
    c.sampling.max_new_tokens = 12288
    c.prompts_per_step = 256
    c.num_samples = 8
    c.micro_batches = 1  # with packing the plan sets the micro-batches: one 16k-token row per batch shard each
    c.packing = 4096 + 12288  # packed train step, rows of prompt bucket + max_new_tokens (common.py)
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 64, "tensor": 4})
    c.verifier.num_workers = 8
    c.arch = ml_collections.ConfigDict({"student": QWEN3_1P7B_BASE, "teacher": QWEN3_8B})
    return common.apply_variant(c, variant)
