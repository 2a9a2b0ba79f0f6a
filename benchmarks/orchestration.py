"""Prefect's overhead on one federated round, on the real default (params.yaml). Writes
benchmarks/results/orchestration.json.

    python benchmarks/orchestration.py [--params params.yaml] [--rounds 2]

Two paths over the same runtime (``tasks.runtime.federation(params)``, one base model):
- **plain**: ``fed.client_update`` for the round's sampled clients, ``fed.aggregate(updates,
  state)``, ``fed.evaluate_global(state)``;
- **prefect**: inside one ``@flow`` (ThreadPoolTaskRunner, ``runner.max_workers``, as in
  flows/federated.py), ``train_client.map(unmapped(params), clients, unmapped(state),
  unmapped(round_idx), unmapped(None))`` + ``aggregate_updates`` + ``evaluate_global``.

Excluded from the per-round figures and reported separately: the model/feature load (a
plain warm-up round), the ephemeral Prefect server start (the first, empty flow run) and a
Prefect warm-up round. Then rounds 1..N run interleaved (plain round r, Prefect round r),
each path carrying its own global state. Overhead % = (prefect - plain) / plain, on the sum
over the measured rounds.

Breakdown: the Federation instance's ``client_update`` / ``aggregate`` / ``evaluate_global``
are wrapped (on the instance, in this process only) to time the work itself, so that for the
Prefect path round time - compute = orchestration; ``.map`` submission and waiting on the
futures' results are timed separately, as is each task call's wall time seen by the flow.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)

# Prefect settings must be in place before prefect is imported
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
_PREFECT_HOME = tempfile.mkdtemp(prefix="prefect_home_")
os.environ["PREFECT_HOME"] = _PREFECT_HOME

from prefect import flow, unmapped  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from fedilora.config import load_params  # noqa: E402
from tasks import aggregate_updates, evaluate_global, train_client  # noqa: E402
from tasks.runtime import federation  # noqa: E402

GOAL_PCT = 10.0
_compute: list[tuple[str, float, float]] = []  # (step, start, end), filled by the instance wrappers


def _instrument(fed) -> None:
    for name in ("client_update", "aggregate", "evaluate_global"):
        inner = getattr(fed, name)

        def wrapped(*a, _inner=inner, _name=name, **kw):
            t0 = time.perf_counter()
            try:
                return _inner(*a, **kw)
            finally:
                _compute.append((_name, t0, time.perf_counter()))

        setattr(fed, name, wrapped)


def _union(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals: the time at least one call was running.
    Client updates run in pool threads but serialise on the Federation's lock, so a plain sum
    would count the time a thread waits for the lock; the union counts busy time only once."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def _take_compute() -> dict[str, float]:
    """Busy seconds per step since the last call, and in total."""
    items = list(_compute)
    _compute.clear()
    out = {name: _union([(s, e) for n, s, e in items if n == name]) for name in {n for n, _, _ in items}}
    out["total"] = _union([(s, e) for _, s, e in items])
    return out


def plain_round(fed, state, round_idx: int):
    _take_compute()
    t0 = time.perf_counter()
    clients = fed.sample_clients(round_idx)
    updates = [fed.client_update(c, state, round_idx) for c in clients]
    state = fed.aggregate(updates, state)
    metrics = fed.evaluate_global(state)
    wall = time.perf_counter() - t0
    return state, metrics, {"wall_s": wall, "compute_s": _take_compute()}


def _prefect_round_body(params, fed, state, round_idx: int, max_workers: int):
    _take_compute()
    t0 = time.perf_counter()
    clients = fed.sample_clients(round_idx)
    t_map0 = time.perf_counter()
    futures = train_client.map(unmapped(params), clients, unmapped(state), unmapped(round_idx), unmapped(None))
    t_map1 = time.perf_counter()
    updates = [f.result() for f in futures]
    t_res = time.perf_counter()
    state = aggregate_updates(params, updates, state)
    t_agg = time.perf_counter()
    metrics = evaluate_global(params, state)
    t_end = time.perf_counter()
    compute = _take_compute()
    timing = {
        "wall_s": t_end - t0,
        "map_submit_s": t_map1 - t_map0,
        "map_results_s": t_res - t_map1,
        "aggregate_task_s": t_agg - t_res,
        "evaluate_task_s": t_end - t_agg,
        "compute_s": compute,
    }
    timing["train_overhead_s"] = (t_res - t_map0) - compute.get("client_update", 0.0)
    timing["aggregate_overhead_s"] = (t_agg - t_res) - compute.get("aggregate", 0.0)
    timing["evaluate_overhead_s"] = (t_end - t_agg) - compute.get("evaluate_global", 0.0)
    timing["overhead_s"] = timing["wall_s"] - compute["total"]
    return state, metrics, timing


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds (1..N) per path")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "orchestration.json"))
    args = ap.parse_args()

    params = load_params(args.params)
    max_workers = 1 if params.runner.task_runner == "sequential" else params.runner.max_workers

    # 1. model + feature load, and a plain warm-up round (round 1)
    t0 = time.perf_counter()
    fed = federation(params)
    init_state = fed.initial_global_state()
    load_s = time.perf_counter() - t0
    _instrument(fed)
    _, _, warm_plain = plain_round(fed, init_state, 1)

    # 2. ephemeral Prefect server start: the first (empty) flow run
    @flow(name="bench_empty")
    def empty():
        return 1

    t0 = time.perf_counter()
    empty()
    server_start_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    empty()
    empty_flow_s = time.perf_counter() - t0

    # 3. one flow for warm-up + measured rounds (as flows/federated.py: one flow, many rounds)
    @flow(name="bench_rounds", task_runner=ThreadPoolTaskRunner(max_workers=max_workers))
    def rounds_flow(n_rounds: int):
        results = {"warmup": None, "plain": [], "prefect": []}
        _, _, results["warmup"] = _prefect_round_body(params, fed, init_state, 1, max_workers)
        state = init_state
        for r in range(1, n_rounds + 1):
            # ABBA from the same input state (client_update is seeded per round and client, so
            # both paths compute the same round); the carried state is the plain one
            runs = {"plain": [], "prefect": []}
            for order, path in enumerate(("plain", "prefect", "prefect", "plain")):
                if path == "plain":
                    new, metrics, timing = plain_round(fed, state, r)
                else:
                    new, metrics, timing = _prefect_round_body(params, fed, state, r, max_workers)
                timing.update(round=r, rep=len(runs[path]), order=order, accuracy=metrics["accuracy"])
                runs[path].append((new, timing))
            state = runs["plain"][0][0]
            for path in runs:
                results[path].extend(t for _, t in runs[path])
        return results

    t0 = time.perf_counter()
    res = rounds_flow(args.rounds)
    flow_total_s = time.perf_counter() - t0

    plain = sum(r["wall_s"] for r in res["plain"])
    pref = sum(r["wall_s"] for r in res["prefect"])
    overhead_pct = 100.0 * (pref - plain) / plain
    n_clients = len(fed.sample_clients(1))
    n_reps = len(res["plain"]) // args.rounds
    n_task_calls = len(res["prefect"]) * (n_clients + 2)
    pref_overhead = sum(r["overhead_s"] for r in res["prefect"])
    plain_overhead = sum(r["wall_s"] - r["compute_s"]["total"] for r in res["plain"])
    inner_compute_ratio = sum(r["compute_s"]["total"] for r in res["prefect"]) / sum(r["compute_s"]["total"] for r in res["plain"])
    result = {
        "params": args.params,
        "task_runner": f"ThreadPoolTaskRunner(max_workers={max_workers})",
        "prefect_version": __import__("prefect").__version__,
        "clients_per_round": n_clients,
        "measured_rounds": args.rounds,
        "model_load_s": load_s,
        "plain_warmup_round_s": warm_plain["wall_s"],
        "prefect_server_start_s": server_start_s,
        "empty_flow_run_s": empty_flow_s,
        "prefect_warmup_round_s": res["warmup"]["wall_s"],
        "flow_total_s": flow_total_s,
        "plain_rounds": res["plain"],
        "prefect_rounds": res["prefect"],
        "plain_total_s": plain,
        "prefect_total_s": pref,
        "overhead_pct": overhead_pct,
        "repeats_per_round": n_reps,
        "plain_overhead_outside_compute_s": plain_overhead,
        "prefect_overhead_outside_compute_s": pref_overhead,
        "orchestration_s_per_round": (pref_overhead - plain_overhead) / len(res["prefect"]),
        "orchestration_s_per_task_call": (pref_overhead - plain_overhead) / n_task_calls,
        "inner_compute_ratio_prefect_vs_plain": inner_compute_ratio,
        "goal_pct": GOAL_PCT,
        "goal_met": overhead_pct <= GOAL_PCT,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"model load {load_s:.2f} s, plain warm-up round {warm_plain['wall_s']:.2f} s")
    print(f"Prefect ephemeral server start (first flow run) {server_start_s:.2f} s; empty flow run after {empty_flow_s:.2f} s")
    print(f"Prefect warm-up round {res['warmup']['wall_s']:.2f} s")
    print("each round measured ABBA (plain, prefect, prefect, plain) from the same input state")
    print(f"{'round':>5} {'plain s':>8} {'prefect s':>9} {'diff %':>7} {'submit s':>8} {'results s':>9} {'agg task s':>10} {'eval task s':>11} {'orch s':>7}")
    for p, q in zip(res["plain"], res["prefect"]):
        print(f"{p['round']:>5} {p['wall_s']:>8.2f} {q['wall_s']:>9.2f} {100 * (q['wall_s'] - p['wall_s']) / p['wall_s']:>7.1f} "
              f"{q['map_submit_s']:>8.3f} {q['map_results_s']:>9.2f} {q['aggregate_task_s']:>10.3f} {q['evaluate_task_s']:>11.2f} {q['overhead_s']:>7.3f}")
    print(f"total: plain {plain:.2f} s, prefect {pref:.2f} s, overhead {overhead_pct:+.1f} % (goal <= {GOAL_PCT} %): "
          f"{'met' if result['goal_met'] else 'NOT met'}")
    for q in res["prefect"]:
        c = q["compute_s"]
        print(f"  prefect round {q['round']} rep {q['rep']}: train window {q['map_submit_s'] + q['map_results_s']:.2f} s vs busy "
              f"{c.get('client_update', 0):.2f} s ({q['train_overhead_s'] * 1000:+.0f} ms); aggregate task "
              f"{q['aggregate_overhead_s'] * 1000:+.0f} ms, evaluate task {q['evaluate_overhead_s'] * 1000:+.0f} ms over compute")
    print(f"orchestration outside compute: {result['orchestration_s_per_round']:.3f} s/round, "
          f"{1000 * result['orchestration_s_per_task_call']:.1f} ms/task call; "
          f"inner compute prefect/plain = {inner_compute_ratio:.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
