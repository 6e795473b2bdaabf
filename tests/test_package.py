"""The installable package: a wheel with only its core dependencies (jax, numpy) gives working
loss kernels in a fresh virtual environment, and carries the shipped benchmarks.

Needs PyPI (or a pip cache / index the environment points pip at) to install jax into the
fresh venv, about a minute.
"""

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs inside the fresh venv: no test helpers, no project checkout on sys.path.
SCRIPT = r"""
import importlib.util, json, os, sys
import jax, jax.numpy as jnp, numpy as np
from scope_jax import benchmarks, losses

assert "site-packages" in losses.__file__, losses.__file__  # the wheel, not a checkout
# core dependencies only: nothing of the [train] extra is installed
missing = [m for m in ("flax", "optax", "transformers", "orbax") if importlib.util.find_spec(m) is None]

# Two prompts: prompt 0 has rollouts 0, 1 correct and 2 wrong; prompt 1 has 3 wrong, 4 correct.
rng = np.random.default_rng(0)
B, T = 5, 6
lengths = np.array([6, 3, 5, 4, 2])
mask = np.arange(T)[None] < lengths[:, None]
old = np.where(mask, np.log(rng.uniform(0.05, 1.0, (B, T))), 0.0).astype(np.float32)
teacher = np.where(mask, np.log(rng.uniform(0.05, 1.0, (B, T))), 0.0).astype(np.float32)
correct = np.array([True, True, False, False, True])
groups = np.array([0, 0, 0, 1, 1], np.int32)

f = jax.jit(lambda lp: losses.scope_loss(lp, old, teacher, mask, correct, groups)[0])
loss, grad = jax.jit(jax.value_and_grad(f))(jnp.asarray(old))

# Reference at theta = theta_old (rho = 1), from the paper's equations, in numpy:
# w^stu ~ PPL_S over a prompt's correct rollouts, w^tea ~ 1 / PPL_T over its wrong ones;
# loss = mean over prompts of sum_correct w (-|y|) + sum_wrong w sum_t (log pi_old - log pi_T);
# d loss / d logprobs = rho * (-w) on correct tokens, rho * w (log pi_old - log pi_T) on wrong ones.
ppl_s = np.exp(-(old * mask).sum(1) / lengths)
ppl_t = np.exp(-(teacher * mask).sum(1) / lengths)
w = np.zeros(B)
for g in (0, 1):
    for path, score in ((correct, ppl_s), (~correct, 1.0 / ppl_t)):
        idx = np.where((groups == g) & path)[0]
        w[idx] = score[idx] / score[idx].sum()
ref_loss = sum(w[i] * (-lengths[i] if correct[i] else ((old[i] - teacher[i]) * mask[i]).sum())
               for i in range(B)) / 2
ref_grad = np.where(correct[:, None], -w[:, None], w[:, None] * (old - teacher)) * mask / 2
np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-5, atol=1e-6)
print(json.dumps({"loss": float(loss), "missing": missing, "jax": jax.__version__,
                  "math500": os.path.getsize(benchmarks.path("math500"))}))
"""


def _core_pins() -> list[str]:
    """The requirements.txt pins of the core dependencies and their own runtime deps (so the
    venv gets the tested versions); constraints only pin, they install nothing extra."""
    keep = ("jax==", "jaxlib==", "numpy==", "ml_dtypes==")
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        return [line.strip() for line in f if line.startswith(keep)]


def test_core_dependencies_are_jax_and_numpy_only():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    names = [d.split(">")[0].split("=")[0].split("[")[0] for d in project["dependencies"]]
    assert sorted(names) == ["jax", "numpy"]
    assert {"train", "code", "test"} <= set(project["optional-dependencies"])
    extras = " ".join(project["optional-dependencies"]["train"])
    for needed in ("flax", "optax", "orbax-checkpoint", "transformers", "tokenizers", "safetensors",
                   "ml_collections", "math-verify", "tensorboardX"):
        assert needed in extras, needed


@pytest.mark.slow
def test_wheel_with_core_dependencies_runs_the_jitted_loss(tmp_path):
    src = tmp_path / "src"  # build from a copy, so the checkout gets no build/ or egg-info
    os.makedirs(src)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "scope_jax"), src / "scope_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                    "-w", str(dist), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = list(dist.glob("scope_jax-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        files = set(z.namelist())
    for name in ("math500.jsonl", "gsm8k_test.jsonl", "SOURCES.md", "LICENSE-MIT.txt"):
        assert f"scope_jax/benchmarks/{name}" in files, name

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    (tmp_path / "constraints.txt").write_text("\n".join(_core_pins()) + "\n")
    # Without PYTHONPATH: a checkout on it (with an editable install's egg-info) would make pip
    # think scope_jax is installed already, and the script import the checkout.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env["JAX_PLATFORMS"] = "cpu"
    install = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                              "-c", str(tmp_path / "constraints.txt"), str(wheel)],
                             env=env, capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    out = subprocess.run([py, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert sorted(result["missing"]) == ["flax", "optax", "orbax", "transformers"]
    assert result["math500"] == os.path.getsize(os.path.join(ROOT, "scope_jax", "benchmarks", "math500.jsonl"))
