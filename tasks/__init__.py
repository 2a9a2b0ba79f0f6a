"""Thin Prefect tasks over the fedilora library: retries and caching live here, math does not."""

from tasks.federated import aggregate_updates, evaluate_global, train_client

__all__ = ["aggregate_updates", "evaluate_global", "train_client"]
