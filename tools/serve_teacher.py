"""Serve a Hugging Face checkpoint as a teacher behind the OpenAI completions API (scoring subset).

    python -m tools.serve_teacher --model /ckpt/Skywork-OR1-7B --host 0.0.0.0 --port 8000 --dtype bfloat16
    python -m tools.train --config configs/paper_r1_1p5b.py --config.teacher_url=http://HOST:8000/v1 ...

See scope_jax/serve.py for the API subset and the batching; SIGTERM or Ctrl-C stops it.
"""

import argparse
import logging

from scope_jax import serve


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory (config.json + safetensors)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute and parameter dtype")
    p.add_argument("--mesh", default="", help="e.g. fsdp=4,tensor=2 (default: every local device on fsdp)")
    p.add_argument("--served_model_name", default="", help="the model id clients send (default: --model as given)")
    p.add_argument("--tokenizer", default="", help="tokenizer directory to name tokens in responses "
                                                   "(default: --model if it has one, else tokens read token_id:N)")
    p.add_argument("--max_batch_tokens", type=int, default=16384, help="rows * length bound of one forward pass")
    p.add_argument("--max_model_len", type=int, default=0, help="longest prompt + max_tokens (default: the config's)")
    p.add_argument("--logprob_chunk", type=int, default=512, help="vocabulary tile of the log-softmax")
    p.add_argument("--max_wait_ms", type=float, default=5.0, help="how long a request waits for others to batch with")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from scope_jax.checkpoint import NonFiniteError
    from scope_jax.models.hf import CheckpointError

    try:
        serve.serve(a.model, host=a.host, port=a.port, dtype=a.dtype, mesh=a.mesh, served_model_name=a.served_model_name,
                    tokenizer=a.tokenizer, max_batch_tokens=a.max_batch_tokens, max_model_len=a.max_model_len,
                    chunk_size=a.logprob_chunk, max_wait_s=a.max_wait_ms / 1000)
    except (NonFiniteError, CheckpointError) as e:  # a teacher that cannot serve: one line, no traceback
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
