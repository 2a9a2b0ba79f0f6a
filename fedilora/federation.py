"""The federated round's steps as plain functions of a shared runtime (no orchestration here).

``Federation`` holds what is real state: the one base model with its adapter slots, the
feature table and the client splits. Each step (``client_update``, ``aggregate``,
``evaluate_global``) is called by the Prefect tasks or by ``run`` below; client adapters
travel between steps as small ``{name: tensor}`` dicts, never as model copies.

Client updates share the one model, so they hold a lock: on a 2-core machine torch already
uses both cores inside one update, and correctness needs the adapter swap to be atomic.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from fedilora import aggregation, devices
from fedilora import metrics as task_metrics
from fedilora.config import Params
from fedilora.editing import EditRecord, edit_adapter
from fedilora.inputs import FeatureTable
from fedilora.models import adapters
from fedilora.models.encoders import load_text_model
from fedilora.models.multimodal import MultimodalClassifier
from fedilora.training import Subset, evaluate, train_local

State = dict[str, torch.Tensor]
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


def derive_seed(*parts: int) -> int:
    """A stable 63-bit seed from the run seed and step coordinates (round, client)."""
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def subsets_from_splits(splits: pd.DataFrame) -> tuple[dict[int, Subset], dict[int, Subset], Subset]:
    """(train per client, test per client, global test) from the split table."""

    def subset(df: pd.DataFrame) -> Subset:
        return Subset(
            torch.tensor(df["row"].to_numpy(), dtype=torch.long),
            torch.tensor(df["has_image"].to_numpy(), dtype=torch.bool),
            torch.tensor(df["has_text"].to_numpy(), dtype=torch.bool),
        )

    clients = sorted(c for c in splits["client"].unique() if c >= 0)
    train = {int(c): subset(splits[(splits.client == c) & (splits.split == "train")]) for c in clients}
    test = {int(c): subset(splits[(splits.client == c) & (splits.split == "test")]) for c in clients}
    return train, test, subset(splits[splits.client == -1])


def _base_model(params: Params, image_dim: int, num_classes: int) -> tuple[torch.nn.Module, dict]:
    """The unwrapped base model and where its LoRA goes (``wrap_with_lora`` keyword arguments)."""
    if params.model.name_or_path:  # a Hugging Face family (fedilora.models.hf); image_dim unused
        from fedilora.models import hf

        base, spec = hf.build(params.model, num_classes, params.seed, params.runtime)
        return base, {"target_modules": spec.target_modules, "modules_to_save": spec.modules_to_save,
                      "exclude_modules": spec.exclude_modules}
    text_model = load_text_model(params.model.name, params.seed)
    torch.manual_seed(params.seed)  # the projector and head start the same in every process
    base = MultimodalClassifier(text_model, image_dim, num_classes, params.model.num_image_tokens)
    return base, {"target_modules": params.model.target_modules}


def build_model(params: Params, image_dim: int, num_classes: int) -> adapters.PeftModel:
    """The base model wrapped with PEFT; its first slot is the initial global adapter (r_max)."""
    base, lora = _base_model(params, image_dim, num_classes)
    r_max = max(params.clients.client_ranks())
    model = adapters.wrap_with_lora(base, r_max, params.lora.alpha_for(r_max), dropout=params.lora.dropout, **lora)
    return devices.place(model, params.runtime)  # runtime.device, dtype policy, checkpointing


def load_adapter_model(params: Params, adapter_dir, image_dim: int, num_classes: int):
    """A logged adapter (PEFT format) on a freshly built base model, ready for inference."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(_base_model(params, image_dim, num_classes)[0], str(adapter_dir))
    return devices.place(model, params.runtime).eval()


class Federation:
    def __init__(self, params: Params, table: FeatureTable, splits: pd.DataFrame, model=None):
        self.params = params
        self.table = table
        self.train_sets, self.test_sets, self.global_test = subsets_from_splits(splits)
        self.ranks = params.clients.client_ranks()
        if len(self.train_sets) != len(self.ranks):
            raise ValueError(
                f"splits hold {len(self.train_sets)} clients but clients.num_clients={len(self.ranks)}; "
                "rerun `fedilora split`"
            )
        self.strategy = aggregation.STRATEGIES[params.aggregation.method]
        num_classes = task_metrics.num_classes(table.labels)
        self.model = model if model is not None else build_model(params, table.image_features.shape[1], num_classes)
        if not hasattr(self.model, "foundation_weights"):  # taken once, before any run changes them
            self.model.foundation_weights = {
                k: w.detach().clone() for k, w in adapters.target_base_weights(self.model).items()
            }
            first_slot = next(iter(self.model.peft_config))
            self.model.initial_trained = {
                k: v for k, v in adapters.get_state(self.model, first_slot).items() if "lora_" not in k
            }
        self._lock = threading.RLock()

    # ---- state helpers -------------------------------------------------------------------
    def scaling(self, rank: int) -> float:
        return self.params.lora.alpha_for(rank) / rank

    def _slot(self, rank: int, alpha: float) -> str:
        return adapters.ensure_slot(self.model, rank, alpha, self.params.lora.dropout)

    def initial_global_state(self) -> State:
        """A seeded fresh adapter at the largest client rank (B = 0, so the model starts as the base)."""
        with self._lock:
            self.reset_base()
            r_max = max(self.ranks)
            return self.fresh_state(r_max, derive_seed(self.params.seed, 0), template=self.model.initial_trained)

    def fresh_state(self, rank: int, seed: int, template: State) -> State:
        """PEFT's default LoRA init (A Kaiming-uniform, B zero) at ``rank``, seeded; trained
        non-LoRA parameters (projector, head) are copied from ``template``."""
        slot = self._slot(rank, self.params.lora.alpha_for(rank))
        state = adapters.get_state(self.model, slot)
        gen = torch.Generator().manual_seed(seed)
        for key, tensor in state.items():
            if "lora_A." in key:
                bound = 1.0 / math.sqrt(tensor.shape[1])
                state[key] = (torch.rand(tensor.shape, generator=gen) * 2 - 1) * bound
            elif "lora_B." in key:
                state[key] = torch.zeros_like(tensor)
            else:
                state[key] = template[key].clone()
        return state

    def reset_base(self) -> None:
        """Undo merges into the base weights (FLoRA) so a new run starts from the foundation model."""
        self.set_base_weights(self.model.foundation_weights)

    def base_weights(self) -> State:
        """The adapted layers' base weights as they are now (FLoRA merges into them)."""
        return {k: w.detach().to("cpu", copy=True) for k, w in adapters.target_base_weights(self.model).items()}

    def set_base_weights(self, weights: State) -> None:
        with self._lock:
            for key, weight in adapters.target_base_weights(self.model).items():
                weight.data.copy_(weights[key])

    def share_for(self, global_state: State, client: int, round_idx: int) -> State:
        """What a client starts local training from this round."""
        rank = self.ranks[client]
        if self.strategy.fresh_clients and round_idx > 1:
            return self.fresh_state(rank, derive_seed(self.params.seed, round_idx, client), template=global_state)
        if self.strategy.fresh_clients:  # round 1: the global state is still an ordinary adapter
            return aggregation.client_share(global_state, rank)
        return aggregation.client_share(global_state, rank, scaling=self.scaling(rank), merged=self.strategy.merged)

    # ---- the round's steps -----------------------------------------------------------------
    def sample_clients(self, round_idx: int) -> list[int]:
        k = len(self.ranks)
        m = max(1, round(self.params.federation.sample_fraction * k))
        rng = np.random.default_rng(derive_seed(self.params.seed, round_idx, 7919))
        return sorted(int(c) for c in rng.choice(k, size=m, replace=False))

    def client_update(self, client: int, global_state: State, round_idx: int) -> ClientUpdate:
        """Local training from the global share, then FediLoRA's editing, then personal evaluation."""
        p = self.params
        rank = self.ranks[client]
        seed = derive_seed(p.seed, round_idx, client, 1)
        with self._lock:  # slots may be created (fresh_state) and are swapped: one client at a time
            share = self.share_for(global_state, client, round_idx)
            slot = self._slot(rank, p.lora.alpha_for(rank))
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
            )
            state = adapters.get_state(self.model, slot)
            edits: list[EditRecord] = []
            if self.editing_applies(round_idx):
                state, edits = edit_adapter(
                    state,
                    share,
                    factors=p.editing.factors,
                    num_layers=p.editing.num_layers,
                    min_similarity=p.editing.min_similarity,
                    mode=p.editing.mode,
                )
                adapters.load_state(self.model, slot, state)
            metrics = evaluate(self.model, self.table, self.test_sets[client], fill=p.missing.fill)
        return ClientUpdate(client, rank, len(self.train_sets[client]), state, loss, metrics, edits)

    def editing_applies(self, round_idx: int) -> bool:
        """Editing compares with the previous global adapter, which exists from round 2 on and
        only for methods whose clients continue from a share of it (not FLoRA's fresh starts)."""
        return self.params.editing.enabled and round_idx >= 2 and not self.strategy.fresh_clients

    def aggregate(self, updates: list[ClientUpdate], previous: State) -> State:
        """The new global state from this round's updates; ``previous`` fills the rank
        dimensions that no sampled client owns."""
        if not updates:
            raise ValueError("no client update to aggregate")
        ranks = [u.rank for u in updates]
        method = self.params.aggregation.method
        # FlexLoRA's SVD must keep enough components for the largest client rank
        options = {"rank": max(sum(ranks), max(self.ranks))} if method == "flexlora" else {}
        state = aggregation.aggregate(
            method,
            [u.state for u in updates],
            ranks,
            [u.num_samples for u in updates],
            scalings=[self.scaling(r) for r in ranks],
            **options,
        )
        if self.strategy.fresh_clients:
            return self._merge_into_base(state)
        if not self.strategy.merged:
            state = aggregation.keep_unowned(state, previous)
        return state

    def _merge_into_base(self, stacked: State) -> State:
        """FLoRA: fold B @ A (client scalings already inside A) into the base weights; the global
        adapter that remains is a fresh one carrying only the averaged trained modules."""
        with self._lock:
            weights = adapters.target_base_weights(self.model)
            for key, weight in weights.items():
                delta = stacked[key.replace("lora_A.", "lora_B.")] @ stacked[key]
                weight.data += delta.to(weight)  # the weight's device and dtype
            r_max = max(self.ranks)
            return self.fresh_state(r_max, derive_seed(self.params.seed, 0), template=stacked)

    def global_slot(self, state: State) -> str:
        """The slot that holds a global state: merged states (FlexLoRA) carry their scaling
        inside the factors, so their slot has scaling 1 (alpha = rank)."""
        merged = self.strategy.merged and not self.strategy.fresh_clients
        return self._state_slot(state, merged)

    def _state_slot(self, state: State, merged: bool) -> str:
        rank = aggregation.global_rank(state)
        return self._slot(rank, float(rank) if merged else self.params.lora.alpha_for(rank))

    def save_adapter(self, state: State, directory, *, is_global: bool) -> None:
        """Write a state in PEFT's format (``PeftModel.from_pretrained`` loads it)."""
        with self._lock:
            slot = self.global_slot(state) if is_global else self._state_slot(state, merged=False)
            adapters.load_state(self.model, slot, state)
            adapters.save_adapter(self.model, slot, directory)

    def evaluate_global(self, state: State, patterns: tuple[str, ...] = PATTERNS) -> dict[str, float]:
        """The aggregated model on the global test split: all modalities, then each of
        ``patterns`` absent."""
        fill = self.params.missing.fill
        with self._lock:
            slot = self.global_slot(state)
            adapters.load_state(self.model, slot, state)
            adapters.activate(self.model, slot)
            metrics = evaluate(self.model, self.table, self.global_test, fill=fill)
            for pattern in patterns:
                for name, value in evaluate(self.model, self.table, self.global_test.drop(pattern), fill=fill).items():
                    metrics[f"missing_{pattern}/{name}"] = value
        return metrics


@dataclass
class RoundResult:
    round: int
    clients: list[int]
    global_metrics: dict[str, float]
    updates: list[ClientUpdate]

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
        out["edits"] = float(sum(e.edited for u in self.updates for e in u.edits))
        out["clients/sampled"] = float(len(self.clients))
        out["clients/succeeded"] = float(len(self.updates))
        out["clients/failed"] = float(len(self.clients) - len(self.updates))
        return out


def run(
    fed: Federation,
    on_round: Callable[[RoundResult, State], None] | None = None,
    *,
    missing_every_round: bool = True,
) -> tuple[State, list[RoundResult]]:
    """All rounds in-process, sequentially: the reference the orchestrated flow must match.
    ``missing_every_round=False`` evaluates the missing-modality patterns after the last round
    only (each costs as much as the full evaluation; per-round curves need only the latter)."""
    global_state = fed.initial_global_state()
    results = []
    rounds = fed.params.federation.rounds
    for round_idx in range(1, rounds + 1):
        clients = fed.sample_clients(round_idx)
        updates = [fed.client_update(c, global_state, round_idx) for c in clients]
        global_state = fed.aggregate(updates, global_state)
        patterns = PATTERNS if missing_every_round or round_idx == rounds else ()
        result = RoundResult(round_idx, clients, fed.evaluate_global(global_state, patterns), updates)
        results.append(result)
        if on_round is not None:
            on_round(result, global_state)
    return global_state, results
