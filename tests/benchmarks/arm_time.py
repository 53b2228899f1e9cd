"""One experiment arm end to end, before and after a change, side by side in one run.

    python tests/benchmarks/arm_time.py --before c31be85 --arm gold

Takes ``--experiment`` (default: ``smollm2_strategies.yaml``: 1,000 SNLI-dev premises, 125 DPO steps
of batch 8, STS-B dev + SICK trial, retention on 300 SNLI-test premises with 40 greedy paraphrases),
keeps its baseline and the one ``--arm``, and runs ``sempa experiment`` on it twice: with the code of
``--before`` (a git worktree of that commit, put first on ``PYTHONPATH``) and then with the code of this
checkout (``--after-first``: the other way round). Each run has its own empty ``SEMPA_CACHE_DIR`` (the
converted model is linked in), so nothing is reused between the two. Reported per run: the experiment's
own step timings (prepare, baseline evaluation, rank, train, evaluate) and the arm's time end to end (the
experiment's wall time minus prepare and the baseline evaluation, which all arms share), the ratio, and both
results tables.
Writes ``tests/benchmarks/results/arm_time[-TAG].json``; ``--retabulate FILE`` recomputes the
summary from the runs recorded in such a file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from common import save

REPO = Path(__file__).resolve().parents[2]


def run_experiment(config: dict[str, Any], code: Path, work: Path) -> dict[str, Any]:
    """Run ``sempa experiment`` on ``config`` with the library at ``code``; return its results and wall time."""
    from sempa_train.core.models import cache_dir

    cache = work / "cache"
    cache.mkdir(parents=True)
    (cache / "models").symlink_to(cache_dir() / "models")
    path = work / "experiment.yaml"
    path.write_text(yaml.safe_dump({**config, "out": str(work / "out")}))
    # PYTHONSAFEPATH: the working directory (this checkout) must not come before PYTHONPATH on sys.path
    env = {**os.environ, "PYTHONPATH": str(code), "PYTHONSAFEPATH": "1", "SEMPA_CACHE_DIR": str(cache)}
    where = subprocess.run([sys.executable, "-c", "import sempa_train; print(sempa_train.__file__)"], env=env,
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    if not where.startswith(str(code)):
        sys.exit(f"the library loaded from {where}, not from {code}")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sempa_train.cli", "experiment", str(path)], env=env, cwd=REPO, check=True)
    wall = time.perf_counter() - started
    return {"wall_seconds": round(wall, 1), **json.loads((work / "out" / "results.json").read_text())}


# The steps every arm shares, as the experiment's timings name them (the baseline's step was renamed after c31be85)
SHARED_STEPS = ("prepare", "evaluate baseline", "baseline: evaluate")


def arm_seconds(run: dict[str, Any]) -> float:
    """The arm end to end: the experiment's wall time minus what every arm shares (prepare, baseline evaluation)."""
    shared = sum(v for k, v in run["timings"].items() if k in SHARED_STEPS)
    return round(run["wall_seconds"] - shared, 1)


def report(args: argparse.Namespace, runs: dict[str, dict[str, Any]]) -> None:
    seconds = {name: arm_seconds(run) for name, run in runs.items()}
    for name, run in runs.items():
        print(f"{name}: arm {seconds[name]:.0f} s, steps {run['timings']}", flush=True)
    save("arm_time", {
        "experiment": args.experiment, "arm": args.arm, "before": args.before, "embed_dtype": args.embed_dtype,
        "order": list(runs), "arm_seconds": seconds, "speedup": round(seconds["before"] / seconds["after"], 2),
        "runs": {name: {"wall_seconds": run["wall_seconds"], "timings": run["timings"], "rows": run["rows"]}
                 for name, run in runs.items()},
    }, tag=args.tag)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default=str(REPO / "sempa_train/configs/experiments/smollm2_strategies.yaml"))
    parser.add_argument("--arm", default="gold")
    parser.add_argument("--before", required=True, help="git revision of the code to compare against")
    parser.add_argument("--embed-dtype", choices=["float32", "bfloat16"],
                        help="embed.dtype for both runs. float32 stands in for a CPU without bf16 units under an "
                        "instruction-set cap (ATEN_CPU_CAPABILITY=avx2 ...): today's code follows the cap by itself, "
                        "but older code chose bf16 from /proc/cpuinfo and would run it without bf16 kernels")
    parser.add_argument("--after-first", action="store_true",
                        help="run this checkout's code first: a repeat in the other order shows how far a drift "
                             "of the machine's speed during the run moved the ratio")
    parser.add_argument("--tag", default="")
    parser.add_argument("--retabulate", type=Path, help="recompute the summary from the runs of a results JSON")
    args = parser.parse_args()
    if args.retabulate:
        report(args, json.loads(args.retabulate.read_text())["runs"])
        return

    config = yaml.safe_load(Path(args.experiment).read_text())
    config["strategies"] = {args.arm: config["strategies"][args.arm]}
    if args.embed_dtype:
        config["embed"] = {**(config.get("embed") or {}), "dtype": args.embed_dtype}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(work / "before-code"), args.before],
                       check=True, capture_output=True)
        try:
            code = {"before": work / "before-code", "after": REPO}
            order = ("after", "before") if args.after_first else ("before", "after")
            runs = {name: run_experiment(config, code[name], work / name) for name in order}
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(work / "before-code")],
                           check=False)
    report(args, runs)


if __name__ == "__main__":
    main()
