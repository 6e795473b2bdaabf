"""The train step as a pod sees it: compiled on 8 fake devices through step_lib.lower_step (the
jit, shardings, mesh context and micro-batching train() runs), with per-chip FLOPs and
collectives read off the optimised HLO by tools/scale_check.py."""

import re

import jax
import pytest

from scope_jax import collect, scoring, step as step_lib
from tools import scale_check

TINY = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=256, hidden_size=64,
            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=10000.0)
ROWS, SEQ, RESP = 64, 48, 40  # 48 and 40 are no parameter dimension of TINY: they mark activations


def _cfg(micro_batches=1, mesh=None, remat="full"):
    from configs import toy

    c = toy.get_config()
    c.student, c.teacher = "", ""
    c.arch = {"student": dict(TINY), "teacher": dict(TINY)}
    c.micro_batches = micro_batches
    c.model.remat_policy = remat
    c.mesh = mesh or {"data": 2, "fsdp": 4, "tensor": 1}
    return c


def _compiled(cfg):
    lowered = step_lib.lower_step(cfg, rows=ROWS, seq_len=SEQ, response_len=RESP)
    return lowered, lowered.compile()


def _activation_gathers(costs):
    """All-gathers whose result has a sequence or response axis: activations or batch arrays."""
    return [(k, s) for k, s, _ in costs["collectives"]
            if k == "all-gather" and any(d in (SEQ, RESP) for _, dims in scale_check._arrays(s) for d in dims)]


def test_hlo_costs_count_loop_trip_counts():
    # An independent count: a scan of 5 [16, 32] @ [32, 32] matmuls is 5 x 2 x 16 x 32 x 32 FLOPs,
    # which XLA's own cost_analysis counts once.
    import jax.numpy as jnp

    def f(w, x):
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0]

    compiled = jax.jit(f).lower(jnp.ones((5, 32, 32)), jnp.ones((16, 32))).compile()
    got = scale_check.hlo_costs(compiled.as_text())
    assert got["matmul_flops"] == 5 * 2 * 16 * 32 * 32
    assert got["unknown_trip_counts"] == 0


@pytest.mark.parametrize("remat", ["full", "none"])
def test_micro_batches_keep_per_chip_flops_and_never_gather_activations(remat):
    assert len(jax.devices()) == 8
    flops = {}
    for n in (1, 2, 4, 8):
        lowered, compiled = _compiled(_cfg(n, remat=remat))
        costs = scale_check.hlo_costs(compiled.as_text())
        assert costs["unknown_trip_counts"] == 0
        assert _activation_gathers(costs) == [], f"micro_batches={n}: activations or batch all-gathered"
        flops[n] = costs["matmul_flops"]
        # The model's activation sharding constraints are in the step (the mesh is in effect).
        text = lowered.as_text()
        assert len(re.findall(r"sharding_constraint", text)) >= 2 * TINY["num_hidden_layers"], n
    for n, f in flops.items():
        assert f == pytest.approx(flops[1], rel=0.05), (n, flops)


def test_per_chip_flops_match_the_ideal_count():
    # Matmul FLOPs per chip, counted from the HLO, against the analytic 6 N T (+ attention,
    # lm_head, remat) of tools/scale_check.ideal_flops: a wrong partition (a chip computing
    # someone else's rows) or a missing remat would move the ratio far from 1.
    cfg = _cfg(2, remat="full")
    _, compiled = _compiled(cfg)
    got = scale_check.hlo_costs(compiled.as_text())["matmul_flops"]
    ideal = scale_check.ideal_flops(TINY, ROWS, SEQ, RESP, remat=True)["total"] / 8
    assert 0.8 < got / ideal < 1.25, (got, ideal)


@pytest.mark.parametrize("micro_batches, message", [
    (0, "must be >= 1"), (3, "does not divide the batch"), (16, "not a multiple of the 8 batch shards")])
def test_a_batch_that_cannot_partition_is_refused_with_what_to_set(micro_batches, message):
    with pytest.raises(ValueError, match=message) as e:
        step_lib.lower_step(_cfg(micro_batches), rows=ROWS, seq_len=SEQ, response_len=RESP)
    if micro_batches == 16:
        assert "use micro_batches in [1, 2, 4, 8]" in str(e.value)


def test_scoring_pass_is_micro_batched_and_keeps_rows_sharded():
    cfg = _cfg(4)
    compiled = scoring.lower_score(cfg, "teacher", rows=ROWS, seq_len=SEQ, response_len=RESP).compile()
    costs = scale_check.hlo_costs(compiled.as_text())
    assert _activation_gathers(costs) == []
    one = scoring.lower_score(_cfg(1), "teacher", rows=ROWS, seq_len=SEQ, response_len=RESP).compile()
    # The same work, in a quarter of the activation memory's rows at a time.
    assert costs["matmul_flops"] == pytest.approx(scale_check.hlo_costs(one.as_text())["matmul_flops"], rel=0.05)
    assert compiled.memory_analysis().temp_size_in_bytes < one.memory_analysis().temp_size_in_bytes


def test_response_bucket():
    assert [collect.response_bucket(n, 1000) for n in (1, 16, 17, 25, 33, 49, 97, 999)] == \
        [16, 16, 24, 32, 48, 64, 128, 1000]
    assert collect.response_bucket(5000, 4096) == 4096


def test_packed_step_keeps_tokens_on_their_shards():
    # Packed rows (config.packing): the per-rollout gathers into loss slots and of the rows'
    # log-probs are shard-local, so no all-gather of an activation or batch array appears.
    cfg = _cfg(1)
    cfg.prompts_per_step, cfg.num_samples, cfg.packing = 16, 4, SEQ  # 64 rollouts
    lowered = step_lib.lower_step(cfg, rows=16, seq_len=SEQ, response_len=RESP)  # 2 micro-batches
    costs = scale_check.hlo_costs(lowered.compile().as_text())
    assert costs["unknown_trip_counts"] == 0
    assert _activation_gathers(costs) == []
    assert len(re.findall(r"sharding_constraint", lowered.as_text())) >= 2 * TINY["num_hidden_layers"]
    # the step's matmuls are the packed rows' (16 x 48 tokens), not 64 rollouts' worth
    ideal = scale_check.ideal_flops(TINY, 16, SEQ, SEQ, remat=True)["total"] / 8
    assert 0.8 < costs["matmul_flops"] / ideal < 1.25, (costs["matmul_flops"], ideal)


def test_lower_score_of_a_packing_config_lowers_the_packed_pass():
    """What train() runs with config.packing: the scoring pass takes the step's packed rows (one
    per batch shard per micro-batch), not the unpacked rollouts, and keeps them on their shards."""
    from scope_jax import packing

    cfg = _cfg(1)
    cfg.prompts_per_step, cfg.num_samples, cfg.packing = 16, 4, SEQ  # 64 rollouts
    lowered = scoring.lower_score(cfg, "teacher", rows=16, seq_len=SEQ, response_len=RESP)
    packed = [a for a in jax.tree.leaves(lowered.args_info, is_leaf=lambda x: isinstance(x, packing.Packed))
              if isinstance(a, packing.Packed)]
    assert len(packed) == 1 and packed[0].input_ids.shape == (16, SEQ)  # 2 micro-batches x 8 shards
    # one log-prob row per loss slot: 16 rows x count_bucket(64 / 16) = 4 slots
    assert lowered.out_info.shape == (64, RESP)
    unpacked = cfg.copy_and_resolve_references()
    unpacked.packing = 0
    rows = scoring.lower_score(unpacked, "teacher", rows=64, seq_len=SEQ, response_len=RESP)
    assert not any(isinstance(a, packing.Packed) for a in jax.tree.leaves(
        rows.args_info, is_leaf=lambda x: isinstance(x, packing.Packed)))
    costs = scale_check.hlo_costs(lowered.compile().as_text())
    assert _activation_gathers(costs) == []
