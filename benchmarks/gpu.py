"""Device check for the first machine with a GPU: one federated round of LLaVA-1.5-7B's
architecture at the paper's ranks, through the library (stages.prepare/split, Federation).
Writes benchmarks/results/gpu.json.

    python benchmarks/gpu.py [--weights DIR] [--text-layers 4] [--vision-layers 24] [--out PATH]
    python benchmarks/gpu.py --device cpu --tiny --out /tmp/gpu.json   # CPU smoke test (tests run it)

Model: ``--weights DIR`` (or ``$FEDILORA_LLAVA_7B``): a local llava-1.5-7b-hf snapshot, used as it
is. Without weights: llava-1.5-7b's architecture (fedilora.plan.LLAVA_15_7B_CONFIG: CLIP ViT-L/14
at 336 px, the projector, Llama 4096 wide) with ``--text-layers`` of its 32 decoder layers and
``--vision-layers`` of its 24 vision layers, random weights, the project's WordPiece tokenizer
(30,523 tokens + ``<image>``) instead of Llama's, saved with ``save_pretrained`` and loaded
through ``model.name_or_path`` like any checkpoint. ``--tiny``: the test-sized LLaVA (32 wide).

Round: 10 clients at ranks [32, 32, 16, 16, 8, 8, 4, 4, 4, 4], ``sample_fraction`` 0.4 (4 clients
train), FediLoRA with editing, batch 4, one local epoch, then aggregation and the global
evaluation (greedy generation). Variants: ``bf16`` (bf16 base, autocast, gradient
checkpointing) and ``4bit`` (the same on an NF4 base) when bitsandbytes imports and CUDA is
there; a variant that cannot run is recorded with the reason.

Figures per variant: the round's wall time (client updates, aggregation, global evaluation), the
time inside ``train_local`` (a client update also edits and evaluates), training tokens per second
(prompt + answer tokens that are not padding, over the 4 clients' local training time),
peak GPU memory (``torch.cuda.max_memory_allocated`` and ``_reserved``) and the planner's
estimate for the same run (``fedilora.plan``) next to it.

Without CUDA (and without ``--device cpu``) it prints why and exits with status 3, writing
nothing: this file's results are only ever measured on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = 3  # exit status without a GPU
RANKS = [32, 32, 16, 16, 8, 8, 4, 4, 4, 4]
TINY = dict(hidden_size=32, intermediate_size=37, num_attention_heads=2)


def save_llava(root: Path, *, tiny: bool, text_layers: int, vision_layers: int, device: str) -> Path:
    """A random LLaVA checkpoint with a processor, as ``save_pretrained`` writes them."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from fedilora.models.encoders import load_tokenizer
    from fedilora.plan import LLAVA_15_7B_CONFIG

    tok = load_tokenizer()
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.eos_token = "[SEP]"
    text = {k: v for k, v in LLAVA_15_7B_CONFIG["text_config"].items() if k != "model_type"}
    vision = {k: v for k, v in LLAVA_15_7B_CONFIG["vision_config"].items() if k not in ("model_type", "vocab_size")}
    text.update(vocab_size=len(tok), num_hidden_layers=text_layers, pad_token_id=tok.pad_token_id)
    vision.update(num_hidden_layers=vision_layers)
    if tiny:
        text.update(TINY, num_key_value_heads=2, max_position_embeddings=128)
        vision.update(TINY, image_size=32, patch_size=16)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(**text),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2 if vision_layers > 1 else -1,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(torch.bfloat16 if not tiny else torch.float32)
    model.save_pretrained(root)
    side = vision["image_size"]
    images = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=vision["patch_size"],
                   vision_feature_select_strategy="default").save_pretrained(root)
    del model
    return root


def bench_params(model_dir: Path, work: Path, runtime: dict):
    from fedilora.config import parse_params

    return parse_params({
        "seed": 0,
        "data": {"source": str(work / "dataset"), "root": str(work / "data"), "max_text_length": 8},
        "clients": {"num_clients": len(RANKS), "ranks": RANKS, "test_fraction": 0.25},
        "missing": {"rate": 0.4, "pattern": "both"},
        "model": {"name_or_path": str(model_dir)},
        "federation": {"rounds": 1, "sample_fraction": 0.4, "batch_size": 4, "lr": 3e-4},
        "aggregation": {"method": "fedilora"},
        "compare": {"variants": ["fedilora+edit", "fedilora"]},
        "runtime": runtime,
    })


def train_tokens(fed, clients: list[int]) -> int:
    """Prompt + answer tokens, padding excluded, that the clients' local training reads."""
    total = 0
    for c in clients:
        data = fed.train_sets[c]
        batch = fed.make_batch(fed.table, data.rows, data.has_image, data.has_text, fed.params.missing.fill)
        total += int(batch["attention_mask"].sum())
    return total * fed.params.federation.local_epochs


def one_round(params, device: str) -> dict:
    """One round through ``Federation``: 4 sampled clients' updates, aggregation, evaluation."""
    import torch

    from fedilora import federation, plan
    from fedilora.data.splits import for_seed, load_splits
    from fedilora.federation import Federation
    from fedilora.inputs import FeatureTable
    from fedilora.paths import DataPaths

    paths = DataPaths.of(params)
    table, splits = FeatureTable.load(paths.features), for_seed(load_splits(paths.splits), params.seed, paths.splits)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fed = Federation(params, table, splits)
    state = fed.initial_global_state()
    build_s = time.perf_counter() - t0

    def sync() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    clients = fed.sample_clients(1)
    training = []  # seconds inside train_local: a client update also edits and evaluates
    original = federation.train_local

    def timed_train_local(*args, **kwargs):
        start = sync()
        try:
            return original(*args, **kwargs)
        finally:
            training.append(sync() - start)

    federation.train_local = timed_train_local
    try:
        t0 = sync()
        updates = [fed.client_update(c, state, 1) for c in clients]
        t1 = sync()
    finally:
        federation.train_local = original
    state = fed.aggregate(updates, state)
    t2 = sync()
    metrics = fed.evaluate_global(state, patterns=())
    t3 = sync()
    tokens = train_tokens(fed, clients)
    estimate = plan.make_plan(params, num_classes=int(table.labels.max()) + 1)
    result = {
        "runtime": params.runtime.model_dump(),
        "clients": clients,
        "ranks": [fed.ranks[c] for c in clients],
        "build_s": round(build_s, 2),
        "round_s": round(t3 - t0, 3),
        "client_updates_s": round(t1 - t0, 3),
        "train_s": round(sum(training), 3),
        "aggregate_s": round(t2 - t1, 3),
        "evaluate_s": round(t3 - t2, 3),
        "train_tokens": tokens,
        "tokens_per_s": round(tokens / sum(training), 1),
        "client_losses": [round(u.loss, 4) for u in updates],
        "global_accuracy": metrics.get("accuracy"),
        "adapter_device": str(next(iter(state.values())).device),
        "plan_peak_bytes": estimate.memory["total"],
        "plan_memory": estimate.memory,
    }
    if cuda:
        result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    del fed
    return result


def variants(device: str) -> list[tuple[str, dict, str | None]]:
    """(name, runtime, reason it cannot run or None)."""
    bf16 = {"device": device, "dtype": "bfloat16", "mixed_precision": "auto", "gradient_checkpointing": True}
    reason = None
    if not device.startswith("cuda"):
        reason = "4-bit needs CUDA"
    else:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as err:  # not installed, or its CUDA library does not load
            reason = f"bitsandbytes not usable: {type(err).__name__}: {err}"
    return [("bf16", bf16, None), ("4bit", {**bf16, "quantization": "4bit"}, reason)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=os.environ.get("FEDILORA_LLAVA_7B"),
                        help="a local llava-1.5-7b-hf snapshot (default: $FEDILORA_LLAVA_7B; none: random weights)")
    parser.add_argument("--text-layers", type=int, default=4, help="decoder layers of the random model (of 32)")
    parser.add_argument("--vision-layers", type=int, default=24, help="vision layers of the random model (of 24)")
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (smoke test)")
    parser.add_argument("--tiny", action="store_true", help="the test-sized LLaVA instead of 7B's width")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu.json")
    args = parser.parse_args(argv)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"benchmarks/gpu.py: no CUDA device here (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
              "this check needs a GPU, nothing written. On a CPU, `--device cpu --tiny` runs the smoke test.",
              file=sys.stderr)
        return NO_CUDA
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fedilora import stages
    from tests.tiny_project import write_dataset

    with tempfile.TemporaryDirectory(prefix="fedilora-gpu-") as tmp:
        work = Path(tmp)
        if args.weights:
            if not (Path(args.weights) / "config.json").is_file():
                print(f"benchmarks/gpu.py: --weights {args.weights}: no config.json there", file=sys.stderr)
                return 2
            model_dir, source = Path(args.weights), f"weights at {args.weights}"
        else:
            layers = (2, 2) if args.tiny else (args.text_layers, args.vision_layers)
            model_dir = save_llava(work / "llava", tiny=args.tiny, text_layers=layers[0], vision_layers=layers[1],
                                   device=args.device)
            source = ("the test-sized LLaVA (32 wide), random weights" if args.tiny else
                      f"llava-1.5-7b's architecture with {layers[0]} of 32 decoder layers and {layers[1]} of 24 "
                      "vision layers, random weights, the project's WordPiece tokenizer")
        write_dataset(work / "dataset", per_class=40)
        runs = []
        for name, runtime, reason in variants(args.device):
            if reason:
                runs.append({"variant": name, "skipped": reason})
                continue
            params = bench_params(model_dir, work, runtime)
            stages.prepare(params)
            stages.split(params)
            t0 = time.perf_counter()
            try:
                runs.append({"variant": name, **one_round(params, args.device)})
            except Exception as err:  # a failed variant is a result too; the other still runs
                runs.append({"variant": name, "failed": f"{type(err).__name__}: {err}"})
            print(f"{name}: {json.dumps(runs[-1])[:400]} ({time.perf_counter() - t0:.0f} s)")
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    result = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "smoke": args.tiny or not args.device.startswith("cuda"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "model": source,
        "ranks": RANKS,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")
    return 0 if all("failed" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
