"""Peak memory of one worker process simulating 10 clients vs 1 client, on the real default
model (params.yaml, ``model.name: embedded``). Writes benchmarks/results/memory.json.

    python benchmarks/memory.py [--params params.yaml] [--round 1]

Each case runs in a fresh subprocess (so neither inherits the other's peak): it builds the
runtime with ``tasks.runtime.federation(params)`` (feature table + one base model), then runs
ONE round in which the sampled clients are all 10 (``federation.sample_fraction=1.0``) or 1
(``sample_fraction=0.1``): ``fed.client_update`` for each, ``fed.aggregate``,
``fed.evaluate_global``. It reports ``ru_maxrss`` (peak RSS, KiB on Linux), the RSS right after
the build, and the RSS at the end. Goal: 10-client peak <= 1.3x the 1-client peak (one base
model; each client's adapter is loaded into a per-rank slot and read back, not a model copy).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_RATIO = 1.3


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def child(params_path: str, fraction: float, round_idx: int) -> dict:
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    from fedilora.config import load_params
    from tasks.runtime import federation

    rss_start = _rss_kib()
    params = load_params(params_path, {"federation.sample_fraction": fraction})
    t0 = time.perf_counter()
    fed = federation(params)
    state = fed.initial_global_state()
    build_s = time.perf_counter() - t0
    rss_built = _rss_kib()
    peak_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    clients = fed.sample_clients(round_idx)
    t0 = time.perf_counter()
    updates = [fed.client_update(c, state, round_idx) for c in clients]
    state = fed.aggregate(updates, state)
    metrics = fed.evaluate_global(state)
    round_s = time.perf_counter() - t0
    return {
        "sample_fraction": fraction,
        "clients": clients,
        "num_clients": len(clients),
        "rss_at_import_kib": rss_start,
        "rss_after_build_kib": rss_built,
        "peak_after_build_kib": peak_built,
        "rss_end_kib": _rss_kib(),
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "build_s": round(build_s, 2),
        "round_s": round(round_s, 2),
        "global_accuracy": metrics.get("accuracy"),
    }


def run_case(params_path: str, fraction: float, round_idx: int) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", "--params", params_path, "--fraction", str(fraction), "--round", str(round_idx)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"child (sample_fraction={fraction}) failed with rc={proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--round", type=int, default=1)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--fraction", type=float, default=1.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory.json"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.params, args.fraction, args.round)))
        return

    one = run_case(args.params, 0.1, args.round)
    ten = run_case(args.params, 1.0, args.round)
    assert one["num_clients"] == 1 and ten["num_clients"] == 10, (one["clients"], ten["clients"])
    ratio = ten["peak_rss_kib"] / one["peak_rss_kib"]
    # growth during the round beyond the post-build RSS (what the clients themselves cost)
    growth_one = one["peak_rss_kib"] - one["rss_after_build_kib"]
    growth_ten = ten["peak_rss_kib"] - ten["rss_after_build_kib"]
    result = {
        "params": args.params,
        "round": args.round,
        "model": "embedded",
        "one_client": one,
        "ten_clients": ten,
        "peak_ratio_10_vs_1": round(ratio, 4),
        "round_growth_kib": {"one_client": growth_one, "ten_clients": growth_ten},
        "goal_ratio": GOAL_RATIO,
        "goal_met": ratio <= GOAL_RATIO,
        "note": "ru_maxrss of a fresh child per case (KiB); rss_after_build = VmRSS after the runtime "
        "(feature table + base model + initial state) is built",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    mib = lambda k: k / 1024  # noqa: E731
    print(f"{'case':<10} {'after build':>12} {'peak':>10} {'end':>10} {'round s':>8}")
    for name, r in (("1 client", one), ("10 clients", ten)):
        print(f"{name:<10} {mib(r['rss_after_build_kib']):>9.1f} MiB {mib(r['peak_rss_kib']):>6.1f} MiB "
              f"{mib(r['rss_end_kib']):>6.1f} MiB {r['round_s']:>8.1f}")
    print(f"peak ratio 10/1 = {ratio:.3f} (goal <= {GOAL_RATIO}): {'met' if result['goal_met'] else 'NOT met'}")
    print(f"round growth over post-build RSS: 1 client {mib(growth_one):.1f} MiB, 10 clients {mib(growth_ten):.1f} MiB")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
