"""``fedilora plan`` against real allocations: the tiny embedded, CLIP, ViLT and LLaVA configs
are built for real and one training step of ``train_local`` (the run's code path) is measured
with PyTorch's ``MemTracker``; the meta-device estimate must be within 30 %.

Why MemTracker measures what a GPU would: it is a ``TorchDispatchMode`` that sees every tensor
storage created by every aten op (and frees through weak references), so its peak is the peak of
live tensor bytes, the quantity ``torch.cuda.max_memory_allocated`` reports on a GPU (there
without the caching allocator's rounding to 512-byte blocks). It is a different tool and a
different execution (real tensors, the wrappers' full forward with masks and token placement)
from the planner's (meta tensors, a dense forward, a counter of live storages). One step is
measured (MemTracker cannot follow two passes of the same modules): the optimizer state exists
only from the second step on, which the estimate includes (2x the float32 adapter, KiBs here).
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from fedilora import plan
from fedilora.config import parse_params
from fedilora.models.families import family_of
from fedilora.models.encoders import encode
from fedilora.models.shared import ModelSpec, build
from fedilora.models import adapters
from fedilora.models.encoders import load_image_encoder, load_tokenizer
from fedilora.training import Subset, train_local
from test_hf_models import _table, checkpoints  # noqa: F401 (fixture)
from tiny_project import call_cli, write_project

BATCH = 16
RUNTIMES = {"float32": {}, "bf16+checkpointing": {"dtype": "bfloat16", "gradient_checkpointing": True}}


class _NoHook:
    def remove(self) -> None:
        pass


def memory_tracker():
    """``MemTracker`` hooks every parameter's gradient, which a frozen one cannot have: frozen
    parameters are marked as hooked (with no-op handles) before it looks at them."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class FrozenAwareMemTracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            for param in module.parameters():
                if not param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                    self._param_to_grad_hook_handles[param] = (_NoHook(), _NoHook())
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

    return FrozenAwareMemTracker()


def _setup(family: str, checkpoints, runtime: dict):  # noqa: F811
    model = {"name": "tiny"} if family == "embedded" else {"name_or_path": str(checkpoints[family])}
    params = parse_params({"model": model, "clients": {"num_clients": 2, "ranks": [4, 2]},
                           "federation": {"batch_size": BATCH}, "runtime": runtime})
    labels = [i % 3 for i in range(BATCH)]
    if family == "embedded":
        images = [Image.new("RGB", (8, 8), (200, (40 * i) % 255, 30)) for i in range(BATCH)]
        table = encode(["apple cherry banana kiwi"] * BATCH, images, labels, load_tokenizer(), load_image_encoder("tiny"), 24)
    else:
        table = _table(params, BATCH)
    return params, table


def measure(params, table) -> dict[str, int]:
    """Peak bytes by kind over one ``train_local`` step on the real model (r_max slot)."""
    model = build(ModelSpec.of(params, table.image_features.shape[1], 3)).peft
    adapters.ensure_slot(model, 2, params.lora.alpha_for(2))  # every rank's slot, as in a run
    adapters.activate(model, adapters.slot_name(4, params.lora.alpha_for(4)))
    data = Subset(torch.arange(BATCH), torch.ones(BATCH, dtype=torch.bool), torch.ones(BATCH, dtype=torch.bool))
    tracker = memory_tracker()
    tracker.track_external(model)
    with tracker:
        train_local(model, table, data, epochs=1, batch_size=BATCH, lr=1e-3, generator=torch.Generator().manual_seed(0),
                    make_batch=family_of(params.model).make_batch, runtime=params.runtime)
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return {str(getattr(k, "value", k)): int(v) for k, v in peak.items()}


def estimate(params, table) -> plan.Plan:
    data = torch.arange(BATCH)
    batch = family_of(params.model).make_batch(table, data, torch.ones(BATCH, dtype=torch.bool), torch.ones(BATCH, dtype=torch.bool), "absent")
    shapes = plan.Shapes(BATCH, batch["input_ids"].shape[1], tuple(table.image_features.shape[1:]), 3)
    return plan.make_plan(params, shapes=shapes)


@pytest.mark.parametrize("runtime", sorted(RUNTIMES))
@pytest.mark.parametrize("family", ["embedded", "clip", "vilt", "llava"])
def test_estimate_within_30_percent_of_measured_allocations(checkpoints, family, runtime) -> None:  # noqa: F811
    params, table = _setup(family, checkpoints, RUNTIMES[runtime])
    measured = measure(params, table)
    est = estimate(params, table)
    memory = est.memory
    resident = memory["base"] + memory["rank_slots"]  # the model's parameters: all but the foundation copy
    assert resident == pytest.approx(measured["Parameter"], rel=0.01)  # counted exactly
    total = memory["total"] - memory["foundation_copy"]  # the copy is Federation's, outside the model
    assert total == pytest.approx(measured["Total"], rel=0.30), (memory, measured)
    if runtime == "float32":  # the part that is estimated rather than counted
        dynamic = memory["gradients"] + memory["optimizer_state"] + memory["activations"]
        step = measured["Total"] - measured["Parameter"] - measured["Buffer"]
        assert dynamic == pytest.approx(step, rel=0.30), (memory, measured)


@pytest.mark.parametrize("family", ["embedded", "clip", "vilt", "llava"])
def test_counts_match_the_real_model(checkpoints, family) -> None:  # noqa: F811
    params, table = _setup(family, checkpoints, {"dtype": "bfloat16"})
    est = estimate(params, table)
    model = build(ModelSpec.of(params, table.image_features.shape[1], 3)).peft
    for rank in (4, 2):
        slot = adapters.ensure_slot(model, rank, params.lora.alpha_for(rank))
        state = adapters.get_state(model, slot)
        assert est.trainable_params[rank] == sum(t.numel() for t in state.values())
        assert est.adapter_bytes[rank] == sum(t.numel() * t.element_size() for t in state.values())
        assert est.sent_bytes[rank] == {"down": est.adapter_bytes[rank], "up": est.adapter_bytes[rank]}
    frozen = sum(p.numel() for n, p in model.named_parameters() if not plan.in_slot(n))
    assert est.frozen_params == frozen
    assert est.base_bytes["16bit"] == sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not plan.in_slot(n))


def test_llava_15_7b_at_the_paper_ranks_without_weights(tmp_path) -> None:
    """The real architecture's numbers, from the config built in code (nothing on disk)."""
    params = parse_params({
        "model": {"name_or_path": "llava-hf/llava-1.5-7b-hf"},
        "clients": {"num_clients": 10, "ranks": [32, 32, 16, 16, 8, 8, 4, 4, 4, 4]},
        "federation": {"batch_size": 4},
        "data": {"root": str(tmp_path / "no-data")},
        "runtime": {"dtype": "bfloat16", "gradient_checkpointing": True},
    })
    est = plan.make_plan(params)
    assert est.frozen_params == 7_063_427_072  # llava-1.5-7b-hf's parameter count
    projector = 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    for rank in (4, 8, 16, 32):  # q_proj and v_proj of 32 layers, 4096 x 4096 each
        assert est.trainable_params[rank] == projector + 32 * 2 * rank * (4096 + 4096)
    assert est.base_bytes["16bit"] == pytest.approx(2 * 7.063e9, rel=0.01)
    assert est.base_bytes["4bit"] < est.base_bytes["8bit"] < est.base_bytes["16bit"] < est.base_bytes["float32"]
    assert est.shapes["text"] == 576 + plan.PROMPT_TOKENS + 24 + plan.ANSWER_TOKENS
    assert est.eval_kv_cache == 2 * 32 * 128 * est.shapes["text"] * 4096 * 2  # K and V, 32 layers, bf16
    memory = est.memory
    assert memory["total"] == sum(v for k, v in memory.items() if k != "total")
    assert 0 < memory["activations"] < memory["base"]


def test_plan_command(tmp_path) -> None:
    write_project(tmp_path)
    proc = call_cli(tmp_path, "plan", "--out", "plan.json", "-S", "runtime.dtype=bfloat16")
    assert "peak training memory per worker (estimate)" in proc.stdout and "frozen parameters" in proc.stdout
    written = json.loads((tmp_path / "plan.json").read_text())
    assert written["runtime"]["dtype"] == "bfloat16" and written["memory"]["total"] > written["memory"]["base"]
    assert sorted(int(r) for r in written["adapter_bytes"]) == [2, 4]
