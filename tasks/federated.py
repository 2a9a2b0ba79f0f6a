"""The round's tasks. Inputs are hashed by nobody (``NONE`` cache policy): adapter states are
tensors that change every round, so caching them would cost time and buy nothing."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE
from prefect.runtime import task_run

from fedilora.config import Params
from fedilora.federation import ClientUpdate
from fedilora.lora import State
from fedilora.seeds import derive_seed
from tasks.runtime import federation


class InjectedFault(RuntimeError):
    """A failure raised on purpose by ``faults.client_failure_rate``."""


def inject_fault(params: Params, client: int, round_idx: int, attempt: int) -> None:
    rate = params.faults.client_failure_rate
    if rate > 0 and derive_seed(params.seed, round_idx, client, attempt, 404) / 2**63 < rate:
        raise InjectedFault(f"injected failure: client {client}, round {round_idx}, attempt {attempt}")


@task(name="train_client", cache_policy=NONE, retries=2, retry_delay_seconds=0)
def train_client(
    params: Params, client: int, global_state: State, round_idx: int, base_weights: State | None = None
) -> ClientUpdate:
    """Local training, editing and the client's personalized evaluation.

    ``base_weights`` are the server's adapted-layer weights when its method changed them (None:
    the foundation model's), so a worker in another process trains on the same base."""
    inject_fault(params, client, round_idx, task_run.run_count or 1)
    return federation(params).client_update(client, global_state, round_idx, base_weights)


@task(name="aggregate", cache_policy=NONE)
def aggregate_updates(params: Params, updates: list[ClientUpdate], previous: State) -> State:
    return federation(params).aggregate(updates, previous)


@task(name="evaluate_global", cache_policy=NONE)
def evaluate_global(params: Params, state: State, patterns: tuple[str, ...]) -> dict[str, float]:
    return federation(params).evaluate_global(state, patterns)
