"""The ``federated_training`` flow: the one round loop (``fedilora.federation.run``) with Prefect
steps: per round, map ``train_client`` over the sampled clients, reduce with ``aggregate``,
evaluate, log everything to MLflow and checkpoint.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from prefect import flow, unmapped
from tqdm.auto import tqdm

from fedilora import checkpoint, outputs, plots, tracking
from fedilora.atomic import write_json
from fedilora.config import Params, load_params
from fedilora.federation import ClientUpdate, Federation, RoundResult, Steps, check_methods, run
from fedilora.lora import State
from fedilora.paths import DataPaths
from fedilora.prepared import check_prepared
from tasks import aggregate_updates, evaluate_global, train_client
from tasks.runtime import federation

log = logging.getLogger("fedilora")


def _edits_record(result: RoundResult) -> dict:
    return {
        str(u.client): [{"key": e.key, "similarity": e.similarity, "edited": e.edited} for e in u.edits]
        for u in result.updates
    }


def flow_steps(params: Params, fed: Federation) -> Steps:
    """The round's steps as Prefect tasks: ``train_client`` mapped over the sampled clients (a
    client that still fails after its retries is dropped; the round goes on if
    ``federation.min_clients`` succeeded), ``aggregate`` and ``evaluate_global``."""
    trainer = train_client.with_options(retries=params.runner.retries)

    def train(clients: list[int], state: State, round_idx: int) -> list[ClientUpdate]:
        futures = trainer.map(unmapped(params), clients, unmapped(state), unmapped(round_idx), unmapped(fed.base_weights()))
        updates, failed = [], []
        for client, future in zip(clients, futures):
            try:
                updates.append(future.result())
            except Exception as err:  # the task's own error, after its retries
                failed.append(client)
                log.warning("round %d: client %d dropped (%s)", round_idx, client, err)
        if len(updates) < params.federation.min_clients:
            raise RuntimeError(
                f"round {round_idx}: only {len(updates)} of {len(clients)} sampled clients succeeded "
                f"(failed: {failed}); federation.min_clients={params.federation.min_clients}"
            )
        return updates

    return Steps(
        train=train,
        aggregate=lambda updates, state: aggregate_updates(params, updates, state),
        evaluate=lambda state, patterns: evaluate_global(params, state, patterns),
    )


def run_rounds(params: Params, out_dir: Path, variant: str) -> dict[str, float]:
    """One run inside an MLflow run: resume from the checkpoint if there is one, the rounds
    (``federation.run`` with Prefect steps), then the DVC outputs in ``out_dir``.

    After every round the global state, the personalized states and the results so far are
    checkpointed; rerunning the same command resumes after the last finished round, in the
    same MLflow run, with the same final results (every random choice is seeded per round).
    """
    out_dir = Path(out_dir)
    fed = federation(params)
    ckpt_dir = out_dir / "checkpoint"
    phash = checkpoint.params_hash(params.model_dump_json())
    ckpt = checkpoint.load(ckpt_dir)
    if ckpt is not None and ckpt.params_hash != phash:
        log.warning("%s: checkpoint is for other params; starting afresh", ckpt_dir)
        ckpt = None
    personal: dict[int, State] = {}
    resume, run_id = None, None
    if ckpt is not None:
        checkpoint.check_shapes(ckpt, fed.initial_global_state(), ckpt_dir)
        fed.set_base_weights(ckpt.base_weights)
        resume, personal, run_id = (ckpt.global_state, ckpt.results), ckpt.personal, ckpt.run_id
        log.info("resuming %s after round %d", variant, ckpt.round)
    with tracking.start_run(params, variant, run_id=run_id, data_hash=tracking.data_hash(params)) as mlrun:
        progress = tqdm(total=params.federation.rounds, initial=ckpt.round if ckpt else 0, desc=f"{variant} rounds", unit="round")

        def after_round(results: list[RoundResult], state: State) -> None:
            result = results[-1]
            personal.update({u.client: u.state for u in result.updates})
            tracking.log_metrics(result.summary(), step=result.round)
            tracking.log_dict(_edits_record(result), f"edits/round_{result.round:03d}.json")
            tracking.log_dict(result.diagnostics, f"diagnostics/round_{result.round:03d}.json")
            checkpoint.save(ckpt_dir, checkpoint.Checkpoint(result.round, mlrun.info.run_id, phash, state, personal,
                                                            fed.base_weights(), results))
            progress.update()

        state, results = run(fed, flow_steps(params, fed), on_round=after_round, resume=resume)
        progress.close()
        metrics = outputs.write_run_outputs(out_dir, results, variant)
        plot = out_dir / "accuracy.png"
        plots.plot_rounds(outputs.rounds_frame(results, variant), plot)
        tracking.log_artifact(plot)
        adapters_dir = out_dir / "adapters"
        fed.save_adapter(state, adapters_dir / "global", is_global=True)
        for client, client_state in sorted(personal.items()):
            fed.save_adapter(client_state, adapters_dir / f"client_{client}", is_global=False)
        tracking.log_artifacts(adapters_dir, "adapters")
        for name in ("metrics.json", "rounds.csv", "clients.csv", "diagnostics.json"):
            tracking.log_artifact(out_dir / name)
        split_stats = Path(params.data.root) / "split_stats.json"
        if split_stats.is_file():
            tracking.log_artifact(split_stats)
        write_json(out_dir / "mlflow_run.json", {"run_id": mlrun.info.run_id, "variant": variant})
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # finished: a later run must not "resume" stale code
    return {**metrics, "mlflow_run_id": mlrun.info.run_id}


@flow(name="federated_training")
def federated_training(params_path: str = "params.yaml", overrides: dict | None = None, out_dir: str = "outputs/federate") -> dict:
    """One federated run with the configured method; returns its final metrics."""
    params = load_params(params_path, overrides)
    check_methods(params)
    check_prepared(DataPaths.of(params))
    variant = params.aggregation.method + ("+edit" if params.editing.enabled else "")
    return run_rounds(params, Path(out_dir), variant)
