"""Round checkpoints, so a killed run resumes from its last finished round.

A checkpoint is a folder of safetensors files (the global state, each client's personalized
state, and the base weights when the method changed them) plus ``meta.json`` (the round, the
MLflow run id, the params it belongs to, and the per-round results needed for the outputs). It is
written to a temporary sibling folder and renamed into place (``atomic_dir``), so a crash leaves
either the previous checkpoint or the new one, never half of one. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file

from fedilora.atomic import atomic_dir
from fedilora.editing import EditRecord
from fedilora.federation import ClientUpdate, RoundResult
from fedilora.lora import State, rank_shape


@dataclass
class Checkpoint:
    round: int
    run_id: str
    params_hash: str
    global_state: State
    personal: dict[int, State]
    base_weights: State | None
    results: list[RoundResult]


def params_hash(params_json: str) -> str:
    return hashlib.sha256(params_json.encode()).hexdigest()[:16]


def _save_tensors(tensors: State, path: Path) -> None:
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))


def _result_record(result: RoundResult) -> dict:
    """A round's result without its adapter states (those live in the tensor files)."""
    return {
        "round": result.round,
        "clients": result.clients,
        "global_metrics": result.global_metrics,
        "diagnostics": result.diagnostics,
        "updates": [
            {
                "client": u.client,
                "rank": u.rank,
                "num_samples": u.num_samples,
                "loss": u.loss,
                "metrics": u.metrics,
                "edits": [asdict(e) for e in u.edits],
            }
            for u in result.updates
        ],
    }


def _result_from(record: dict) -> RoundResult:
    updates = [
        ClientUpdate(
            client=u["client"],
            rank=u["rank"],
            num_samples=u["num_samples"],
            state={},
            loss=u["loss"],
            metrics=u["metrics"],
            edits=[EditRecord(**e) for e in u["edits"]],
        )
        for u in record["updates"]
    ]
    return RoundResult(record["round"], record["clients"], record["global_metrics"], updates, record.get("diagnostics", {}))


def save(directory: Path, ckpt: Checkpoint) -> None:
    with atomic_dir(directory) as tmp:
        _write(tmp, ckpt)


def _write(tmp: Path, ckpt: Checkpoint) -> None:
    _save_tensors(ckpt.global_state, tmp / "global.safetensors")
    for client, state in ckpt.personal.items():
        _save_tensors(state, tmp / f"client_{client}.safetensors")
    if ckpt.base_weights is not None:
        _save_tensors(ckpt.base_weights, tmp / "base_weights.safetensors")
    meta = {
        "round": ckpt.round,
        "run_id": ckpt.run_id,
        "params_hash": ckpt.params_hash,
        "clients": sorted(ckpt.personal),
        "results": [_result_record(r) for r in ckpt.results],
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


def load(directory: Path) -> Checkpoint | None:
    """The checkpoint in ``directory``, or None if there is none. A damaged one is an error
    naming the file: resuming from a guess could silently change the results."""
    directory = Path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        personal = {c: load_file(str(directory / f"client_{c}.safetensors")) for c in meta["clients"]}
        base_path = directory / "base_weights.safetensors"
        return Checkpoint(
            round=int(meta["round"]),
            run_id=str(meta["run_id"]),
            params_hash=str(meta["params_hash"]),
            global_state=load_file(str(directory / "global.safetensors")),
            personal=personal,
            base_weights=load_file(str(base_path)) if base_path.is_file() else None,
            results=[_result_from(r) for r in meta["results"]],
        )
    except Exception as err:  # safetensors, json and missing files raise different types
        raise ValueError(f"{directory}: damaged checkpoint ({err}); delete it to start the run afresh") from None


def check_shapes(ckpt: Checkpoint, reference: State, directory: Path) -> None:
    """A checkpoint's adapters must fit the model: the same keys, and the same shapes but for
    the rank dimension (which varies with the method and the clients)."""
    files = {"global.safetensors": ckpt.global_state}
    files.update({f"client_{c}.safetensors": s for c, s in ckpt.personal.items()})
    for name, state in files.items():
        if set(state) != set(reference):
            odd = sorted(set(state) ^ set(reference))[:3]
            raise ValueError(f"{Path(directory) / name}: keys do not match the model (e.g. {odd})")
        for key, tensor in state.items():
            want = tuple(reference[key].shape)
            got = tuple(tensor.shape)
            if len(got) != len(want) or rank_shape(key, got) != rank_shape(key, want):
                raise ValueError(f"{Path(directory) / name}: {key} has shape {got}, expected {want} (up to the rank)")

