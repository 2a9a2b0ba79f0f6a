"""Central (non-federated) reference: one adapter at the largest client rank trained on all
non-test samples, evaluated on the global test split with both modalities, image only and
text only. Writes benchmarks/results/central.json and prints a summary.

    python benchmarks/central.py [--params params.yaml] [--epochs 4]

Needs `fedilora prepare` and `fedilora split` (or `dvc repro`) to have run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import flows  # noqa: F401  (offline defaults)
from fedilora.config import load_params
from fedilora.models import adapters
from fedilora.atomic import write_json
from fedilora.training import Subset, evaluate, train_local
from tasks.runtime import federation

SETTINGS = {"both": (True, True), "image_only": (True, False), "text_only": (False, True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/central.json")
    args = ap.parse_args()
    params = load_params(args.params)
    fed = federation(params)
    rows = torch.cat([s.rows for s in fed.train_sets.values()] + [s.rows for s in fed.test_sets.values()])
    results = {}
    for name, (image, text) in SETTINGS.items():
        state = fed.initial_global_state()
        slot = fed.global_slot(state)
        adapters.load_state(fed.model, slot, state)
        adapters.activate(fed.model, slot)
        flags = lambda n, on: torch.full((n,), on)  # noqa: E731
        train = Subset(rows, flags(len(rows), image), flags(len(rows), text))
        g = fed.global_test
        test = Subset(g.rows, flags(len(g), image), flags(len(g), text))
        start = time.perf_counter()
        torch.manual_seed(params.seed)
        train_local(fed.model, fed.table, train, epochs=args.epochs, batch_size=params.federation.batch_size,
                    lr=params.federation.lr, generator=torch.Generator().manual_seed(params.seed))
        results[name] = {**evaluate(fed.model, fed.table, test), "train_seconds": round(time.perf_counter() - start, 1)}
        print(f"{name:<11} accuracy {results[name]['accuracy']:.3f}  macro-F1 {results[name]['macro_f1']:.3f}")
    write_json(Path(args.out), {"epochs": args.epochs, "train_samples": len(rows), "test_samples": len(fed.global_test), "results": results})


if __name__ == "__main__":
    main()
