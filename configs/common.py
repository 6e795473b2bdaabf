"""Defaults shared by every experiment config, and the named variants (baselines, ablations).

A config file builds on `base()` and ends with `apply_variant(cfg, arg)`, so that

    python -m tools.train --config configs/X.py:opd

runs the OPD baseline of experiment X: baselines and ablations are variants of one config,
never copies. Any key can still be overridden: --config.scope.tau=0.5.
"""

import ml_collections


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = "runs/scope"
    c.algo = "scope"  # scope | opd | grpo | kd
    c.seed = 0
    c.num_steps = 100
    c.checkpoint_every = 10
    c.max_to_keep = 3
    c.async_checkpointing = True
    c.export = True  # Hugging Face export of the final student to {workdir}/export
    c.max_nonfinite_steps = 5  # stop after this many skipped (non-finite) steps in a row
    # auto: continue the run in workdir if its config.json matches (scope_jax.checkpoint);
    # force: continue even though meaning-changing keys differ.
    c.resume = "auto"

    c.student = ""  # Hugging Face checkpoint directory (config.json + safetensors)
    c.teacher = ""  # loaded here, co-located with the student (unless teacher_url is set)
    # An OpenAI-compatible completions server holding the teacher (vLLM, SGLang or
    # `python -m tools.serve_teacher`), e.g. "http://host:8000/v1"; the teacher is then not loaded
    # here. It scores at temperature 1 (teacher_temperature must be 1) and cannot sample (no KD).
    c.teacher_url = ""
    c.teacher_client = ml_collections.ConfigDict()  # scope_jax.teacher.RemoteTeacher
    c.teacher_client.model = ""  # served model name; "" = the server's only model (GET /v1/models)
    c.teacher_client.batch_size = 16  # sequences per request
    c.teacher_client.max_concurrency = 4  # requests in flight
    c.teacher_client.timeout_s = 300.0
    c.teacher_client.retries = 5  # after a connection error, timeout, 408, 429 or 5xx
    c.teacher_client.backoff_s = 1.0  # wait before retry r: backoff_s * 2**(r - 1), at most 60 s
    c.tokenizer = ""  # default: the student's directory
    c.toy_dir = ""  # when set, tools/train.py runs scope_jax.toy.build_toy(toy_dir) first (or reuses it)
    c.toy_family = "toy"  # which toy it builds there (scope_jax.toy.FAMILIES)

    c.data = ml_collections.ConfigDict()
    c.data.train_files = ""  # one path or a list; JSONL / parquet (scope_jax.data.load_examples)
    # dataset spec name (scope_jax.data.SPECS); "" = inferred from the file name; "tfds:NAME[:split]"
    # reads the TFDS dataset NAME from the data_dir that train_files names (scope_jax.data.load_examples)
    c.data.spec = ""
    c.data.style = "chat"  # chat | raw | deepmath
    c.data.instruction = "Please reason step by step, and put your final answer within \\boxed{}."
    c.data.max_prompt_len = 2048
    c.data.on_error = "raise"  # raise | skip (malformed rows)

    c.prompts_per_step = 256  # the paper's prompt batch (= mini-batch: one update per batch)
    c.num_samples = 8  # rollouts per prompt (the paper's OPD baseline: 1)
    c.micro_batches = 1  # gradient accumulation slices of the rollout batch
    # Tokens per packed row (scope_jax.packing: several rollouts per row, each attending only
    # to itself); 0 = off (one rollout per row: prompt bucket + trimmed response). On, the step
    # and the scoring passes take one packed row per batch shard per micro-batch, as many
    # micro-batches as the batch needs (micro_batches must then stay 1). At least prompt bucket +
    # max_new_tokens, so any rollout fits.
    c.packing = 0

    # Rollout collection as a pipeline (collect.Collector). With the continuous engine each row
    # is verified, and scored by a remote teacher, as soon as it ends, while the others
    # generate (chunks must stay 1). With the static engine: the step's prompts in `chunks`
    # chunks (must divide prompts_per_step; one process only), each verified and scored while
    # the next one generates. Chunk c samples with a key derived from (step, c), so the
    # rollouts depend on `chunks` (1: one key per step, as before) but not on `overlap`.
    c.pipeline = ml_collections.ConfigDict()
    c.pipeline.chunks = 1
    c.pipeline.overlap = True  # False: the same work in series (same results, longer steps)

    c.sampling = ml_collections.ConfigDict()
    c.sampling.max_new_tokens = 12288
    c.sampling.temperature = 0.6
    c.sampling.top_k = 0  # 0 = off
    c.sampling.top_p = 1.0
    # transformers' repetition penalty (1.0 = off). The paper trains without one; with one the
    # rollouts come from a distribution the trainer's recomputed log-probs do not include.
    c.sampling.repetition_penalty = 1.0
    # Extra stop ids on top of scope_jax.sampling.stop_ids (tokenizer, model config and
    # generation_config.json EOS ids: the same rule as evaluation).
    c.sampling.eos_ids = ml_collections.config_dict.placeholder(list)
    c.recompute_old_logprobs = True  # pi_old from the training forward (verl), not the sampler
    # The student's log-probs (pi_theta, pi_old, GRPO's reference) are of softmax(logits / T):
    # None = the rollout temperature (the behaviour policy; verl divides the logits by it too).
    c.logprob_temperature = ml_collections.config_dict.placeholder(float)
    c.teacher_temperature = 1.0  # the teacher scores with its own distribution

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 5e-5  # constant
    c.optim.warmup_steps = 0  # linear warm-up steps (the paper: none)
    c.optim.weight_decay = 0.01
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip = 1.0

    c.scope = ml_collections.ConfigDict()
    c.scope.tau = 1.0
    c.scope.reduction = "paper"  # paper | token_mean (the released code)
    c.scope.distill = "reinforce"  # reinforce | kl | ppo
    c.scope.kl = "k1"  # for distill=kl
    c.scope.kl_clip = ml_collections.config_dict.placeholder(float)  # clip the KL (released: k3 at 10)
    c.scope.clip_eps = 0.2  # for distill=ppo
    c.scope.student_weighting = "paper"  # paper | reversed | uniform
    c.scope.teacher_weighting = "paper"

    c.grpo = ml_collections.ConfigDict()
    c.grpo.kl_coef = 1e-4
    c.grpo.clip_eps = 0.2
    c.grpo.kl_clip = ml_collections.config_dict.placeholder(float)  # verl clamps k3 at 10; None: no clip
    c.grpo.normalize_std = True

    c.kd_only_correct = True  # KD trains on the teacher's verified samples only

    c.verifier = ml_collections.ConfigDict()
    c.verifier.num_workers = 2
    c.verifier.timeout_s = 5.0

    # Metrics: {workdir}/metrics.jsonl and TensorBoard events beside it (scope_jax.tracking);
    # W&B too when wandb_project is set (needs `pip install wandb`).
    c.logging = ml_collections.ConfigDict()
    c.logging.wandb_project = ""
    c.logging.wandb_entity = ""
    c.logging.run_name = ""  # default: W&B's own

    c.model = ml_collections.ConfigDict()
    c.model.dtype = "bfloat16"  # compute dtype of the student
    c.model.param_dtype = "float32"
    c.model.teacher_dtype = "bfloat16"
    c.model.remat_policy = "full"  # decoder-layer remat: full | minimal | none (models.REMAT_POLICIES)
    c.model.logprob_chunk = 512  # vocabulary tile of losses.token_logprobs

    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})

    # Rollout generation (scope_jax.rollout). engine: "continuous" (scope_jax.engine: slots
    # refilled as rows end, a paged KV cache that holds live context only; finished rows stream
    # to the verifier and a teacher server) or "static" (scope_jax.sampling: the batch decodes
    # until its longest row ends). Continuous is the default because tools/bench_rollout.py
    # measures it faster on the toy (--toy: 1.1x on CPU, configs/toy.py's 64 slots) and at
    # scale (--replay: 3.3x less modelled decode time per RL step, and the static batch's KV
    # cache does not fit a 16 GiB chip at setup 1); docs/benchmarks_rollout.md.
    c.rollout = ml_collections.ConfigDict()
    c.rollout.engine = "continuous"
    # The rollout weight layout: each host's chips generate on their own (nothing crosses
    # hosts while decoding). tensor = chips of one host that split one engine's heads: -1 =
    # mesh.tensor (the heads stay split as training splits them, the weights are gathered
    # over data and fsdp once per step), 1 = every chip its own engine, the weights
    # replicated on it. mesh.tensor's chips must sit on one host.
    c.rollout.mesh = ml_collections.ConfigDict({"tensor": -1})
    # Continuous engine only. Page pool per engine, in tokens (at 28 layers, 2 KV heads of 128
    # in bfloat16: 28 KiB a token, so 98,304 tokens = 2.6 GiB); at least one whole rollout
    # (data.max_prompt_len + sampling.max_new_tokens). Admission waits when it is full, and a
    # pool below the rows' peak live context preempts (recomputes) rows: at the paper's length
    # mix 65,536 tokens made the step 1.6x its longest row, 98,304 at most 1.08x over 20 draws
    # (docs/benchmarks_rollout.md).
    c.rollout.kv_tokens_per_chip = 98304
    c.rollout.slots = 32  # rows decoded together per engine
    c.rollout.page_size = 16  # tokens per KV page
    c.rollout.block = 16  # decode steps per jitted block (the host admits and retires between)
    # Admission order: longest (largest budget first, the makespan heuristic; ties, as in
    # training where every row has the same budget, in order) | fifo.
    c.rollout.order = "longest"
    # Context tokens per prefill call (admitted rows are prefilled together up to this; a
    # longer context goes alone): bounds the prefill's activations.
    c.rollout.prefill_tokens = 8192
    return c


VARIANTS = {
    "scope": dict(algo="scope"),
    "opd": dict(algo="opd", num_samples=1),  # the paper's OPD baseline: one rollout per prompt
    "opd_n": dict(algo="opd"),  # OPD with the same N rollouts as SCOPE
    "grpo": dict(algo="grpo"),
    "kd": dict(algo="kd"),
    # The paper's ablations (section 6).
    "no_student_weighting": {"algo": "scope", "scope.student_weighting": "uniform"},
    "no_teacher_weighting": {"algo": "scope", "scope.teacher_weighting": "uniform"},
    "no_weighting": {"algo": "scope", "scope.student_weighting": "uniform", "scope.teacher_weighting": "uniform"},
    "reversed_student": {"algo": "scope", "scope.student_weighting": "reversed"},
    "reversed_teacher": {"algo": "scope", "scope.teacher_weighting": "reversed"},
    "tau_0.5": {"algo": "scope", "scope.tau": 0.5},
    "tau_2": {"algo": "scope", "scope.tau": 2.0},
    # The released code's reduction and signals.
    "released_kl": {"algo": "scope", "scope.reduction": "token_mean", "scope.distill": "kl", "scope.kl": "k3",
                    "scope.kl_clip": 10.0},
    "released_ppo": {"algo": "scope", "scope.reduction": "token_mean", "scope.distill": "ppo"},
}


def apply_variant(cfg: ml_collections.ConfigDict, name: str | None) -> ml_collections.ConfigDict:
    """Applies VARIANTS[name] (dotted keys allowed) and names the workdir after it."""
    if not name:
        return cfg
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {sorted(VARIANTS)}")
    for key, value in VARIANTS[name].items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    cfg.workdir = f"{cfg.workdir}_{name}"
    return cfg
