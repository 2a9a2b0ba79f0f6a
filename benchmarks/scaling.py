"""How a whole federated run's time grows with the number of clients and rounds, end to end
through the CLI (``fedilora split`` + ``fedilora federate``: Prefect flow, MLflow logging,
checkpoints, adapters). Writes benchmarks/results/scaling.json.

    python benchmarks/scaling.py [--clients 5 10 20 50] [--rounds 6]

Every case runs on the real default (params.yaml, the prepared data/features.safetensors)
in its own temporary data root, tracking store and output folder, so the project's own
outputs are untouched. Ranks repeat the default pattern [16,16,8,8,4,4,2,2,2,2] to K
clients; ``sample_fraction`` stays 0.4, so a round trains 0.4 K clients on, together, about
40 % of the training pool whatever K is. Per-round times come from the MLflow timestamps of
each round's ``global/accuracy``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEFAULT_RANKS = [16, 16, 8, 8, 4, 4, 2, 2, 2, 2]


def run_case(clients: int, rounds: int, work: Path) -> dict:
    data = work / "data"
    data.mkdir(parents=True)
    shutil.copy(ROOT / "data/features.safetensors", data / "features.safetensors")
    ranks = np.resize(DEFAULT_RANKS, clients).tolist()
    sets = [f"data.root={data}", f"clients.num_clients={clients}", f"clients.ranks={ranks}",
            f"federation.rounds={rounds}", f"tracking.uri={work / 'mlruns'}"]
    args = [arg for s in sets for arg in ("-S", s)]
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect"), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PREFECT_API_URL", None)
    t0 = time.perf_counter()
    subprocess.run([BIN / "fedilora", "split", *args], cwd=ROOT, env=env, check=True, capture_output=True)
    t1 = time.perf_counter()
    subprocess.run([BIN / "fedilora", "federate", *args, "--out", str(work / "out")], cwd=ROOT, env=env, check=True, capture_output=True)
    t2 = time.perf_counter()
    from mlflow.tracking import MlflowClient

    run_id = json.loads((work / "out/mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{work / 'mlruns/mlflow.db'}")
    stamps = [m.timestamp / 1000 for m in sorted(client.get_metric_history(run_id, "global/accuracy"), key=lambda m: m.step)]
    run = client.get_run(run_id)
    per_round = np.diff([run.info.start_time / 1000, *stamps])
    metrics = json.loads((work / "out/metrics.json").read_text())
    return {
        "clients": clients,
        "rounds": rounds,
        "sampled_per_round": max(1, round(0.4 * clients)),
        "split_s": round(t1 - t0, 2),
        "federate_s": round(t2 - t1, 2),
        "round_s": [round(float(x), 2) for x in per_round],
        "median_round_s": round(float(np.median(per_round[1:] if len(per_round) > 1 else per_round)), 2),
        "setup_s": round((t2 - t1) - float(per_round.sum()), 2),
        "global_accuracy": metrics["global_accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    if not (ROOT / "data/features.safetensors").is_file():
        sys.exit("data/features.safetensors missing: run `fedilora prepare` first")
    cases = []
    for k in args.clients:
        with tempfile.TemporaryDirectory(prefix="fedilora_scaling_") as tmp:
            case = run_case(k, args.rounds, Path(tmp))
        cases.append(case)
        print(f"K={k:3d}: federate {case['federate_s']:6.1f} s = setup {case['setup_s']:5.1f} s + "
              f"{args.rounds} rounds (median {case['median_round_s']:.2f} s, first {case['round_s'][0]:.2f} s); "
              f"global accuracy {case['global_accuracy']}")
    out = ROOT / "benchmarks/results/scaling.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(), "cases": cases}, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
