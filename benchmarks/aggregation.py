"""Server-side aggregation cost: every strategy's time, fedilora against the memory floor
(one weighted pass over the same bytes) and against the official repository's approach,
and the extra memory fedilora's aggregate allocates. Writes
benchmarks/results/aggregation.json and prints a summary.

    python benchmarks/aggregation.py [--reps 15] [--threads 2]

Setup: K=10 clients with ranks [4, 8, 16, 32, 64] twice, 100 adapted layers of width 768
(A: r x 768, B: 768 x r, PEFT keys), plus a small trained head averaged with p_k; seeded
random float32 tensors. Timed calls are interleaved (floor, fedilora, official, ... in
every repetition) so a busy machine slows them alike; median and min are reported.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from fedilora import aggregation, lora, methods
from fedilora.methods import aggregate as agg_method

RANKS = [4, 8, 16, 32, 64, 4, 8, 16, 32, 64]
EQUAL_RANKS = [32] * 10
LAYERS = 100
WIDTH = 768
HEAD = (9, 768)  # a small trained head (modules_to_save), averaged with p_k
SEED = 0
GOAL_FLOOR = 1.3  # fedilora time / floor time
GOAL_OFFICIAL = 5.0  # official time / fedilora time
GOAL_OVERHEAD = 0.10  # input validation and dispatch / fedilora time


# --------------------------------------------------------------------------- inputs


def a_key(i: int) -> str:
    return f"base_model.model.layer.{i}.q.lora_A.weight"


def make_inputs(ranks: list[int], seed: int = SEED) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    gen = torch.Generator().manual_seed(seed)
    states = []
    for r in ranks:
        state = {}
        for i in range(LAYERS):
            state[a_key(i)] = torch.randn(r, WIDTH, generator=gen)
            state[lora.b_key(a_key(i))] = torch.randn(WIDTH, r, generator=gen)
        state["base_model.model.head.modules_to_save.default.weight"] = torch.randn(*HEAD, generator=gen)
        states.append(state)
    num_samples = torch.randint(100, 1000, (len(ranks),), generator=gen).tolist()
    return states, num_samples


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


# --------------------------------------------------------------------------- references


def floor(states: list[dict[str, torch.Tensor]], ranks: list[int], num_samples: list[int]) -> dict[str, torch.Tensor]:
    """The memory floor: one fused weighted pass reading every client tensor once and
    writing a global-sized output (``out[:r] += p_k * t``, no stack, no temporaries). It is
    not a valid aggregation (one weight per client, no renormalisation per dimension), just
    the least work any rule over exactly these bytes must do."""
    total = sum(num_samples)
    p = [n / total for n in num_samples]
    r_max = max(ranks)
    out = {}
    for key, ref in states[0].items():
        if lora.is_lora_a(key):
            acc = torch.zeros(r_max, ref.shape[1])
            for state, r, w in zip(states, ranks, p):
                acc[:r].add_(state[key], alpha=w)
        elif lora.is_lora_b(key):
            acc = torch.zeros(ref.shape[0], r_max)
            for state, r, w in zip(states, ranks, p):
                acc[:, :r].add_(state[key], alpha=w)
        else:
            acc = torch.zeros(ref.shape)
            for state, w in zip(states, p):
                acc.add_(state[key], alpha=w)
        out[key] = acc
    return out


def official(states: list[dict[str, torch.Tensor]], ranks: list[int], num_samples: list[int]) -> dict[str, torch.Tensor]:
    """The official repository's approach (gotobcn8/FediLoRA, ``Fedilora`` in
    fed_utils/model_aggregation.py), re-implemented from its description: per layer, every
    client is zero-padded to the largest rank (a padded copy of each client), then for each
    rank group (the rows between two consecutive distinct ranks) the slice is averaged over
    the clients that own it, with Python loops over layers, groups and owners. B uses the
    intended rule (the same groups on columns); the official B loop advances its group start
    to the client's own rank and so drops the higher columns of all but the first client."""
    total = sum(num_samples)
    p = [n / total for n in num_samples]
    r_max = max(ranks)
    bounds = sorted(set(ranks))
    groups = []  # (lo, hi, [(client, weight)]) with weights renormalised over the owners
    lo = 0
    for hi in bounds:
        owners = [k for k, r in enumerate(ranks) if r >= hi]
        mass = sum(p[k] for k in owners)
        groups.append((lo, hi, [(k, p[k] / mass) for k in owners]))
        lo = hi
    out = {}
    for key, ref in states[0].items():
        if lora.is_lora_a(key):
            padded = [F.pad(s[key], (0, 0, 0, r_max - r)) for s, r in zip(states, ranks)]
            acc = torch.zeros(r_max, ref.shape[1])
            for lo, hi, owners in groups:
                for k, w in owners:
                    acc[lo:hi] += padded[k][lo:hi] * w
        elif lora.is_lora_b(key):
            padded = [F.pad(s[key], (0, r_max - r)) for s, r in zip(states, ranks)]
            acc = torch.zeros(ref.shape[0], r_max)
            for lo, hi, owners in groups:
                for k, w in owners:
                    acc[:, lo:hi] += padded[k][:, lo:hi] * w
        else:
            acc = torch.zeros(ref.shape)
            for s, w in zip(states, p):
                acc += s[key] * w
        out[key] = acc
    return out


def dispatch_and_validation(states: list[dict[str, torch.Tensor]], ranks: list[int], num_samples: list[int]) -> None:
    """What ``methods.aggregate`` does besides the arithmetic: look the method up, validate its
    options, build it, validate every client's keys and shapes, compute p_k."""
    options = methods.options_for("fedilora", {})
    methods.method_class("fedilora")(methods.Setup(0, tuple(ranks), float), options)
    aggregation.validate(states, ranks, num_samples, [1.0] * len(states))
    aggregation.sample_weights(num_samples)


# --------------------------------------------------------------------------- measurement


def time_interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, dict[str, float]]:
    """Each repetition runs every function once, in order; returns median/min/all in ms."""
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up (allocator, first-call dispatch)
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            gc.collect()
            start = time.perf_counter()
            fn()
            runs[name].append((time.perf_counter() - start) * 1e3)
    return {
        name: {"median_ms": round(statistics.median(v), 2), "min_ms": round(min(v), 2), "reps": len(v),
               "all_ms": [round(x, 2) for x in v]}
        for name, v in runs.items()
    }


def profiled_peak(fn: Callable[[], object]) -> dict[str, int]:
    """Peak bytes held by torch's CPU allocator during ``fn`` beyond what was live before it,
    from the allocator events ``torch.profiler`` records with ``profile_memory=True`` (every
    allocation and free, in order; the running sum is the live extra memory)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                 key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
    live = peak = 0
    for e in mem:
        live += e["args"]["Bytes"]
        peak = max(peak, live)
    del result
    return {"peak_extra_bytes": peak, "retained_bytes": live, "allocator_events": len(mem)}


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise KeyError(field)


def rss_probe(which: str) -> dict[str, object]:
    """Run in a fresh process: resident memory before the call and its high-water mark during it.

    Linux resets the high-water mark (VmHWM) to the current RSS when 5 is written to
    /proc/self/clear_refs; ``ru_maxrss`` cannot be used, since a child started from this big
    process inherits the parent's peak."""
    torch.set_num_threads(1)
    states, num_samples = make_inputs(RANKS)
    fn = {"fedilora": lambda: agg_method("fedilora", states, RANKS, num_samples),
          "official": lambda: official(states, RANKS, num_samples),
          "floor": lambda: floor(states, RANKS, num_samples)}[which]
    fn()  # first call: library code paths and the allocator's arenas
    gc.collect()
    before = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    out = fn()
    peak = _status_bytes("VmHWM")
    return {"rss_before_bytes": before, "rss_high_water_bytes": peak, "rss_peak_delta_bytes": peak - before,
            "output_bytes": nbytes(out)}


def rss_in_subprocess(which: str) -> dict[str, int]:
    # a fixed mmap threshold makes glibc map every block over 64 KiB on its own and unmap it
    # on free, so the peak RSS follows the live tensors instead of the heap's high-water mark
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, __file__, "--rss-probe", which], capture_output=True, text=True,
                          check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_json(path: Path, data: dict) -> None:
    """Atomic write (fedilora.stages.write_json's rule, without importing the data stack)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def check_official_matches(states, ranks, num_samples) -> dict[str, object]:
    ours = agg_method("fedilora", states, ranks, num_samples)
    theirs = official(states, ranks, num_samples)
    diff = {kind: max(float((ours[k] - theirs[k]).abs().max()) for k in ours if pred(k))
            for kind, pred in (("A", lora.is_lora_a), ("B", lora.is_lora_b))}
    close = {kind: all(torch.allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-6) for k in ours if pred(k))
             for kind, pred in (("A", lora.is_lora_a), ("B", lora.is_lora_b))}
    head = all(torch.allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-6)
               for k in ours if not (lora.is_lora_a(k) or lora.is_lora_b(k)))
    return {"allclose_A": close["A"], "allclose_B": close["B"], "allclose_head": head,
            "max_abs_diff_A": diff["A"], "max_abs_diff_B": diff["B"], "tolerance": "rtol=1e-5, atol=1e-6"}


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15, help="repetitions of the fast calls")
    ap.add_argument("--slow-reps", type=int, default=3, help="repetitions of flexlora (SVDs)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (use 1 on a machine shared with other jobs)")
    ap.add_argument("--out", default="benchmarks/results/aggregation.json")
    ap.add_argument("--rss-probe", choices=["fedilora", "official", "floor"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_probe:
        print(json.dumps(rss_probe(args.rss_probe)))
        return
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    states, num_samples = make_inputs(RANKS)
    eq_states, eq_samples = make_inputs(EQUAL_RANKS, seed=SEED + 1)
    agg = agg_method
    match = check_official_matches(states, RANKS, num_samples)

    core = time_interleaved({
        "floor": lambda: floor(states, RANKS, num_samples),
        "fedilora": lambda: agg("fedilora", states, RANKS, num_samples),
        "official": lambda: official(states, RANKS, num_samples),
        "dispatch_and_validation": lambda: dispatch_and_validation(states, RANKS, num_samples),
    }, args.reps)
    # flora allocates the stacked (sum of ranks) output every call: timed apart from the core trio
    others = time_interleaved({
        "hetlora": lambda: agg("hetlora", states, RANKS, num_samples),
        "flora": lambda: agg("flora", states, RANKS, num_samples),
    }, max(3, args.reps // 3))
    equal = time_interleaved({
        "floor": lambda: floor(eq_states, EQUAL_RANKS, eq_samples),
        "fedavg": lambda: agg("fedavg", eq_states, EQUAL_RANKS, eq_samples),
        "fedilora": lambda: agg("fedilora", eq_states, EQUAL_RANKS, eq_samples),
    }, args.reps)
    slow = time_interleaved({"flexlora": lambda: agg("flexlora", states, RANKS, num_samples)}, args.slow_reps)

    input_bytes = sum(nbytes(s) for s in states)
    global_state = agg("fedilora", states, RANKS, num_samples)
    global_bytes = nbytes(global_state)
    del global_state
    r_max = max(RANKS)
    padded_bytes = len(RANKS) * r_max * WIDTH * LAYERS * 2 * 4
    peaks = {
        "fedilora": profiled_peak(lambda: agg("fedilora", states, RANKS, num_samples)),
        "official": profiled_peak(lambda: official(states, RANKS, num_samples)),
        "floor": profiled_peak(lambda: floor(states, RANKS, num_samples)),
    }
    rss = {name: rss_in_subprocess(name) for name in ("fedilora", "official")}
    fed_peak = peaks["fedilora"]["peak_extra_bytes"]

    def ratio(a: float, b: float) -> float:
        return round(a / b, 3)

    ratios = {
        "fedilora_over_floor_median": ratio(core["fedilora"]["median_ms"], core["floor"]["median_ms"]),
        "fedilora_over_floor_min": ratio(core["fedilora"]["min_ms"], core["floor"]["min_ms"]),
        "official_over_fedilora_median": ratio(core["official"]["median_ms"], core["fedilora"]["median_ms"]),
        "official_over_fedilora_min": ratio(core["official"]["min_ms"], core["fedilora"]["min_ms"]),
        "equal_ranks_fedilora_over_fedavg_median": ratio(equal["fedilora"]["median_ms"], equal["fedavg"]["median_ms"]),
        "equal_ranks_fedilora_over_floor_median": ratio(equal["fedilora"]["median_ms"], equal["floor"]["median_ms"]),
        "dispatch_and_validation_over_fedilora_median": ratio(core["dispatch_and_validation"]["median_ms"], core["fedilora"]["median_ms"]),
        "fedilora_peak_extra_over_global_state": ratio(fed_peak, global_bytes),
        "padded_copy_over_global_state": ratio(padded_bytes, global_bytes),
    }
    goals = {
        f"fedilora_within_{GOAL_FLOOR}x_floor": ratios["fedilora_over_floor_median"] <= GOAL_FLOOR,
        f"speedup_vs_official_at_least_{GOAL_OFFICIAL}x": ratios["official_over_fedilora_median"] >= GOAL_OFFICIAL,
        f"dispatch_and_validation_at_most_{GOAL_OVERHEAD:.0%}": ratios["dispatch_and_validation_over_fedilora_median"] <= GOAL_OVERHEAD,
        # the output itself is one global state; allow 1 % for the weight matrix and scalars
        "extra_memory_at_most_one_global_state": fed_peak <= 1.01 * global_bytes,
        "official_matches_ours": bool(match["allclose_A"] and match["allclose_B"] and match["allclose_head"]),
    }
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "config": {"clients": len(RANKS), "ranks": RANKS, "equal_ranks_variant": EQUAL_RANKS, "layers": LAYERS,
                   "width": WIDTH, "head_shape": list(HEAD), "dtype": "float32", "seed": SEED,
                   "num_samples": num_samples, "reps": args.reps, "flexlora_reps": args.slow_reps},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_model": cpu_model(),
                        "cpu_count": os.cpu_count(), "python": platform.python_version(),
                        "loadavg_before": [round(x, 2) for x in load_before],
                        "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "timings_heterogeneous": {**core, **others, **slow},
        "timings_equal_ranks": equal,
        "official_check": match,
        "ratios": ratios,
        "goals_met": goals,
        "memory": {
            "method": ("primary: torch.profiler(profile_memory=True) allocator events exported to a Chrome trace; "
                       "the running sum of allocation/free bytes during the call, maximised, is the peak extra "
                       "memory held by torch's CPU allocator beyond the inputs (the returned output included). "
                       "Cross-check: a fresh subprocess builds the inputs, then reads VmRSS before and VmHWM after "
                       "the call (VmHWM reset through /proc/self/clear_refs; glibc's mmap threshold fixed at 64 KiB so "
                       "freed blocks leave RSS; coarser: it also counts allocator and page effects)."),
            "input_bytes": input_bytes,
            "global_state_bytes": global_bytes,
            "padded_copy_bytes": padded_bytes,
            "padded_copy_formula": "K x r_max x d x layers x 2 x 4 bytes",
            "profiler": peaks,
            "rss_subprocess": rss,
        },
    }
    write_json(Path(args.out), result)
    print_summary(result)


def print_summary(res: dict) -> None:
    mib = 2**20
    print(f"torch {res['environment']['torch']}, {res['environment']['threads']} threads, "
          f"{res['environment']['cpu_model']}, load {res['environment']['loadavg_before']}")
    print(f"{'heterogeneous ranks':<28}{'median ms':>10}{'min ms':>10}")
    for name, t in res["timings_heterogeneous"].items():
        print(f"  {name:<26}{t['median_ms']:>10.1f}{t['min_ms']:>10.1f}")
    print(f"{'equal ranks (all 32)':<28}{'median ms':>10}{'min ms':>10}")
    for name, t in res["timings_equal_ranks"].items():
        print(f"  {name:<26}{t['median_ms']:>10.1f}{t['min_ms']:>10.1f}")
    r, g, m = res["ratios"], res["goals_met"], res["memory"]
    print(f"fedilora / floor: {r['fedilora_over_floor_median']:.2f}x median, {r['fedilora_over_floor_min']:.2f}x min "
          f"(goal <= {GOAL_FLOOR}x: {g[f'fedilora_within_{GOAL_FLOOR}x_floor']})")
    print(f"official / fedilora: {r['official_over_fedilora_median']:.2f}x median, "
          f"{r['official_over_fedilora_min']:.2f}x min (goal >= {GOAL_OFFICIAL}x: "
          f"{g[f'speedup_vs_official_at_least_{GOAL_OFFICIAL}x']}); same result: {g['official_matches_ours']}")
    print(f"dispatch and validation / fedilora: {r['dispatch_and_validation_over_fedilora_median']:.3f} "
          f"(goal <= {GOAL_OVERHEAD}: {g[f'dispatch_and_validation_at_most_{GOAL_OVERHEAD:.0%}']})")
    print(f"memory: fedilora peak extra {m['profiler']['fedilora']['peak_extra_bytes'] / mib:.1f} MiB "
          f"(RSS delta {m['rss_subprocess']['fedilora']['rss_peak_delta_bytes'] / mib:.1f} MiB), one global state "
          f"{m['global_state_bytes'] / mib:.1f} MiB, padded copy of all clients {m['padded_copy_bytes'] / mib:.1f} MiB, "
          f"official peak extra {m['profiler']['official']['peak_extra_bytes'] / mib:.1f} MiB "
          f"(goal <= 1 global state: {g['extra_memory_at_most_one_global_state']})")


if __name__ == "__main__":
    main()
