"""How much accuracy LoRA, and LoRA's rank, carry in the default testbed (issue 13, item 1),
measured with the library's own code. Writes benchmarks/results/lora_value.json and prints a
summary table.

    python benchmarks/lora_value.py [--seeds 0 1 2 3 4] [--sweep-ranks 4 8 32] [--jobs 2]

The testbed is ``params.yaml``'s: a public slice (``data.public_fraction``, drawn with
``data.public_seed``, the same rows for every seed) on which ``fedilora.alignment.align``
trains the projector and head once; the model of seed s is
``fedilora.models.shared.build(ModelSpec.of(params with seed s, ..., aligned=that file))``, and
``model.trainable: lora`` leaves only LoRA trainable. Central training (no federation): every
client's ``train`` rows of seed s (``make_splits``), both modalities present, ``EPOCHS`` epochs
at batch ``BATCH_SIZE``; evaluation on seed s's global test split (client -1). Arms: (a)
``frozen``, the aligned model untrained; (b) ``r2``; (c) ``r16``; and ``--sweep-ranks`` on seeds
0-2. (d), the best rank, is the earlier validation sweep's: r16.

Learning rates are not chosen here: ``LRS`` holds those the earlier selection chose on a
validation split (docs/testbed.md), so nothing is chosen on the test split. The candidate
testbeds measured before the library had the testbed (with the benchmark's own, seed-dependent
public slice and one alignment per seed) stay in the JSON under ``earlier``, as measured; the
code that measured them is ``benchmarks/lora_value.py`` at commit 1271764.

Each run is cached as one JSON file (``--cache``), the alignment as a safetensors file, so an
interrupted run resumes; two worker processes (``--jobs 2``, one torch thread each) share the
work. Needs ``fedilora prepare`` to have run (the feature table and the prepared dataset).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import flows  # noqa: F401  (offline defaults)
from fedilora import alignment, stats
from fedilora import metrics as task_metrics
from fedilora.atomic import write_json
from fedilora.config import Params, load_params
from fedilora.data.splits import PUBLIC, make_splits
from fedilora.federation import subsets_from_splits
from fedilora.inputs import FeatureTable
from fedilora.models.families import family_of
from fedilora.models.shared import ModelSpec, base_model, build
from fedilora.paths import DataPaths
from fedilora.stages import official_test_rows
from fedilora.training import Subset, evaluate, train_local

EPOCHS = 4
BATCH_SIZE = 32
SEEDS = (0, 1, 2, 3, 4)
TARGET_SEEDS = (0, 1, 2)  # the margins are judged on these
# chosen on validation by the earlier selection (docs/testbed.md, `earlier` in the JSON): r2 alone
# preferred 5e-3; the alignment's 1e-3 is params.yaml's align.lr
LRS = {2: 5e-3, 4: 2e-3, 8: 2e-3, 16: 2e-3, 32: 2e-3}
BEST_RANK = 16  # (d): the best rank of the earlier validation sweep {2, 4, 8, 16, 32}
TARGET = {"c_minus_a": 0.05, "c_minus_b": 0.02}
OUT = Path("benchmarks/results/lora_value.json")


@cache
def params() -> Params:
    return load_params("params.yaml")


def for_seed(seed: int) -> Params:
    return params().model_copy(update={"seed": seed})


@cache
def table() -> FeatureTable:
    return FeatureTable.load(DataPaths.of(params()).features)


@cache
def splits(seed: int) -> pd.DataFrame:
    """Seed ``seed``'s splits, as ``fedilora split`` makes them."""
    test_rows, class_names = official_test_rows(DataPaths.of(params()))
    return make_splits(table().labels.numpy(), for_seed(seed), test_rows=test_rows, class_names=class_names)


def complete(rows: torch.Tensor) -> Subset:
    """Rows with both modalities present (the central reference trains and tests on both)."""
    ones = torch.ones(len(rows), dtype=torch.bool)
    return Subset(rows, ones, ones.clone())


@cache
def datasets(seed: int) -> dict[str, Subset]:
    """union: every client's train rows; test: the global test split."""
    train, _, global_test = subsets_from_splits(splits(seed))
    union = torch.sort(torch.cat([s.rows for s in train.values()])).values
    return {"union": complete(union), "test": complete(global_test.rows)}


def _cache_dir() -> Path:
    return Path(os.environ["LORA_VALUE_CACHE"])


def aligned_path() -> Path:
    return _cache_dir() / "aligned.safetensors"


def ensure_aligned() -> dict:
    """The alignment stage's modules for these params (made once; every seed loads them), and
    what it cost."""
    path, meta = aligned_path(), _cache_dir() / "aligned.json"
    if path.is_file():
        with safe_open(str(path), "pt") as fh:
            if fh.metadata() == alignment.inputs(params()):
                return json.loads(meta.read_text())
    public = [tuple(splits(s)[splits(s).client == PUBLIC].row) for s in SEEDS]
    assert len(set(public)) == 1, "the public slice differs between seeds"
    start, cpu = time.perf_counter(), time.process_time()
    state = alignment.align(params(), table(), splits(params().seed))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=alignment.inputs(params()))
    record = {"public_rows": len(public[0]), "trained_params": sum(t.numel() for t in state.values()),
              "modules": sorted({k.split(".")[0] for k in state}), "wall_seconds": round(time.perf_counter() - start, 1),
              "cpu_seconds": round(time.process_time() - cpu, 1)}
    meta.write_text(json.dumps(record, indent=1))
    return record


def spec(seed: int) -> ModelSpec:
    return ModelSpec.of(for_seed(seed), table().image_features.shape[1], task_metrics.num_classes(table().labels),
                        aligned=aligned_path())


def unit_path(arm: str, seed: int) -> Path:
    return _cache_dir() / f"{arm}_{seed}.json"


def run_unit(unit: tuple[str, int]) -> dict:
    """One arm and seed: (a) the aligned base evaluated as it is, or LoRA at a rank trained
    centrally; cached."""
    arm, seed = unit
    path = unit_path(arm, seed)
    if path.is_file():
        return json.loads(path.read_text())
    torch.set_num_threads(1)
    p, data = for_seed(seed), datasets(seed)
    make_batch, runtime = family_of(p.model).make_batch, p.runtime
    start, cpu = time.perf_counter(), time.process_time()
    lr, trainable = None, 0
    if arm == "frozen":
        model = base_model(spec(seed))[0]
    else:
        rank = int(arm[1:])
        lr = LRS[rank]
        model = build(spec(seed).model_copy(update={"rank": rank, "alpha": p.lora.alpha_for(rank)})).peft
        trainable = sum(t.numel() for t in model.parameters() if t.requires_grad)
        train_local(model, table(), data["union"], epochs=EPOCHS, batch_size=BATCH_SIZE, lr=lr,
                    make_batch=make_batch, runtime=runtime, generator=torch.Generator().manual_seed(seed))
    record = {"arm": arm, "seed": seed, "lr": lr, "trainable_params": trainable,
              **evaluate(model, table(), data["test"], make_batch=make_batch, runtime=runtime),
              "n_train": len(data["union"]), "n_test": len(data["test"]),
              "wall_seconds": round(time.perf_counter() - start, 1), "cpu_seconds": round(time.process_time() - cpu, 1)}
    path.write_text(json.dumps(record, indent=1))
    print(f"  {arm:<6} seed {seed}  acc {record['accuracy']:.3f}  ({record['wall_seconds']:.0f} s)", flush=True)
    return record


def run_units(units: list[tuple[str, int]], jobs: int) -> list[dict]:
    todo = [u for u in units if not unit_path(*u).is_file()]
    print(f"{len(units)} units, {len(todo)} to run", flush=True)
    if jobs > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(run_unit, todo))
    else:
        for u in todo:
            run_unit(u)
    return [run_unit(u) for u in units]


# --------------------------------------------------------------------------- summary


def arm_table(records: list[dict]) -> dict:
    arms: dict = {}
    for arm in sorted({r["arm"] for r in records}, key=lambda a: (a != "frozen", int(a[1:]) if a != "frozen" else 0)):
        rs = sorted((r for r in records if r["arm"] == arm), key=lambda r: r["seed"])
        acc = {r["seed"]: r["accuracy"] for r in rs}
        arms[arm] = {
            "lr": rs[0]["lr"], "trainable_params": rs[0]["trainable_params"], "seeds": list(acc),
            "accuracy": list(acc.values()), "macro_f1": [r["macro_f1"] for r in rs],
            "mean": {name: float(np.mean([acc[s] for s in seeds]))
                     for name, seeds in (("seeds_0_2", TARGET_SEEDS), ("seeds_0_4", SEEDS)) if set(seeds) <= set(acc)},
            "cpu_seconds_mean": float(np.mean([r["cpu_seconds"] for r in rs])),
            "wall_seconds_mean": float(np.mean([r["wall_seconds"] for r in rs])),
        }
    return arms


def margins(arms: dict, seeds: tuple[int, ...]) -> dict:
    """(c) - (a) and (c) - (b), paired by seed, with their 95 % t intervals; whether the means
    reach the target."""
    def acc(arm):
        by_seed = dict(zip(arms[arm]["seeds"], arms[arm]["accuracy"]))
        return [by_seed[s] for s in seeds]

    out = {}
    for name, other in (("c_minus_a", "frozen"), ("c_minus_b", "r2")):
        d = stats.paired_difference(acc("r16"), acc(other))
        out[name] = {"mean": d.mean, "ci95": [d.ci_low, d.ci_high], "n": d.seeds, "verdict": d.verdict,
                     "per_seed": [x - y for x, y in zip(acc("r16"), acc(other))]}
    out["meets_target"] = all(out[k]["mean"] >= v for k, v in TARGET.items())
    return out


def summarise(alignment_record: dict, earlier: dict) -> dict:
    records = [json.loads(p.read_text()) for p in sorted(_cache_dir().glob("*_*.json"))]
    arms = arm_table(records)
    setup = {
        "code": "library: make_splits (public slice), fedilora.alignment.align, ModelSpec + build / base_model, model.trainable",
        "epochs": EPOCHS, "batch_size": BATCH_SIZE, "lrs": {f"r{r}": lr for r, lr in LRS.items()},
        "lr_source": "chosen on validation by the earlier selection (`earlier`); not re-selected",
        "align": params().align.model_dump(mode="json"), "data": params().data.model_dump(mode="json", include={"public_fraction", "public_seed"}),
        "trainable": params().model.trainable, "targets": list(params().model.target_modules),
        "lora_alpha": f"{params().lora.alpha_mode}, scale {params().lora.scale:g}",
        "modalities": "both present in training and test", "torch_threads": 1,
        "sizes": {"public": alignment_record["public_rows"], **{k: len(v) for k, v in datasets(SEEDS[0]).items()}},
    }
    out = {"setup": setup, "alignment": alignment_record, "arms": arms, "d": f"r{BEST_RANK}",
           "d_source": "the best rank of the earlier validation sweep {2, 4, 8, 16, 32} (`earlier.candidates.align_lora.selection`)"}
    out["margins"] = {name: margins(arms, seeds) for name, seeds in (("seeds_0_2", TARGET_SEEDS), ("seeds_0_4", SEEDS))
                      if all(set(seeds) <= set(arms.get(a, {}).get("seeds", ())) for a in ("frozen", "r2", "r16"))}
    return {"default": out, "earlier": {**earlier, "note": EARLIER_NOTE} if earlier else {}}


def print_table(default: dict) -> None:
    print(f"\n{'arm':<7} {'lr':>7} {'0-2':>6} {'0-4':>6}  per seed")
    for arm, r in default["arms"].items():
        means = [f"{r['mean'][k]:.3f}" if k in r["mean"] else "" for k in ("seeds_0_2", "seeds_0_4")]
        print(f"{arm:<7} {r['lr'] or '-':>7} {means[0]:>6} {means[1]:>6}  {' '.join(f'{x:.3f}' for x in r['accuracy'])}")
    for name, m in default["margins"].items():
        print(f"{name}: " + "  ".join(f"{k} {m[k]['mean'] * 100:+.1f} [{m[k]['ci95'][0] * 100:+.1f}, {m[k]['ci95'][1] * 100:+.1f}]"
                                      for k in TARGET) + f"  {'MEETS' if m['meets_target'] else 'misses'} the target")


EARLIER_NOTE = ("Measured before the library had the testbed, with the benchmark's own code (benchmarks/lora_value.py at "
                "commit 1271764): a public slice carved after the global test holdout with a stream of the run seed (so "
                "seed-dependent, 191 rows), one alignment per seed from that seed's init, the old global test split "
                "(381 rows), lrs chosen on a validation split of the training union (seed 0). Kept as measured.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="seeds of (a), (b), (c)")
    ap.add_argument("--sweep-ranks", nargs="*", type=int, default=[4, 8, 32], help="more ranks, on seeds 0-2")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--cache", default="data/lora_value_runs/library")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    if unknown := sorted(set(args.sweep_ranks) - set(LRS)):
        ap.error(f"--sweep-ranks: no validated lr for rank(s) {unknown}; LRS has {sorted(LRS)}")
    os.environ["LORA_VALUE_CACHE"] = args.cache  # read by the worker processes too
    _cache_dir().mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    aligned = ensure_aligned()
    units = [(arm, s) for arm in ("r16", "r2") for s in args.seeds]
    units += [(f"r{r}", s) for r in args.sweep_ranks for s in TARGET_SEEDS]
    run_units(units + [("frozen", s) for s in args.seeds], args.jobs)
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    summary = summarise(aligned, previous.get("earlier", {}))
    write_json(Path(args.out), summary)
    print_table(summary["default"])


if __name__ == "__main__":
    main()
