"""The default federated run through each task runner: threads in one process, a local Dask
cluster and a local Ray instance (2 worker processes each, on 127.0.0.1). Writes
benchmarks/results/distributed.json and prints a table.

    python benchmarks/distributed.py [--params params.yaml] [--rounds 3] [--runners threads,dask,ray] [--reps 1]

Each run is the real command, ``fedilora federate --params P --out TMP -S federation.rounds=R
-S runner.task_runner=X -S runner.n_workers=N``, in its own process (its own ephemeral Prefect
server, MLflow store in a temp dir), on the data already prepared under ``data.root``
(``fedilora prepare && fedilora split`` first if it is missing). With ``--reps`` > 1 the
runners take turns (threads, dask, ray, threads, ...), so a busy machine slows them alike.

Timed: the command's wall time, split with the MLflow run's own timestamps into
- **startup**: process start to the MLflow run's start (imports, Prefect server, task runner
  start: cluster and worker processes; the flow process loads the base model here too);
- **round 1**: includes each worker process importing torch and building the base model;
- **later rounds**: the steady state (each worker keeps its model; adapters travel);
- **finish**: last round to exit (outputs, adapters, MLflow artifacts, cluster shutdown).
Also the peak total RSS of the command's process tree (psutil, sampled every 0.2 s).

Results match: every runner's final metrics (metrics.json) against the threaded run's, within
``--tol`` (absolute), and the largest absolute difference of the global adapter's tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)

import psutil  # noqa: E402

from fedilora.config import load_params  # noqa: E402
from fedilora.paths import DataPaths  # noqa: E402

FEDILORA = Path(sys.executable).parent / "fedilora"


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_once(runner: str, args, work: Path, rep: int) -> dict:
    out = work / f"{runner}_{rep}"
    cmd = [str(FEDILORA), "federate", "--params", args.params, "--out", str(out),
           "-S", f"federation.rounds={args.rounds}", "-S", f"runner.task_runner={runner}",
           "-S", f"runner.n_workers={args.n_workers}", "-S", f"tracking.uri={work / 'mlruns'}"]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(work / "prefect_home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", MLFLOW_DISABLE_TELEMETRY="true", RAY_USAGE_STATS_ENABLED="0")
    load_before = os.getloadavg()
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        ps = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                peak[0] = max(peak[0], _tree_rss(ps))
            except psutil.Error:
                break
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.time() - t0
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{runner}: `{' '.join(cmd)}` failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    run_id = metrics.pop("mlflow_run_id", None) or json.loads((out / "mlflow_run.json").read_text())["run_id"]

    from mlflow.tracking import MlflowClient

    from fedilora.tracking import resolve_uri

    client = MlflowClient(resolve_uri(str(work / "mlruns"))[0])
    start = client.get_run(run_id).info.start_time / 1000
    steps = sorted((m.step, m.timestamp / 1000) for m in client.get_metric_history(run_id, "global/accuracy"))
    ends = [ts for _, ts in steps]
    rounds = [b - a for a, b in zip([start, *ends[:-1]], ends)]
    sampled = [int(m.value) for m in sorted(client.get_metric_history(run_id, "clients/sampled"), key=lambda m: m.step)]
    return {
        "runner": runner,
        "rep": rep,
        "wall_s": wall,
        "startup_s": start - t0,
        "round_s": rounds,
        "clients_sampled": sampled,
        "round1_s": rounds[0],
        "later_rounds_mean_s": sum(rounds[1:]) / len(rounds[1:]) if len(rounds) > 1 else None,
        "finish_s": t0 + wall - ends[-1],
        "peak_tree_rss_mib": peak[0] / 2**20,
        "loadavg_before": load_before,
        "metrics": metrics,
        "out": str(out),
    }


def compare(base: dict, other: dict, tol: float) -> dict:
    from safetensors.torch import load_file

    keys = sorted(k for k, v in base["metrics"].items() if isinstance(v, (int, float)))
    diffs = {k: abs(float(other["metrics"][k]) - float(base["metrics"][k])) for k in keys}
    a = load_file(str(Path(base["out"]) / "adapters/global/adapter_model.safetensors"))
    b = load_file(str(Path(other["out"]) / "adapters/global/adapter_model.safetensors"))
    same_keys = a.keys() == b.keys()
    adapter_diff = max(float((a[k] - b[k]).abs().max()) for k in a) if same_keys else float("inf")
    max_diff = max(diffs.values())
    return {"metric_abs_diff": diffs, "max_metric_abs_diff": max_diff, "adapter_keys_equal": same_keys,
            "global_adapter_max_abs_diff": adapter_diff, "match": bool(same_keys and max_diff <= tol)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n-workers", type=int, default=2, help="worker processes of the local Dask cluster / Ray instance")
    ap.add_argument("--runners", default="threads,dask,ray")
    ap.add_argument("--reps", type=int, default=1, help="runs per runner, taking turns")
    ap.add_argument("--tol", type=float, default=1e-3, help="absolute tolerance on the final metrics")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distributed.json"))
    args = ap.parse_args()
    runners = [r.strip() for r in args.runners.split(",") if r.strip()]
    if "threads" not in runners:
        raise SystemExit("--runners must include threads: the other runners are compared with it")

    params = load_params(args.params)
    paths = DataPaths.of(params)
    missing = [str(p) for p in (paths.features, paths.splits) if not Path(p).is_file()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run `fedilora prepare && fedilora split` first")

    work = Path(tempfile.mkdtemp(prefix="fedilora_distributed_"))
    runs: list[dict] = []
    try:
        for rep in range(args.reps):
            for runner in runners:
                print(f"rep {rep + 1}/{args.reps}: {runner} ...", flush=True)
                runs.append(run_once(runner, args, work, rep))
                r = runs[-1]
                print(f"  {r['wall_s']:.1f} s (startup {r['startup_s']:.1f}, rounds "
                      f"{', '.join(f'{x:.1f}' for x in r['round_s'])}, finish {r['finish_s']:.1f}), "
                      f"peak RSS {r['peak_tree_rss_mib']:.0f} MiB", flush=True)
        base = next(r for r in runs if r["runner"] == "threads")
        for r in runs:
            r["vs_threads"] = compare(base, r, args.tol)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = {}
    for runner in runners:
        mine = [r for r in runs if r["runner"] == runner]
        walls = sorted(r["wall_s"] for r in mine)
        later = [r["later_rounds_mean_s"] for r in mine if r["later_rounds_mean_s"] is not None]
        summary[runner] = {
            "wall_s_median": walls[len(walls) // 2],
            "wall_s_min": walls[0],
            "startup_s_median": sorted(r["startup_s"] for r in mine)[len(mine) // 2],
            "round1_s_median": sorted(r["round1_s"] for r in mine)[len(mine) // 2],
            "later_rounds_mean_s": sum(later) / len(later) if later else None,
            "finish_s_median": sorted(r["finish_s"] for r in mine)[len(mine) // 2],
            "peak_tree_rss_mib_max": max(r["peak_tree_rss_mib"] for r in mine),
            "matches_threads": all(r["vs_threads"]["match"] for r in mine),
            "max_metric_abs_diff": max(r["vs_threads"]["max_metric_abs_diff"] for r in mine),
            "global_adapter_max_abs_diff": max(r["vs_threads"]["global_adapter_max_abs_diff"] for r in mine),
        }
    for r in runs:
        r.pop("out")
    result = {
        "params": args.params,
        "rounds": args.rounds,
        "n_workers": args.n_workers,
        "reps": args.reps,
        "tol": args.tol,
        "clients_per_round": runs[0]["clients_sampled"],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_at_end": os.getloadavg()},
        "versions": {name: _version(name) for name in ("torch", "prefect", "prefect-dask", "distributed", "prefect-ray", "ray")},
        "summary": summary,
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{args.rounds} rounds, clients sampled per round {result['clients_per_round']}, {args.n_workers} workers for dask/ray, "
          f"{os.cpu_count()} CPUs, {args.reps} rep(s); medians")
    print(f"{'runner':<8} {'wall s':>7} {'startup s':>9} {'round 1 s':>9} {'later rnd s':>11} {'finish s':>8} "
          f"{'peak RSS MiB':>12} {'max metric diff':>15} {'adapter diff':>12} {'match':>5}")
    for runner, s in summary.items():
        later = f"{s['later_rounds_mean_s']:.1f}" if s["later_rounds_mean_s"] is not None else "-"
        print(f"{runner:<8} {s['wall_s_median']:>7.1f} {s['startup_s_median']:>9.1f} {s['round1_s_median']:>9.1f} "
              f"{later:>11} {s['finish_s_median']:>8.1f} {s['peak_tree_rss_mib_max']:>12.0f} "
              f"{s['max_metric_abs_diff']:>15.2e} {s['global_adapter_max_abs_diff']:>12.2e} "
              f"{'yes' if s['matches_threads'] else 'NO':>5}")
    print(f"(match: final metrics within {args.tol} of the threaded run's)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
