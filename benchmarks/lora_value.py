"""How much accuracy LoRA, and LoRA's rank, carry in candidate testbeds (issue 13, item 1),
plus how far clients drift per round (item 2, a first look). Writes
benchmarks/results/lora_value.json and prints a summary table.

    python benchmarks/lora_value.py select   [--candidates ...] [--ranks 2 16] [--jobs 2]
    python benchmarks/lora_value.py test     [--candidates ...] [--seeds 0 1 2] [--arms ...] [--jobs 2]
    python benchmarks/lora_value.py drift    --candidate NAME [--configs 32x1 8x2 ...] [--rounds 4]
    python benchmarks/lora_value.py summary

(The exact commands behind the committed results are at the end of docs/testbed.md.)

Central training (no federation) on the union of every client's ``train`` rows, both
modalities present, ``EPOCHS`` epochs at batch ``federation.batch_size``; evaluation on the
global test split (client -1). Arms per candidate: (a) ``frozen``: LoRA frozen, only what
the candidate trains besides LoRA (for a LoRA-only candidate, the model as it is before LoRA
training: seeded init, or the aligned model); ``r2`` ... ``r32``: LoRA at that rank (plus
the projector/head where the candidate trains them). (b) = r2, (c) = r16, (d) = the rank
with the best validation accuracy among the ranks swept.

Learning rates: every arm (and every alignment stage) is run at every lr of ``LR_GRID`` with
seed 0, trained on 80 % of the union and scored on the other 20 % (a stratified validation
split, seeded); the lr with the best validation accuracy is chosen (ties: the smaller lr).
When the best is at an edge of the grid, the next lr beyond it (``LR_BEYOND``) is tried too,
for any arm alike, until the best is inside.
The test phase then trains on the whole union at that lr with seeds 0, 1, 2. The test split
is never used to choose anything.

Each unit's result is cached as one JSON file (``--cache``, default data/lora_value_runs), so
phases can be run in pieces and two worker processes (``--jobs 2``, one torch thread each)
share the work. Needs ``fedilora prepare`` and ``fedilora split`` to have run.

Functions the library lacks, kept here until the chosen testbed moves into it:
``public_slice_splits`` (a public alignment slice as a split output), ``ClassNameHead`` and
``class_name_embeddings`` (a frozen CLIP-style head), ``base_model`` / ``candidate_model``
(the embedded model with a chosen head, trained modules and LoRA targets), ``align_base``
(the central alignment stage). See docs/testbed.md for the results and where each belongs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

import flows  # noqa: F401  (offline defaults)
from fedilora.config import Params, load_params
from fedilora.data import splits as splits_mod
from fedilora.editing import cosine, cut_to
from fedilora.federation import Federation, run, subsets_from_splits
from fedilora.inputs import FeatureTable
from fedilora.models import adapters
from fedilora.models.encoders import load_text_model, load_tokenizer
from fedilora.models.multimodal import MultimodalClassifier
from fedilora.stages import write_json
from fedilora.training import Subset, evaluate, length_bucketed_batches, train_local

EPOCHS = 4
LR_GRID = (5e-4, 1e-3, 2e-3, 5e-3)
LR_BEYOND = {"up": (1e-2, 2e-2), "down": (2e-4, 1e-4)}  # tried, in order, while an arm's best lr is at an edge
SEEDS = (0, 1, 2)
RANKS = (2, 4, 8, 16, 32)
VAL_FRACTION = 0.2
PUBLIC_FRACTION = 0.125  # of the pool left after the global test split
PUBLIC_CLIENT = -2  # the public slice's ``client`` value in the splits table (split "public")
ALIGN_EPOCHS = 20  # ~190 public samples: 120 steps at batch 32, about the 4-epoch central runs' 150
CLASS_SCALE = 20.0  # logit scale of the class-name head (sentence-transformers' default)
QV = ("query", "value")
ALL_MODULES = ("query", "key", "value", "dense")  # attention q/k/v/output and the MLP's two denses
NO_POOLER = r".*pooler.*"  # BertModel's pooler.dense is unused by the classifier
OUT = Path("benchmarks/results/lora_value.json")


@dataclass(frozen=True)
class Candidate:
    """A testbed: which head, what trains beside LoRA, where LoRA sits, whether a public
    alignment stage runs first."""

    description: str
    head: str  # linear | classname
    trains: str  # lora (only LoRA) | lora+head (LoRA with the projector and head)
    targets: tuple[str, ...]
    aligned: bool


CANDIDATES = {
    "lora_only": Candidate("(i) only LoRA trains; projector and head frozen at their seeded init", "linear", "lora", QV, False),
    "align_lora": Candidate("(ii) central alignment of projector + head on a public slice, then only LoRA trains", "linear", "lora", QV, True),
    "align_classname": Candidate("(ii)+(iii) frozen class-name head; alignment trains the projector on a public slice, then only LoRA trains", "classname", "lora", QV, True),
    "classname": Candidate("(iii) frozen class-name head; projector and LoRA train", "classname", "lora+head", QV, False),
    "all_modules": Candidate("(iv) LoRA on q,k,v,attention-output and MLP denses; projector + head train (today's regime)", "linear", "lora+head", ALL_MODULES, False),
    "align_all_modules": Candidate("(ii)+(iv) alignment on a public slice, then only LoRA on q,k,v,attention-output and MLP denses", "linear", "lora", ALL_MODULES, True),
}
MEASURED = ("lora_only", "align_lora", "align_classname", "all_modules")  # docs/testbed.md; the other two are defined, not run


# --------------------------------------------------------------------------- data


def public_slice_splits(labels: np.ndarray, params: Params, fraction: float) -> pd.DataFrame:
    """``make_splits`` with a public slice carved (stratified) out of the pool before the
    clients are partitioned: rows with client ``PUBLIC_CLIENT`` and split ``public``. The
    global test split is the same as ``make_splits``'s (same seed stream); the public slice
    takes a fifth stream, so the four existing streams are unchanged."""
    labels = np.asarray(labels).astype(np.int64)
    holdout_rng, part_rng, split_rng, miss_rng, public_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(params.seed).spawn(5)
    )
    test = splits_mod._stratified_holdout(labels, params.data.test_fraction, holdout_rng)
    pool = np.setdiff1d(np.arange(len(labels)), test)
    public = np.sort(pool[splits_mod._stratified_holdout(labels[pool], fraction, public_rng)])
    pool = np.setdiff1d(pool, public)
    k = params.clients.num_clients
    if params.clients.partition == "dirichlet":
        shares = splits_mod._dirichlet(pool, labels, k, params.clients.dirichlet_alpha, part_rng)
    else:
        shares = splits_mod._iid(pool, k, part_rng)
    frames = [splits_mod._complete(test, splits_mod.GLOBAL_TEST, "test"), splits_mod._complete(public, PUBLIC_CLIENT, "public")]
    for client, share in enumerate(shares):
        frames.extend(splits_mod._client_frames(client, share, params, split_rng, miss_rng))
    return pd.concat(frames, ignore_index=True)


def complete(rows: np.ndarray | torch.Tensor) -> Subset:
    """Rows with both modalities present (the central reference trains and tests on both)."""
    rows = torch.tensor(np.array(rows), dtype=torch.long)
    ones = torch.ones(len(rows), dtype=torch.bool)
    return Subset(rows, ones, ones.clone())


@cache
def table() -> FeatureTable:
    return FeatureTable.load(Path(params().data.root) / "features.safetensors")


@cache
def params() -> Params:
    return load_params("params.yaml")


@cache
def splits(public: bool) -> pd.DataFrame:
    if public:
        return public_slice_splits(table().labels.numpy(), params(), PUBLIC_FRACTION)
    return splits_mod.load_splits(Path(params().data.root) / "splits.parquet")


@cache
def datasets_for(public: bool) -> dict[str, Subset]:
    """union (every client's train rows), fit/val (its stratified 80/20 cut), test (global),
    public (the alignment slice, when carved)."""
    train_sets, _, global_test = subsets_from_splits(splits(public))
    union = np.sort(torch.cat([s.rows for s in train_sets.values()]).numpy())
    labels = table().labels.numpy()
    rng = np.random.default_rng(np.random.SeedSequence([params().seed, 13]))
    val_idx = splits_mod._stratified_holdout(labels[union], VAL_FRACTION, rng)
    val = union[val_idx]
    out = {
        "union": complete(union),
        "fit": complete(np.setdiff1d(union, val)),
        "val": complete(val),
        "test": complete(global_test.rows),
    }
    if public:
        df = splits(public)
        out["public"] = complete(df[df.client == PUBLIC_CLIENT].row.to_numpy())
    return out


# --------------------------------------------------------------------------- models


class ClassNameHead(nn.Module):
    """CLIP-style head without parameters: logits = scale * cos(image pooled + text pooled,
    the frozen text encoder's embedding of each class name). An absent modality pools to
    zeros (MultimodalClassifier), so the sum is the present one."""

    def __init__(self, class_embeddings: torch.Tensor, scale: float = CLASS_SCALE):
        super().__init__()
        self.register_buffer("class_embeddings", F.normalize(class_embeddings, dim=-1))
        self.scale = scale

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        hidden = self.class_embeddings.shape[1]
        rep = pooled[:, :hidden] + pooled[:, hidden:]
        return self.scale * F.normalize(rep, dim=-1) @ self.class_embeddings.T


@torch.no_grad()
def class_name_embeddings(text_model: nn.Module, names: list[str]) -> torch.Tensor:
    """Mean-pooled token states of each class name (MiniLM's sentence-embedding pooling)."""
    tok = load_tokenizer()(names, padding=True, return_tensors="pt")
    hidden = text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
    mask = tok["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


@cache
def class_names() -> list[str]:
    import datasets

    return list(datasets.load_from_disk(str(Path(params().data.root) / "dataset")).features["label"].names)


def base_model(head: str, seed: int) -> MultimodalClassifier:
    """The embedded model before LoRA: frozen MiniLM, a seeded projector, a linear or a
    class-name head."""
    text_model = load_text_model("embedded")
    embeddings = class_name_embeddings(text_model.eval(), class_names()) if head == "classname" else None
    torch.manual_seed(seed)
    base = MultimodalClassifier(text_model, table().image_features.shape[1], len(class_names()), params().model.num_image_tokens)
    if embeddings is not None:
        base.classifier = ClassNameHead(embeddings)
    for p in base.text_model.parameters():
        p.requires_grad_(False)
    return base


def trained_modules(head: str) -> list[str]:
    """What trains besides LoRA when a candidate trains it: the projector, and a linear head."""
    return ["image_projector"] + (["classifier"] if head == "linear" else [])


def candidate_model(cand: Candidate, base: nn.Module, rank: int) -> adapters.PeftModel:
    """``base`` wrapped with LoRA at ``rank`` (alpha per params: scale * r). LoRA-only
    candidates save no module (projector/head are part of the frozen base)."""
    saved = trained_modules(cand.head) if cand.trains == "lora+head" else []
    alpha = params().lora.alpha_for(rank)
    return adapters.wrap_with_lora(base, rank, alpha, list(cand.targets), modules_to_save=saved, exclude_modules=NO_POOLER)


def align_base(base: nn.Module, data: Subset, *, lr: float, epochs: int, seed: int) -> None:
    """The alignment stage (LLaVA's stage 1): only the projector (and a linear head) train,
    centrally, on the public slice; the encoder stays frozen (no LoRA yet)."""
    train_local(base, table(), data, epochs=epochs, batch_size=params().federation.batch_size, lr=lr,
                generator=torch.Generator().manual_seed(seed))


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- units


def _cache_dir() -> Path:
    return Path(os.environ["LORA_VALUE_CACHE"])


def unit_path(unit: dict) -> Path:
    keys = ("phase", "candidate", "arm", "lr", "seed", "align_lr")
    return _cache_dir() / ("_".join(str(unit[k]) for k in keys if k in unit) + ".json")


def align_path(head: str, lr: float, seed: int) -> Path:
    return _cache_dir() / f"align_{head}_{lr}_{seed}.pt"


def aligned_base(cand: Candidate, lr: float, seed: int) -> tuple[nn.Module, float]:
    """The aligned base for ``seed`` and the alignment's training seconds (cached on disk:
    every arm of a seed starts from it)."""
    base = base_model(cand.head, seed)
    path = align_path(cand.head, lr, seed)
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        unexpected = base.load_state_dict(saved["state"], strict=False).unexpected_keys
        assert not unexpected, f"{path}: unexpected keys {unexpected[:3]}"
        return base, saved["seconds"]
    start = time.perf_counter()
    align_base(base, datasets_for(True)["public"], lr=lr, epochs=ALIGN_EPOCHS, seed=seed)
    seconds = time.perf_counter() - start
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save({"state": {k: v for k, v in base.state_dict().items() if not k.startswith("text_model.")}, "seconds": seconds}, tmp)
    tmp.replace(path)
    return base, seconds


def run_unit(unit: dict) -> dict:
    """One training run (or none, for an untrained arm) and its evaluation; cached."""
    path = unit_path(unit)
    if path.is_file():
        return json.loads(path.read_text())
    torch.set_num_threads(1)
    cand = CANDIDATES[unit["candidate"]]
    data = datasets_for(cand.aligned)
    train, score = (data["fit"], data["val"]) if unit["phase"] == "select" else (data["union"], data["test"])
    seed, arm = unit["seed"], unit["arm"]
    start, cpu_start = time.perf_counter(), time.process_time()
    align_seconds = 0.0
    if arm == "align":  # the alignment stage itself, scored on the split of the phase
        model, align_seconds = aligned_base(cand, unit["lr"], seed)
    elif cand.aligned:
        model, align_seconds = aligned_base(cand, unit["align_lr"], seed)
    else:
        model = base_model(cand.head, seed)
    if arm.startswith("r"):
        rank = int(arm[1:])
        torch.manual_seed(seed)  # LoRA's A init
        model = candidate_model(cand, model, rank)
    train_seconds = 0.0
    # frozen + lora+head: LoRA at B = 0 is the identity, so the unwrapped base with its
    # projector/head trainable is exactly "LoRA frozen"
    trains = arm.startswith("r") or (arm == "frozen" and cand.trains == "lora+head")
    if trains:
        t0 = time.perf_counter()
        train_local(model, table(), train, epochs=EPOCHS, batch_size=params().federation.batch_size, lr=unit["lr"],
                    generator=torch.Generator().manual_seed(seed))
        train_seconds = time.perf_counter() - t0
    # trainable parameters of the arm's own training; for "align", the alignment's
    record = {**unit, **evaluate(model, table(), score), "trainable_params": trainable(model) if trains or arm == "align" else 0,
              "train_seconds": round(train_seconds, 1), "align_seconds": round(align_seconds, 1),
              "wall_seconds": round(time.perf_counter() - start, 1),
              "cpu_seconds": round(time.process_time() - cpu_start, 1), "n_train": len(train), "n_score": len(score)}
    path.write_text(json.dumps(record, indent=1))
    return record


def run_units(units: list[dict], jobs: int) -> list[dict]:
    todo = [u for u in units if not unit_path(u).is_file()]
    print(f"{len(units)} units, {len(todo)} to run")
    if jobs > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for rec in pool.map(run_unit, todo):
                _progress(rec)
    else:
        for u in todo:
            _progress(run_unit(u))
    return [run_unit(u) for u in units]


def _progress(rec: dict) -> None:
    print(f"  {rec['phase']:<6} {rec['candidate']:<18} {rec['arm']:<6} lr {rec['lr']:<6g} seed {rec['seed']}  "
          f"acc {rec['accuracy']:.3f}  ({rec['wall_seconds']:.0f} s)", flush=True)


# --------------------------------------------------------------------------- selection


def _records(phase: str) -> list[dict]:
    """Cached records of a phase; for aligned arms, only those from the chosen alignment lr."""
    records = [json.loads(p.read_text()) for p in sorted(_cache_dir().glob(f"{phase}_*.json"))]
    align = {c: best_lr(records, c, "align")[0] for c, cand in CANDIDATES.items() if cand.aligned}
    return [r for r in records if "align_lr" not in r or r["align_lr"] == align[r["candidate"]]]


def best_lr(records: list[dict], candidate: str, arm: str) -> tuple[float | None, dict[float, float]]:
    """The lr with the best validation accuracy (ties: the smaller lr)."""
    scores = {r["lr"]: r["accuracy"] for r in records if r["candidate"] == candidate and r["arm"] == arm}
    if not scores:
        return None, {}
    return min(scores, key=lambda lr: (-scores[lr], lr)), dict(sorted(scores.items()))


def selection(candidate: str) -> dict:
    """Chosen lrs per arm and the best rank, from the select phase's records."""
    records = _records("select")
    cand = CANDIDATES[candidate]
    out: dict = {"arms": {}}
    if cand.aligned:
        lr, scores = best_lr(records, candidate, "align")
        out["align"] = {"lr": lr, "val_accuracy": scores}
    for arm in ["frozen"] + [f"r{r}" for r in RANKS]:
        if arm == "frozen" and cand.trains == "lora":
            continue  # nothing to choose: the model as it is (aligned or seeded init)
        lr, scores = best_lr(records, candidate, arm)
        if lr is not None:
            out["arms"][arm] = {"lr": lr, "val_accuracy": scores}
    ranks = [a for a in out["arms"] if a.startswith("r")]
    if ranks:
        out["best_rank"] = max(ranks, key=lambda a: (out["arms"][a]["val_accuracy"][out["arms"][a]["lr"]], -int(a[1:])))
        out["ranks_swept"] = sorted(int(a[1:]) for a in ranks)
    return out


def select_units(candidate: str, ranks: list[int]) -> list[dict]:
    cand = CANDIDATES[candidate]
    base = {"phase": "select", "candidate": candidate, "seed": 0}
    if cand.aligned:
        base["align_lr"] = selection(candidate)["align"]["lr"]
    arms = [f"r{r}" for r in ranks] + (["frozen"] if cand.trains == "lora+head" else [])
    return [{**base, "arm": arm, "lr": lr} for arm in arms for lr in LR_GRID]


def edge_units(units: list[dict]) -> list[dict]:
    """The next lr beyond the grid for every arm whose best validation lr is the largest
    (smallest) tried: the same rule for every arm, so no arm is held back by the grid."""
    records = _records("select")
    out = []
    for unit in {(u["candidate"], u["arm"]): u for u in units}.values():
        best, scores = best_lr(records, unit["candidate"], unit["arm"])
        if best is None:
            continue
        side = "up" if best == max(scores) else "down" if best == min(scores) else None
        beyond = [lr for lr in LR_BEYOND.get(side, ()) if lr not in scores]
        if beyond:
            out.append({**unit, "lr": beyond[0]})
    return out


def select_arms(units: list[dict], jobs: int) -> None:
    """The grid for every unit's arm, then edge extensions until every best lr is inside."""
    run_units(units, jobs)
    while extra := edge_units(units):
        run_units(extra, jobs)
        units = units + extra


def align_units(candidate: str, phase: str, seeds) -> list[dict]:
    if phase == "select":
        return [{"phase": "select", "candidate": candidate, "arm": "align", "lr": lr, "seed": 0} for lr in LR_GRID]
    lr = selection(candidate)["align"]["lr"]
    return [{"phase": "test", "candidate": candidate, "arm": "align", "lr": lr, "seed": s} for s in seeds]


def test_units(candidate: str, seeds) -> list[dict]:
    cand = CANDIDATES[candidate]
    sel = selection(candidate)
    arms = dict.fromkeys(["r2", "r16", sel["best_rank"]])
    extra = {"align_lr": sel["align"]["lr"]} if cand.aligned else {}
    units = [{"phase": "test", "candidate": candidate, "arm": arm, "lr": sel["arms"][arm]["lr"], "seed": s, **extra}
             for arm in arms for s in seeds]
    if cand.trains == "lora+head":
        units += [{"phase": "test", "candidate": candidate, "arm": "frozen", "lr": sel["arms"]["frozen"]["lr"], "seed": s} for s in seeds]
    elif not cand.aligned:  # the seeded init, untrained
        units += [{"phase": "test", "candidate": candidate, "arm": "frozen", "lr": 0, "seed": s} for s in seeds]
    return units


# --------------------------------------------------------------------------- drift (item 2)


def steps_per_round(n_samples: int, batch_size: int, epochs: int) -> int:
    """Optimiser steps one client takes per round (the library's own batching)."""
    return epochs * len(length_bucketed_batches(torch.zeros(n_samples), batch_size, torch.Generator().manual_seed(0)))


def drift(candidate: str, configs: list[tuple[int, int]], rounds: int) -> dict:
    """Federated FediLoRA (editing on, 0.95) in the candidate's testbed for a few rounds per
    (batch size, local epochs): steps per round, each client's lora_A cosine to its start
    (least similar tensor, as editing selects, and mean over tensors), editing's fire rate."""
    torch.set_num_threads(2)
    cand = CANDIDATES[candidate]
    sel = selection(candidate)
    lr = sel["arms"]["r16"]["lr"]
    df = splits(cand.aligned)
    sizes = sorted({int(n) for n in df[(df.client >= 0) & (df.split == "train")].groupby("client").size()})
    out = {"candidate": candidate, "lr": lr, "rounds": rounds, "client_train_sizes": sizes,
           "steps_table": {f"n{n}_batch{b}_epochs{e}": steps_per_round(n, b, e) for n in sizes for b in (32, 16, 8) for e in (1, 2)},
           "configs": []}
    for batch_size, epochs in configs:
        p = params().model_copy(update={"federation": params().federation.model_copy(
            update={"batch_size": batch_size, "local_epochs": epochs, "lr": lr, "rounds": rounds})})
        base = aligned_base(cand, sel["align"]["lr"], p.seed)[0] if cand.aligned else base_model(cand.head, p.seed)
        torch.manual_seed(p.seed)
        model = candidate_model(cand, base, max(p.clients.client_ranks()))
        fed = Federation(p, table(), df, model=model)
        previous = {"state": fed.initial_global_state()}
        rows: list[dict] = []

        def on_round(result, state, fed=fed, previous=previous, rows=rows):
            for u in result.updates:
                share = fed.share_for(previous["state"], u.client, result.round)
                sims = [cosine(u.state[k], cut_to(share[k], u.state[k], k)) for k in u.state if "lora_A." in k]
                # editing already pulled an edited tensor back: its pre-edit similarity is in the record
                least = u.edits[0].similarity if u.edits else min(sims)
                rows.append({"round": result.round, "client": u.client, "rank": u.rank, "n": u.num_samples,
                             "steps": steps_per_round(u.num_samples, batch_size, epochs),
                             "least_similarity": least, "mean_similarity": float(np.mean(sims)),
                             "edited": bool(u.edits and u.edits[0].edited)})
            rows.append({"round": result.round, "global_accuracy": result.global_metrics["accuracy"]})
            previous["state"] = state

        start = time.perf_counter()
        run(fed, on_round, missing_every_round=False)
        clients = [r for r in rows if "client" in r]
        later = [r for r in clients if r["round"] >= 2]
        out["configs"].append({
            "batch_size": batch_size, "local_epochs": epochs,
            "steps_per_round": sorted({r["steps"] for r in clients}),
            "least_similarity": {"mean": float(np.mean([r["least_similarity"] for r in clients])),
                                 "min": float(np.min([r["least_similarity"] for r in clients])),
                                 "max": float(np.max([r["least_similarity"] for r in clients]))},
            "mean_similarity": float(np.mean([r["mean_similarity"] for r in clients])),
            "edit_fire_rate_from_round_2": float(np.mean([r["edited"] for r in later])) if later else math.nan,
            "global_accuracy": [r["global_accuracy"] for r in rows if "global_accuracy" in r],
            "seconds": round(time.perf_counter() - start, 1),
            "client_rounds": clients,
        })
        c = out["configs"][-1]
        print(f"batch {batch_size:>2} epochs {epochs}: steps {c['steps_per_round']}  least cos mean {c['least_similarity']['mean']:.3f} "
              f"(min {c['least_similarity']['min']:.3f})  mean cos {c['mean_similarity']:.3f}  "
              f"edits fired {c['edit_fire_rate_from_round_2']:.2f}  global acc {[round(a, 3) for a in c['global_accuracy']]}", flush=True)
    return out


# --------------------------------------------------------------------------- summary


def arm_table(recs: list[dict]) -> dict:
    """Per arm: its lr, per-seed accuracies, mean, std, cost."""
    arms: dict = {}
    for arm in sorted({r["arm"] for r in recs}):
        rs = sorted((r for r in recs if r["arm"] == arm), key=lambda r: r["seed"])
        acc = [r["accuracy"] for r in rs]
        arms["frozen" if arm == "align" else arm] = {
            "lr": rs[0]["lr"], "seeds": [r["seed"] for r in rs], "accuracy": acc, "mean": float(np.mean(acc)),
            "std": float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0,
            "macro_f1_mean": float(np.mean([r["macro_f1"] for r in rs])),
            "trainable_params": rs[0]["trainable_params"],
            # wall seconds of the arm's own training (for an aligned (a): the alignment); the
            # machine is shared, so cpu_seconds (whole unit, this process) is the steadier figure
            "train_seconds_mean": float(np.mean([r["align_seconds"] if arm == "align" else r["train_seconds"] for r in rs])),
            "cpu_seconds_mean": float(np.mean([r["cpu_seconds"] for r in rs])),
        }
    return arms


def margins(arms: dict) -> dict:
    """(c) - (a) and (c) - (b) on the means, and (c) - (b) per seed (paired: same seed)."""
    a, b, c = (arms[k] for k in ("frozen", "r2", "r16"))
    paired = [x - y for x, y in zip(c["accuracy"], b["accuracy"]) if c["seeds"] == b["seeds"]]
    return {"c_minus_a": c["mean"] - a["mean"], "c_minus_b": c["mean"] - b["mean"], "c_minus_b_per_seed": paired,
            "meets_target": bool(c["mean"] - a["mean"] >= 0.05 and c["mean"] - b["mean"] >= 0.02)}


def summarise() -> dict:
    test = _records("test")
    out: dict = {
        "setup": {
            "epochs": EPOCHS, "batch_size": params().federation.batch_size, "lr_grid": list(LR_GRID), "seeds": list(SEEDS),
            "val_fraction": VAL_FRACTION, "public_fraction": PUBLIC_FRACTION, "align_epochs": ALIGN_EPOCHS,
            "class_scale": CLASS_SCALE, "lora_alpha": "scale * r (scale %g)" % params().lora.scale,
            "modalities": "both present in training and test", "torch_threads": 1,
            "data": {name: {k: len(v) for k, v in datasets_for(pub).items()} for name, pub in (("default_splits", False), ("public_slice_splits", True))},
            "lr_beyond": LR_BEYOND,
            "selection_rule": "per arm, the lr of LR_GRID with the best validation accuracy (seed 0; ties: smaller lr), "
                              "the grid extended by LR_BEYOND while the best is at an edge; "
                              "best rank: the rank with the best validation accuracy at its chosen lr",
        },
        "candidates": {},
    }
    for name, cand in CANDIDATES.items():
        recs = [r for r in test if r["candidate"] == name]
        if not recs:
            continue
        sel = selection(name)
        arms = arm_table([r for r in recs if r["seed"] in SEEDS])
        entry = {"description": cand.description, "head": cand.head, "trains": cand.trains, "targets": list(cand.targets),
                 "aligned": cand.aligned, "selection": sel, "test": arms}
        if "frozen" in arms and "r2" in arms and "r16" in arms:
            entry["margins"] = {**margins(arms), "d_arm": sel.get("best_rank"), "d_mean": arms.get(sel.get("best_rank"), {}).get("mean")}
        if any(r["seed"] not in SEEDS for r in recs):  # extra seeds run on request (--seeds)
            more = arm_table(recs)
            entry["all_seeds"] = {"test": more, "margins": margins(more) if {"frozen", "r2", "r16"} <= set(more) else None}
        out["candidates"][name] = entry
    return out


def print_table(summary: dict) -> None:
    print(f"\n{'candidate':<18} {'arm':<7} {'lr':>7} {'mean':>6}  per seed")
    for name, entry in summary["candidates"].items():
        for arm, r in entry["test"].items():
            print(f"{name:<18} {arm:<7} {r['lr']:>7g} {r['mean']:>6.3f}  {' '.join(f'{x:.3f}' for x in r['accuracy'])}")
        m = entry.get("margins")
        if m:
            print(f"{'':<18} (c)-(b) per seed {' '.join(f'{x:+.3f}' for x in m['c_minus_b_per_seed'])}")
            print(f"{'':<18} (c)-(a) {m['c_minus_a']:+.3f}  (c)-(b) {m['c_minus_b']:+.3f}  (d) = {m['d_arm']}  "
                  f"{'MEETS' if m['meets_target'] else 'misses'} the target")
        more = entry.get("all_seeds")
        if more and more["margins"]:
            m = more["margins"]
            seeds = more["test"]["r16"]["seeds"]
            print(f"{'':<18} seeds {seeds}: " + "  ".join(f"{k} {r['mean']:.3f}" for k, r in more["test"].items())
                  + f"  (c)-(a) {m['c_minus_a']:+.3f}  (c)-(b) {m['c_minus_b']:+.3f}  per seed "
                  + " ".join(f"{x:+.3f}" for x in m["c_minus_b_per_seed"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("phase", choices=["select", "test", "drift", "summary"])
    ap.add_argument("--candidates", nargs="+", default=list(MEASURED), choices=list(CANDIDATES))
    ap.add_argument("--ranks", nargs="+", type=int, default=[2, 16], help="select: LoRA ranks to sweep")
    ap.add_argument("--candidate", help="drift: the testbed")
    ap.add_argument("--configs", nargs="+", default=["32x1", "16x1", "8x1", "16x2", "8x2"], help="drift: BATCHxEPOCHS")
    ap.add_argument("--rounds", type=int, default=4, help="drift: rounds")
    ap.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="test: seeds (extra ones are reported apart)")
    ap.add_argument("--arms", nargs="+", help="test: only these arms (e.g. frozen r2 r16)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--cache", default="data/lora_value_runs")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    os.environ["LORA_VALUE_CACHE"] = args.cache  # read by the worker processes too
    _cache_dir().mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    if args.phase == "select":
        for name in args.candidates:
            if CANDIDATES[name].aligned:  # the alignment lr first: every arm starts from it
                select_arms(align_units(name, "select", [0]), args.jobs)
        select_arms([u for name in args.candidates for u in select_units(name, args.ranks)], args.jobs)
    elif args.phase == "test":
        aligned = [u for n in args.candidates if CANDIDATES[n].aligned for u in align_units(n, "test", args.seeds)]
        run_units(aligned, args.jobs)  # the aligned models (and arm (a)) of each seed first
        units = [u for name in args.candidates for u in test_units(name, args.seeds)]
        run_units([u for u in units if not args.arms or u["arm"] in args.arms], args.jobs)
    summary = summarise()
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    if args.phase == "drift":
        configs = [tuple(int(x) for x in c.split("x")) for c in args.configs]
        previous.setdefault("drift", {})[args.candidate] = drift(args.candidate, configs, args.rounds)
    summary["drift"] = previous.get("drift", {})
    write_json(Path(args.out), summary)
    print_table(summary)


if __name__ == "__main__":
    main()
