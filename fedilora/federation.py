"""The federated round's steps as plain functions of a shared runtime, and the one round loop that
the Prefect flow, the quality study and the in-process reference all run (no orchestration here).

``Federation`` holds what is real state: the one base model with its adapter slots, the feature
table and the client splits, and the run's aggregation method (``fedilora.methods``), whose hooks
decide what a client receives, how updates combine and what the server keeps. Client adapters
travel between steps as small ``{name: tensor}`` dicts, never as model copies.

Client updates share the one model, so they hold its lock: on a 2-core machine torch already
uses both cores inside one update, and correctness needs the adapter swap to be atomic (also
between runs that share the model in one process, as compare's and the study's units do).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedilora import aggregation, alignment, diagnostics, lora, methods, variants
from fedilora import metrics as task_metrics
from fedilora.config import Params
from fedilora.editing import EditRecord, edit_adapter
from fedilora.inputs import FeatureTable
from fedilora.lora import State
from fedilora.models import adapters
from fedilora.models.families import family_of
from fedilora.models.shared import ModelSpec, SharedModel, build
from fedilora.seeds import derive_seed
from fedilora.training import Subset, evaluate, subset, train_local

PATTERNS = ("image", "text")  # global evaluation also runs with each modality absent


@dataclass
class ClientUpdate:
    client: int
    rank: int
    num_samples: int
    state: State
    loss: float
    metrics: dict[str, float]  # personalized: the client's own (edited) model on its test split
    edits: list[EditRecord] = field(default_factory=list)


def subsets_from_splits(splits: pd.DataFrame) -> tuple[dict[int, Subset], dict[int, Subset], Subset]:
    """(train per client, test per client, global test) from the split table."""
    clients = sorted(c for c in splits["client"].unique() if c >= 0)
    train = {int(c): subset(splits[(splits.client == c) & (splits.split == "train")]) for c in clients}
    test = {int(c): subset(splits[(splits.client == c) & (splits.split == "test")]) for c in clients}
    return train, test, subset(splits[splits.client == -1])


def method_setup(params: Params) -> methods.Setup:
    return methods.Setup(params.seed, tuple(params.clients.client_ranks()), params.lora.alpha_for,
                         params.federation.server_lr, quantized=params.runtime.quantization != "none")


def check_methods(params: Params) -> None:
    """The configured method and every compared variant exist and accept their options and the
    clients' ranks; errors name the param. Called before a run starts, so a bad variant does not
    surface after the others ran."""
    runs = [("aggregation", params.aggregation)]
    runs += [(f"compare.variants: {v}: aggregation", variants.resolve(params, v).aggregation) for v in params.compare.variants]
    for where, aggregation in runs:
        try:
            options = methods.options_for(aggregation.method, aggregation.options)
        except ValueError as err:
            field = "options" if aggregation.method in methods.REGISTRY else "method"
            raise ValueError(f"{where}.{field}: {err}") from None
        try:
            methods.method_class(aggregation.method)(method_setup(params), options)
        except ValueError as err:
            raise ValueError(f"{where}.method: {err}") from None


def model_spec(params: Params, table: FeatureTable, aligned: Path | None = None) -> ModelSpec:
    """The base model a run of ``params`` builds on ``table``; ``aligned``: the alignment
    stage's trained modules to load into it (``aligned_path``)."""
    return ModelSpec.of(params, table.image_features.shape[1], task_metrics.num_classes(table.labels), aligned)


def aligned_path(params: Params) -> Path | None:
    """The alignment stage's file when ``align.enabled`` (checked to fit these params), else None."""
    return alignment.checked(params) if params.align.enabled else None


class Federation:
    def __init__(self, params: Params, table: FeatureTable, splits: pd.DataFrame, model: SharedModel | None = None):
        self.params = params
        self.table = table
        self.train_sets, self.test_sets, self.global_test = subsets_from_splits(splits)
        self.ranks = params.clients.client_ranks()
        if len(self.train_sets) != len(self.ranks):
            raise ValueError(
                f"splits hold {len(self.train_sets)} clients but clients.num_clients={len(self.ranks)}; "
                "rerun `fedilora split`"
            )
        self.strategy = methods.strategy(params.aggregation.method, method_setup(params), params.aggregation.options)
        self.shared = model if model is not None else build(model_spec(params, table, aligned_path(params)))
        self.model = self.shared.peft
        self.make_batch = family_of(params.model).make_batch
        self._lock = self.shared.lock  # every run on this model, in any thread, takes turns

    # ---- slots and base weights --------------------------------------------------------------
    def _slot(self, rank: int, alpha: float) -> str:
        return adapters.ensure_slot(self.model, rank, alpha, self.params.lora.dropout)

    def _client_slot(self, rank: int) -> str:
        return self._slot(rank, self.params.lora.alpha_for(rank))

    def _global_slot(self, state: State) -> str:
        rank = lora.rank_of(state)
        return self._slot(rank, self.strategy.global_alpha(rank))

    def initial_global_state(self) -> State:
        """Round 1's global adapter (the method's; by default a seeded fresh one at the largest
        client rank); the base weights are restored to the foundation model's first."""
        with self._lock:
            self.set_base_weights(None)
            return self.strategy.initial(self.shared.initial)

    def base_weights(self) -> State | None:
        """The adapted layers' base weights if a method changed them (FLoRA merges into them),
        else None: what a worker in another process needs to train on the same base."""
        with self._lock:
            if not self.shared.base_changed:
                return None
            return {k: w.detach().to("cpu", copy=True) for k, w in adapters.target_base_weights(self.model).items()}

    def set_base_weights(self, weights: State | None) -> None:
        """Set the adapted layers' base weights; None restores the foundation model's."""
        with self._lock:
            if weights is None and not self.shared.base_changed:
                return
            source = self.shared.foundation if weights is None else weights
            for key, weight in adapters.target_base_weights(self.model).items():
                weight.data.copy_(source[key])
            self.shared.base_changed = weights is not None

    def _merge_into_base(self, delta: State) -> None:
        with self._lock:
            for key, weight in adapters.target_base_weights(self.model).items():
                weight.data += delta[key].to(weight)  # the weight's device and dtype
            self.shared.base_changed = True

    # ---- the round's steps -----------------------------------------------------------------
    def sample_clients(self, round_idx: int) -> list[int]:
        k = len(self.ranks)
        m = max(1, round(self.params.federation.sample_fraction * k))
        rng = np.random.default_rng(derive_seed(self.params.seed, round_idx, 7919))
        return sorted(int(c) for c in rng.choice(k, size=m, replace=False))

    def client_update(self, client: int, global_state: State, round_idx: int, base_weights: State | None = None) -> ClientUpdate:
        """Local training from the method's share of the global adapter, then layer-wise editing
        (where enabled and the method allows it), then personalized evaluation. ``base_weights``:
        the server's base weights as :meth:`base_weights` gives them (None: the foundation's), so
        a worker process whose model served another run trains on the server's base."""
        p = self.params
        rank = self.ranks[client]
        seed = derive_seed(p.seed, round_idx, client, 1)
        with self._lock:  # slots may be created and are swapped: one client at a time
            self.set_base_weights(base_weights)
            share = self.strategy.share(global_state, client, round_idx)
            slot = self._client_slot(rank)
            adapters.load_state(self.model, slot, share)
            adapters.activate(self.model, slot)
            torch.manual_seed(seed)  # dropout
            loss = train_local(
                self.model,
                self.table,
                self.train_sets[client],
                epochs=p.federation.local_epochs,
                batch_size=p.federation.batch_size,
                lr=p.federation.lr,
                weight_decay=p.federation.weight_decay,
                fill=p.missing.fill,
                generator=torch.Generator().manual_seed(seed),
                make_batch=self.make_batch,
                runtime=p.runtime,
                steps=p.federation.local_steps,
            )
            state = adapters.get_state(self.model, slot)
            edits: list[EditRecord] = []
            if p.editing.enabled and self.strategy.editable(round_idx):
                state, edits = edit_adapter(
                    state,
                    share,
                    factors=p.editing.factors,
                    num_layers=p.editing.num_layers,
                    min_similarity=p.editing.min_similarity,
                    mode=p.editing.mode,
                )
                adapters.load_state(self.model, slot, state)
            metrics = self._evaluate(self.test_sets[client])
        return ClientUpdate(client, rank, len(self.train_sets[client]), state, loss, metrics, edits)

    def aggregate(self, updates: Sequence[ClientUpdate], previous: State) -> State:
        """The new global adapter from this round's updates (the method's rule); a method that
        folds its update into the base weights does so here."""
        if not updates:
            raise ValueError("no client update to aggregate")
        step = self.strategy.aggregate([u.state for u in updates], [u.rank for u in updates],
                                       [u.num_samples for u in updates], previous)
        if step.base_delta is not None:
            self._merge_into_base(step.base_delta)
        return step.state

    def diagnose(self, updates: Sequence[ClientUpdate], previous: State, new: State) -> dict:
        """Per-rank-dimension diagnostics of this round's aggregation (``fedilora.diagnostics``)."""
        states, ranks = [u.state for u in updates], [u.rank for u in updates]
        p = aggregation.sample_weights([u.num_samples for u in updates])
        weights = self.strategy.dimension_weights(states, ranks, p)
        return diagnostics.rank_dimensions(previous, new, states, ranks, [u.client for u in updates], weights,
                                           self.params.federation.server_lr)

    def save_adapter(self, state: State, directory, *, is_global: bool) -> None:
        """Write a state in PEFT's format (``PeftModel.from_pretrained`` loads it)."""
        with self._lock:
            slot = self._global_slot(state) if is_global else self._client_slot(lora.rank_of(state))
            adapters.load_state(self.model, slot, state)
            adapters.save_adapter(self.model, slot, directory)

    def evaluate_global(self, state: State, patterns: tuple[str, ...] = PATTERNS) -> dict[str, float]:
        """The aggregated model on the global test split: all modalities, then each of
        ``patterns`` absent."""
        with self._lock:
            slot = self._global_slot(state)
            adapters.load_state(self.model, slot, state)
            adapters.activate(self.model, slot)
            metrics = self._evaluate(self.global_test)
            for pattern in patterns:
                for name, value in self._evaluate(self.global_test.drop(pattern)).items():
                    metrics[f"missing_{pattern}/{name}"] = value
        return metrics

    def _evaluate(self, data: Subset) -> dict[str, float]:
        """The active adapter on ``data``."""
        p = self.params
        return evaluate(self.model, self.table, data, fill=p.missing.fill, make_batch=self.make_batch, runtime=p.runtime)


@dataclass
class RoundResult:
    round: int
    clients: list[int]
    global_metrics: dict[str, float]
    updates: list[ClientUpdate]
    diagnostics: dict = field(default_factory=dict)  # fedilora.diagnostics.rank_dimensions

    def summary(self) -> dict[str, float]:
        """Flat metric names as logged (``global/accuracy``, ``client/3/accuracy``, ...)."""
        out = {f"global/{k}": v for k, v in self.global_metrics.items()}
        keys = dict.fromkeys(k for u in self.updates for k in u.metrics) or {"accuracy": None, "macro_f1": None}
        for key in keys:  # the task's metrics (fedilora.metrics), accuracy always among them
            values = [u.metrics[key] for u in self.updates if not math.isnan(u.metrics.get(key, float("nan")))]
            out[f"personalized/{key}"] = float(np.mean(values)) if values else float("nan")
        for u in self.updates:
            out[f"client/{u.client}/accuracy"] = u.metrics["accuracy"]
            out[f"client/{u.client}/loss"] = u.loss
        edits = [e for u in self.updates for e in u.edits]
        out["edits"] = float(sum(e.edited for e in edits))
        if edits:  # editing ran: how often it fired, and how close the clients stayed to the global
            out["editing/fired_fraction"] = float(np.mean([any(e.edited for e in u.edits) for u in self.updates if u.edits]))
            out["editing/mean_similarity"] = float(np.mean([e.similarity for e in edits]))
        out.update({f"diag/{k}": v for k, v in self.diagnostics.get("summary", {}).items()})
        out["clients/sampled"] = float(len(self.clients))
        out["clients/succeeded"] = float(len(self.updates))
        out["clients/failed"] = float(len(self.clients) - len(self.updates))
        return out


# ---- the round loop ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Steps:
    """How a round's steps run. The in-process reference (:func:`in_process_steps`) calls the
    Federation directly; the Prefect flow maps client tasks and wraps the others in tasks."""

    train: Callable[[list[int], State, int], list[ClientUpdate]]  # (clients, global state, round)
    aggregate: Callable[[list[ClientUpdate], State], State]
    evaluate: Callable[[State, tuple[str, ...]], dict[str, float]]


def in_process_steps(fed: Federation) -> Steps:
    def train(clients: list[int], state: State, round_idx: int) -> list[ClientUpdate]:
        base = fed.base_weights()
        return [fed.client_update(c, state, round_idx, base) for c in clients]

    return Steps(train=train, aggregate=fed.aggregate, evaluate=fed.evaluate_global)


def run(
    fed: Federation,
    steps: Steps | None = None,
    *,
    on_round: Callable[[list[RoundResult], State], None] | None = None,
    resume: tuple[State, list[RoundResult]] | None = None,
    missing_every_round: bool = True,
) -> tuple[State, list[RoundResult]]:
    """Every round of a run: sample, train the sampled clients, aggregate, evaluate, report.

    ``steps`` default to the in-process reference; ``on_round(results, state)`` runs after each
    round with the results so far (logging, checkpoints); ``resume`` is (global state, results so far) of a run that
    stopped after ``len(results)`` rounds. ``missing_every_round=False`` evaluates the
    missing-modality patterns after the last round only (each costs as much as the full
    evaluation; per-round curves need only the latter)."""
    steps = steps or in_process_steps(fed)
    state, results = (resume[0], list(resume[1])) if resume else (fed.initial_global_state(), [])
    rounds = fed.params.federation.rounds
    for round_idx in range(len(results) + 1, rounds + 1):
        clients = fed.sample_clients(round_idx)
        updates = steps.train(clients, state, round_idx)
        previous, state = state, steps.aggregate(updates, state)
        patterns = PATTERNS if missing_every_round or round_idx == rounds else ()
        result = RoundResult(round_idx, clients, steps.evaluate(state, patterns), updates,
                             fed.diagnose(updates, previous, state))
        results.append(result)
        if on_round is not None:
            on_round(results, state)
    return state, results
