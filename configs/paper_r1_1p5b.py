"""Setup 1 of the paper: DeepSeek-R1-Distill-Qwen-1.5B <- Skywork-OR1-7B on DeepMath (Qwen2).

    python -m tools.train --config configs/paper_r1_1p5b.py \
        --config.student=/ckpt/DeepSeek-R1-Distill-Qwen-1.5B --config.teacher=/ckpt/Skywork-OR1-7B \
        --config.data.train_files=/data/deepmath.parquet --config.workdir=gs://bucket/scope_r1
    python -m tools.train --config configs/paper_r1_1p5b.py:opd ...     # baselines / ablations:
                                                                       # see configs/common.py
    python -m tools.train --config configs/paper_r1_1p5b.py --dry_run  # shapes + shardings, no weights

Hyper-parameters: the paper's setup (scope_jax/losses.py docstring): AdamW lr 5e-5 constant,
wd 0.01, 256 prompts x 8 rollouts, one update per batch, max prompt 4,096, max response 12,288,
temperature 0.6, tau 1.
The mesh is written for a 256-chip TPU slice: FSDP over 64 x tensor 4 (run on every host; the
prompt batch is split across hosts).
"""

import ml_collections

from configs import common

# Architectures (config.json values) so --dry_run works without the checkpoints.
R1_DISTILL_QWEN_1P5B = dict(
    architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936, hidden_size=1536,
    intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
    max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
    bos_token_id=151646, eos_token_id=151643)
SKYWORK_OR1_7B = dict(
    architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=152064, hidden_size=3584,
    intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
    max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
    bos_token_id=151646, eos_token_id=151643)


def get_config(variant: str = ""):
    c = common.base()
    c.workdir = "runs/paper_r1_1p5b"
    c.num_steps = 500
    c.checkpoint_every = 10
    c.data.train_files = "data/deepmath.parquet"
    c.data.spec = "deepmath"
    c.data.style = "deepmath"  # DeepMath rows carry their own prompt messages
    c.data.max_prompt_len = 4096  # the released script uses 2048
    c.sampling.max_new_tokens = 12288
    c.sampling.temperature = 0.6
    c.prompts_per_step = 256
    c.num_samples = 8
    c.micro_batches = 1  # with packing the plan sets the micro-batches: one 16k-token row per batch shard each
    c.packing = 4096 + 12288  # packed train step, rows of prompt bucket + max_new_tokens (common.py)
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 64, "tensor": 4})
    c.verifier.num_workers = 8
    c.arch = ml_collections.ConfigDict({"student": R1_DISTILL_QWEN_1P5B, "teacher": SKYWORK_OR1_7B})
    return common.apply_variant(c, variant)
