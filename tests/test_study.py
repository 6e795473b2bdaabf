"""tools/study.py: the plan, its budget, resumption and the pooled table, on a tiny toy (the
training and evaluation it drives are tested in test_train.py and test_evaluation.py)."""

import json
import os

import numpy as np
import pytest

from tools import study


def test_quick_study_runs_resumes_and_pools(tmp_path, capsys):
    out = str(tmp_path / "study")
    # A "killed" study: only the first run (the untrained student) completes.
    assert study.main(["--out", out, "--quick", "--max-runs", "1"]) == 0
    first = study.record_path(out, "unsure", 0, "student")
    assert os.path.isfile(first)
    assert not os.path.isfile(study.record_path(out, "unsure", 0, "scope"))
    text = capsys.readouterr().out
    assert "CPU budget" in text and "2 of 2 runs to do" in text and "1 of 2 runs done" in text
    mtime = os.path.getmtime(first)

    # Restarted: the completed run is skipped, the rest is trained and evaluated.
    assert study.main(["--out", out, "--quick"]) == 0
    text = capsys.readouterr().out
    assert "1 of 2 runs to do" in text and "2 of 2 runs done" in text
    assert os.path.getmtime(first) == mtime
    scope_dir = study.run_dir(out, "unsure", 0, "scope")
    with open(os.path.join(scope_dir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [0, 1]
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    assert res["complete"] and res["machine"]["cpu_model"]
    entry = res["analysis"]["unsure"]["scope"]
    recs = {m: json.load(open(study.record_path(out, "unsure", 0, m))) for m in ("student", "scope")}
    # One seed: the pooled difference is the paired per-problem difference of the two records.
    want = np.mean(np.array(recs["scope"]["c"]) / 4 - np.array(recs["student"]["c"]) / 4)
    assert entry["vs"]["student"]["avg_at_k_diff"] == pytest.approx(want)
    # SCOPE is a baseline too (the ablations' column): the same pairs, the other sign.
    assert res["analysis"]["unsure"]["student"]["vs"]["scope"]["avg_at_k_diff"] == pytest.approx(-want)
    assert "| scope | 1 |" in open(os.path.join(out, "table.md")).read()
    # The toy build is the seed's unsure build (the teacher's noisy products).
    with open(os.path.join(study.toy_dir(out, "unsure", 0), "manifest.json")) as f:
        assert json.load(f)["settings"]["teacher"]["op_noise"] == [["*", 0.6]]
    # A third invocation has nothing left to do.
    assert study.main(["--out", out, "--quick", "--budget-only"]) == 0
    assert "0 of 2 runs to do" in capsys.readouterr().out

    # The archive (records, no models) re-analyses to the same table, training nothing.
    kept = str(tmp_path / "kept")
    with pytest.raises(ValueError, match="own folder"):
        study.archive(out, out + "/")
    copied = study.archive(out, kept)
    assert "eval/unsure/s0/scope.json" in copied and "runs/unsure/s0/scope/metrics.jsonl" in copied
    assert not any("export" in p or "checkpoints" in p for p in copied)
    os.remove(os.path.join(kept, "table.md"))
    assert study.main(["--out", kept, "--quick"]) == 0
    assert "0 of 2 runs to do" in capsys.readouterr().out
    with open(os.path.join(kept, "results.json")) as f:
        again = json.load(f)
    assert again["analysis"] == res["analysis"] and again["training"] == res["training"]
    assert open(os.path.join(kept, "table.md")).read() == open(os.path.join(out, "table.md")).read()
    assert not os.path.isdir(os.path.join(kept, "runs", "unsure", "s0", "scope", "export"))
    # A run added there needs the models again: the plan counts the toy's rebuild.
    os.remove(os.path.join(kept, "eval", "unsure", "s0", "scope.json"))
    assert study.main(["--out", kept, "--quick", "--budget-only"]) == 0
    assert "1 of 2 runs to do, 1 toy builds" in capsys.readouterr().out


def test_budget_counts_what_is_left(tmp_path):
    plan = study.Plan(toys=("toy", "unsure"), seeds=(0, 1, 2), methods=("student", "opd", "scope"),
                      steps=100, problems=200, k=16)
    costs = {"build": 100.0, "eval": 10.0, "overhead": 5.0, "step": {"opd": 0.5, "scope": 1.0}}
    b = study.budget(plan, str(tmp_path), costs)
    assert b["runs_to_do"] == 18 and b["toy_builds_to_do"] == 6
    assert b["seconds"]["training"] == pytest.approx(6 * (100 * (0.5 + 1.0) + 2 * 5.0))
    assert b["seconds"]["builds"] == 600 and b["seconds"]["evaluation"] == 180
    # ablations cost what SCOPE costs
    assert study.method_cost(costs, "tau_2") == 1.0
    with pytest.raises(SystemExit, match="unknown"):
        study.parse_list("scope,nope", study.METHODS, "methods")


def test_per_prompt_analysis_bins_by_the_seeds_median_ess(tmp_path):
    out = str(tmp_path)
    plan = study.Plan(toys=("long_styles",), seeds=(0, 1), methods=("opd_n", "scope"), steps=1,
                      problems=6, k=4)
    rng = np.random.default_rng(0)
    records, ess = {}, {}
    for s in plan.seeds:
        for m in plan.methods:
            records["long_styles", s, m] = {"n": [4] * 6, "c": rng.integers(0, 5, 6).tolist()}
        # problems 0-4 have wrong-path weights, problem 5 has < 2 wrong rollouts
        ess[s] = [0.9, 0.3, 0.5, 0.95, 0.4, None]
        os.makedirs(os.path.join(out, "weights"), exist_ok=True)
        with open(os.path.join(out, "weights", f"long_styles_s{s}.json"), "w") as f:
            json.dump({"weights": {"per_prompt": {"problem": list(range(6)), "correct": [0] * 6,
                                                  "wrong_ess_over_n": ess[s],
                                                  "correct_ess_over_n": [None] * 6}}}, f)
    res = study.per_prompt_analysis(plan, out, records, num_resamples=200)["long_styles"]
    # median of (0.9, 0.3, 0.5, 0.95, 0.4) is 0.5: far = problems 1, 4; near = 0, 2, 3; none = 5
    far, near = [1, 4], [0, 2, 3]
    d = {s: (np.array(records["long_styles", s, "scope"]["c"])
             - np.array(records["long_styles", s, "opd_n"]["c"])) / 4 for s in plan.seeds}
    assert (res["far"]["problems"], res["near"]["problems"], res["none"]["problems"]) == (4, 6, 2)
    assert res["far"]["mean_ess_over_n"] == pytest.approx(0.35)
    assert res["far"]["diff"]["avg_at_k_diff"] == pytest.approx(np.mean([d[s][far].mean() for s in d]))
    assert res["near"]["diff"]["avg_at_k_diff"] == pytest.approx(np.mean([d[s][near].mean() for s in d]))
    gap = np.mean([d[s][far].mean() - d[s][near].mean() for s in d])
    assert res["far_minus_near"] == pytest.approx(gap)
    lo, hi = res["far_minus_near_ci"]
    assert lo <= gap <= hi
    assert "far - near" in study.format_per_prompt({"long_styles": res}, 4)
    # weights that cover other problems than the records are refused
    records["long_styles", 0, "scope"] = records["long_styles", 0, "opd_n"] = {"n": [4] * 5, "c": [0] * 5}
    with pytest.raises(ValueError, match="weights cover"):
        study.per_prompt_analysis(plan, out, records, num_resamples=10)


def test_training_summary_reads_first_and_last_steps(tmp_path):
    out = str(tmp_path)
    plan = study.Plan(toys=("toy",), seeds=(0, 1), methods=("student", "scope"), steps=30,
                      problems=1, k=1)
    for s in plan.seeds:
        d = study.run_dir(out, "toy", s, "scope")
        os.makedirs(d)
        with open(os.path.join(d, "metrics.jsonl"), "w") as f:
            for step in range(30):
                # correct/ess 0 at step 0 (no correct rollout): not an ESS, left out
                f.write(json.dumps({"step": step, "accuracy": step / 100 + s, "correct/ess": float(step > 0),
                                    "wrong/ess": 8.0, "wrong/teacher_ppl": 2.0,
                                    "response_length": 10.0}) + "\n")
    res = study.training_summary(plan, out)["toy"]
    assert list(res) == ["scope"] and res["scope"]["seeds"] == 2
    acc = res["scope"]["accuracy"]
    assert acc["first"] == pytest.approx(0.5)  # seeds' step 0: 0 and 1
    assert acc["last"] == pytest.approx(np.mean([np.median(np.arange(20, 30) / 100 + s) for s in (0, 1)]))
    assert res["scope"]["correct/ess"] == {"first": None, "last": 1.0}
    assert "0.5 -> " in study.format_training({"toy": res})
