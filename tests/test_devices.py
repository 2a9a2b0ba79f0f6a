"""``runtime.*`` on a machine without CUDA: the precision policy (bf16 base, float32 LoRA and
trained modules), autocast, gradient checkpointing and adapters that leave as CPU float32 run
here on the tiny CLIP, ViLT and LLaVA checkpoints through the same code path a GPU uses; asking
for CUDA or quantization fails in one line."""

from __future__ import annotations

import pytest
import torch

from fedilora import devices, methods
from fedilora.config import ConfigError, RuntimeConfig, parse_params
from fedilora.federation import Federation, check_methods
from fedilora.inputs import feature_batch as make_batch
from fedilora.models.shared import ModelSpec, build, load_adapter_model
from fedilora.models import adapters
from fedilora.models.families import family_of
from fedilora.training import Subset, train_local
from test_hf_models import CLASSES, FAMILIES, MIXED, _table, checkpoints  # noqa: F401 (fixture)
from tiny_project import call_cli, write_project


def build_model(params, image_dim: int, num_classes: int):
    return build(ModelSpec.of(params, image_dim, num_classes)).peft

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
BF16 = {"dtype": "bfloat16", "gradient_checkpointing": True}


def _params(path, runtime=None, ranks=(4, 2), **sections):
    return parse_params({"model": {"name_or_path": str(path)}, "clients": {"num_clients": len(ranks), "ranks": list(ranks)},
                         "runtime": runtime or {}, **sections})


# ---- configuration and availability ---------------------------------------------------------------


@pytest.mark.parametrize(
    "runtime, field",
    [
        ({"device": "gpu"}, "runtime.device"),
        ({"device": "cuda:x"}, "runtime.device"),
        ({"dtype": "float8"}, "runtime.dtype"),
        ({"quantization": "2bit"}, "runtime.quantization"),
        ({"dtype": "bfloat16", "mixed_precision": "none"}, "mixed_precision=none"),
    ],
)
def test_bad_runtime_values_name_their_field(runtime, field) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_params({"runtime": runtime})


def test_quantization_needs_a_hugging_face_model_and_no_merging_method() -> None:
    with pytest.raises(ConfigError, match="runtime.quantization=4bit applies to a Hugging Face model"):
        parse_params({"runtime": {"quantization": "4bit"}})
    quantized = parse_params({"model": {"name_or_path": "x"}, "runtime": {"quantization": "8bit"}})
    # the method says it cannot fold into quantized weights, before a run starts (the default compare.variants hold flora)
    with pytest.raises(ValueError, match="compare.variants: flora: aggregation.method: flora folds each round's update"):
        check_methods(quantized)
    ok = parse_params({"model": {"name_or_path": "x"}, "runtime": {"quantization": "4bit"}, "compare": {"variants": ["fedilora"]}})
    check_methods(ok)


def test_autocast_follows_the_base_dtype_unless_said() -> None:
    assert RuntimeConfig().autocast_dtype() is None
    assert RuntimeConfig(dtype="bfloat16").autocast_dtype() == "bfloat16"
    assert RuntimeConfig(dtype="float32", mixed_precision="bfloat16").autocast_dtype() == "bfloat16"
    assert RuntimeConfig(dtype="float16", mixed_precision="float16").autocast_dtype() == "float16"


@NO_CUDA
def test_cuda_or_quantization_without_cuda_is_a_one_line_error() -> None:
    assert devices.resolve_device(RuntimeConfig()) == torch.device("cpu")  # auto: the CPU here
    for device in ("cuda", "cuda:1"):
        with pytest.raises(devices.DeviceError, match=f"runtime.device={device}: CUDA is not available") as err:
            devices.check(RuntimeConfig(device=device))
        assert "\n" not in str(err.value)
    with pytest.raises(devices.DeviceError, match="runtime.quantization=4bit: bitsandbytes quantization needs a CUDA device"):
        devices.check(RuntimeConfig(quantization="4bit"))


@NO_CUDA
def test_cli_federate_on_cuda_without_cuda_exits_2_with_one_line(tmp_path) -> None:
    write_project(tmp_path)
    proc = call_cli(tmp_path, "federate", "-S", "runtime.device=cuda", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("fedilora federate: error: runtime.device=cuda: CUDA is not available"), proc.stderr
    assert "Traceback" not in proc.stderr


# ---- the precision policy on CPU ----------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_base_float32_adapters_and_trained_modules(checkpoints, family) -> None:  # noqa: F811
    params = _params(checkpoints[family], BF16)
    model = build_model(params, 3, 3)
    adapters.ensure_slot(model, 2, params.lora.alpha_for(2))  # a slot added later follows the policy too
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    trained = {n for n in dtypes if devices.is_trained(n)}
    assert trained and any("lora_" in n for n in trained) and any("modules_to_save" in n for n in trained)
    assert all(dtypes[n] == torch.float32 for n in trained)
    assert {dtypes[n] for n in dtypes if n not in trained} == {torch.bfloat16}
    assert params.runtime.autocast_dtype() == "bfloat16"
    hf_models = [m for m in model.modules() if getattr(m, "is_activation_checkpointing", False)]
    assert hf_models, "gradient checkpointing is not on"
    state = adapters.get_state(model, adapters.slot_name(2, params.lora.alpha_for(2)))
    assert {t.dtype for t in state.values()} == {torch.float32} and {t.device.type for t in state.values()} == {"cpu"}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_training_lowers_the_loss_and_round_trips_in_peft_format(checkpoints, family, tmp_path) -> None:  # noqa: F811
    params = _params(checkpoints[family], BF16)
    table = _table(params)
    model = build_model(params, 3, 3)
    slot = adapters.slot_name(4, params.lora.alpha_for(4))
    adapters.activate(model, slot)
    data = Subset(torch.arange(12), torch.ones(12, dtype=torch.bool), torch.ones(12, dtype=torch.bool))
    make = family_of(params.model).make_batch
    losses = [train_local(model, table, data, epochs=1, batch_size=6, lr=2e-2, generator=torch.Generator().manual_seed(e),
                          make_batch=make, runtime=params.runtime) for e in range(6)]
    assert all(loss == loss for loss in losses)  # no NaN from bf16
    assert losses[-1] < losses[0], losses
    state = adapters.get_state(model, slot)
    adapters.save_adapter(model, slot, tmp_path / "adapter")
    loaded = load_adapter_model(ModelSpec.of(params, 3, 3), tmp_path / "adapter")
    loaded_state = adapters.get_state(loaded, next(iter(loaded.peft_config)))
    assert set(loaded_state) == set(state)
    assert all(torch.equal(loaded_state[k], state[k]) for k in state)
    assert {p.dtype for n, p in loaded.named_parameters() if not devices.is_trained(n)} == {torch.bfloat16}


def test_gradient_checkpointing_changes_memory_not_gradients(checkpoints) -> None:  # noqa: F811
    """The same loss and LoRA gradients with and without recomputation (float32, dropout on)."""
    grads = []
    for checkpointing in (False, True):
        params = _params(checkpoints["vilt"], {"gradient_checkpointing": checkpointing}, lora={"dropout": 0.1})
        table = _table(params)
        model = build_model(params, 3, 3).train()
        adapters.activate(model, adapters.slot_name(4, params.lora.alpha_for(4)))
        batch = make_batch(table, MIXED.rows, MIXED.has_image, MIXED.has_text)
        torch.manual_seed(0)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"})
        torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def test_a_cpu_float32_state_loads_into_a_bf16_model(checkpoints) -> None:  # noqa: F811
    params = _params(checkpoints["llava"], BF16)
    model = build_model(params, 3, 3)
    slot = adapters.slot_name(4, params.lora.alpha_for(4))
    state = {k: torch.randn_like(v) for k, v in adapters.get_state(model, slot).items()}
    adapters.load_state(model, slot, state)
    back = adapters.get_state(model, slot)
    assert all(torch.equal(back[k], state[k]) for k in state)  # float32 slots: nothing rounded
    back[next(iter(back))].add_(1.0)  # a copy, not the model's own tensor
    assert torch.equal(adapters.get_state(model, slot)[next(iter(back))], state[next(iter(back))])


# ---- aggregation does not depend on where or in what precision clients trained ------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_trained_clients_aggregate_like_float32_ones(checkpoints, family) -> None:  # noqa: F811
    """Two clients' round through ``Federation.client_update`` (the path a GPU worker runs) on a
    bf16 base: the states come back CPU float32, and ``methods.aggregate`` of them equals the
    aggregation of the same states held in bf16 up to bf16 rounding. The same round on a
    float32 base moves the adapter the same way (bf16 training differs by rounding, not trend)."""
    import pandas as pd

    moves = {}
    for name, runtime in (("float32", {}), ("bfloat16", BF16)):
        params = _params(checkpoints[family], runtime, federation={"batch_size": 4, "lr": 1e-2},
                         editing={"enabled": False})
        table = _table(params, 16)
        splits = pd.DataFrame({"row": range(16), "client": [i % 2 for i in range(16)],
                               "split": ["train"] * 12 + ["test"] * 4, "has_image": True, "has_text": True})
        fed = Federation(params, table, splits, model=build(ModelSpec.of(params, 3, 3)))
        start = fed.initial_global_state()
        updates = [fed.client_update(c, start, 1) for c in (0, 1)]
        states = [u.state for u in updates]
        for state in states:
            assert {(t.device.type, t.dtype) for t in state.values()} == {("cpu", torch.float32)}
        ranks, sizes = [u.rank for u in updates], [u.num_samples for u in updates]
        scalings = [fed.strategy.setup.scaling(r) for r in ranks]
        merged = methods.aggregate("fedilora", states, ranks, sizes, scalings=scalings)
        in_bf16 = [{k: v.to(torch.bfloat16) for k, v in s.items()} for s in states]
        from_bf16 = methods.aggregate("fedilora", in_bf16, ranks, sizes, scalings=scalings)
        for key, value in merged.items():
            torch.testing.assert_close(from_bf16[key].float(), value, rtol=2e-2, atol=1e-4)
        moves[name] = {k: v - start[k] for k, v in merged.items()}
    diffs = [((moves["bfloat16"][k] - m).norm() / m.norm()).item() for k, m in moves["float32"].items() if m.norm() > 0]
    assert diffs and sorted(diffs)[len(diffs) // 2] < 0.2, diffs


def test_runtime_params_are_logged_to_mlflow() -> None:
    """Every param reaches MLflow flattened (tracking.start_run): runtime.* included."""
    from fedilora.tracking import flatten

    logged = flatten(parse_params({"runtime": {"dtype": "bfloat16"}, "runner": {"gpus_per_worker": 1}}).model_dump(mode="json"))
    assert logged["runtime.dtype"] == "bfloat16" and logged["runtime.device"] == "auto"
    assert {"runtime.mixed_precision", "runtime.gradient_checkpointing", "runtime.quantization"} <= set(logged)
    assert logged["runner.gpus_per_worker"] == "1.0"
