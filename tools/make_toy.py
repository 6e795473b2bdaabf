"""Build the toy setup: arithmetic data, a tokenizer, and a teacher and a student trained from
scratch (SFT on worked solutions), saved as Hugging Face checkpoints.

    python -m tools.make_toy --out runs/toy [--force]
    python -m tools.make_toy --family blindspot --seed 1 --out runs/toy_blindspot_s1

Reuses a finished build in --out with the same settings; --force rebuilds it. Writes
{out}/data/{train,test}.jsonl, {out}/tokenizer, {out}/teacher, {out}/student and
{out}/manifest.json (settings, timings, measured accuracies). See scope_jax/toy.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from scope_jax import toy


def main(argv=None) -> dict[str, str]:
    """Parses the command line, builds (or reuses) the toy setup and prints its accuracies."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/toy", help="output directory (default runs/toy)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a build exists")
    parser.add_argument("--family", default="toy", choices=sorted(toy.FAMILIES),
                        help="toy family (scope_jax.toy.FAMILIES): toy; blindspot (a teacher "
                        "that saw few products); unsure (a teacher trained on off-by-one products)")
    parser.add_argument("--seed", type=int, default=0,
                        help="shifts every seed of the build (0: the family's defaults)")
    parser.add_argument("--teacher-steps", type=int, default=None,
                        help="SFT steps of the teacher (default: ToySettings)")
    parser.add_argument("--student-steps", type=int, default=None,
                        help="SFT steps of the student (default: ToySettings)")
    parser.add_argument("--teacher-from", default=None,
                        help="a finished build whose settings differ only in the student (e.g. "
                        "--family long for --family long_styles, same --seed): copy its teacher "
                        "instead of training it again")
    args = parser.parse_args(argv)
    settings = toy.toy_settings(args.family, args.seed)
    for name, steps in (("teacher", args.teacher_steps), ("student", args.student_steps)):
        if steps is not None:
            if steps < 1:
                parser.error(f"--{name}-steps must be >= 1, got {steps}")
            settings = dataclasses.replace(
                settings, **{name: dataclasses.replace(getattr(settings, name), steps=steps)})
    paths = toy.build_toy(args.out, force=args.force, settings=settings,
                          teacher_from=args.teacher_from)
    with open(paths["manifest"]) as f:
        manifest = json.load(f)
    print(json.dumps({"accuracy": manifest["accuracy"], "seconds": manifest["seconds"],
                      "paths": paths}, indent=2))
    return paths


if __name__ == "__main__":
    main()
