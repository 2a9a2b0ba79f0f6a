"""Where a worker computes and in what precision (``runtime.*``), and the one-line errors when
that cannot be had.

The policy, whatever the device: the frozen base is in ``runtime.dtype`` (or 4/8-bit through
bitsandbytes); LoRA factors, trained modules (``modules_to_save``, projector, head) and so their
gradients and AdamW state are float32; forward passes run under autocast when mixed precision is
on. Adapter states never stay on the device: ``adapters.get_state`` returns CPU float32 tensors,
so updates, aggregation, checkpoints and MLflow artifacts are the same whatever trained them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from fedilora.config import RuntimeConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DeviceError(RuntimeError):
    """The configured device, precision or quantization is not available here; names the field."""


def cuda_available() -> bool:
    return torch.cuda.is_available()


def resolve_device(runtime: RuntimeConfig) -> torch.device:
    """``auto``: the first GPU when torch sees one, else the CPU. A GPU asked for where there
    is none is an error, not a silent CPU run."""
    name = runtime.device
    if name == "auto":
        return torch.device("cuda:0" if cuda_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not cuda_available():
        build = f"torch {torch.__version__} built without CUDA" if torch.version.cuda is None else "no GPU visible"
        raise DeviceError(f"runtime.device={name}: CUDA is not available on this machine ({build}); use auto or cpu")
    device = torch.device(name if ":" in name else "cuda:0")
    if device.index >= torch.cuda.device_count():
        raise DeviceError(f"runtime.device={name}: this machine has {torch.cuda.device_count()} CUDA device(s) (0-based)")
    return device


def check(runtime: RuntimeConfig) -> torch.device:
    """Everything ``runtime`` asks for is available here (device, bf16 support, bitsandbytes);
    the device. Called before a run starts, so a bad setting fails in one line, not mid-run."""
    device = resolve_device(runtime)
    for field, name in (("dtype", runtime.dtype), ("mixed_precision", runtime.autocast_dtype())):
        if name == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DeviceError(f"runtime.{field}=bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 support; use float16")
    if runtime.quantization != "none":
        if device.type != "cuda":
            raise DeviceError(
                f"runtime.quantization={runtime.quantization}: bitsandbytes quantization needs a CUDA device, "
                f"and runtime.device={runtime.device} resolves to {device}; use runtime.quantization: none"
            )
        require_bitsandbytes(runtime)
    return device


def require_bitsandbytes(runtime: RuntimeConfig) -> str:
    """bitsandbytes' version; a one-line error when it does not import."""
    try:
        import bitsandbytes
    except Exception as err:  # ImportError, or its own errors when its CUDA library does not load
        raise DeviceError(
            f"runtime.quantization={runtime.quantization}: bitsandbytes is not usable ({type(err).__name__}: {err}); "
            "install the gpu extra: pip install 'fedilora[gpu]'"
        ) from None
    return bitsandbytes.__version__


def quantization_config(runtime: RuntimeConfig, skip_modules: list[str] | None):
    """transformers' ``BitsAndBytesConfig`` for ``runtime.quantization`` (None for none): QLoRA's
    NF4 with double quantization and ``runtime.dtype`` as the compute dtype, or LLM.int8.
    ``skip_modules`` stay unquantized (trained modules, the LM head)."""
    if runtime.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if runtime.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=DTYPES[runtime.dtype],
            llm_int8_skip_modules=skip_modules,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)


def is_trained(name: str) -> bool:
    """Parameters that train or are copied into a trained slot: LoRA factors and PEFT's
    ``modules_to_save`` (the trained copies and the original they are copied from)."""
    return "lora_" in name or ".modules_to_save." in name or ".original_module." in name


def keep_trained_float32(model: nn.Module) -> None:
    """LoRA factors and trained modules in float32 (PEFT already upcasts new LoRA factors of a
    low-precision base, not ``modules_to_save`` copies)."""
    for name, param in model.named_parameters():
        if is_trained(name) and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """The frozen base's floating parameters in ``dtype`` (a no-op for a base loaded in it;
    quantized weights are integer and left alone)."""
    for name, param in model.named_parameters():
        if not is_trained(name) and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def place(model: nn.Module, runtime: RuntimeConfig) -> nn.Module:
    """The wrapped model on ``runtime.device`` in the precision policy (module doc), with
    gradient checkpointing when asked."""
    device = resolve_device(runtime)
    if runtime.quantization == "none":
        model.to(device)
    else:  # quantized layers were placed when loaded (device_map); move what was built after
        for module in model.modules():
            if not type(module).__module__.startswith("bitsandbytes"):
                module._apply(lambda t: t.to(device), recurse=False)
    cast_frozen(model, DTYPES[runtime.dtype])
    keep_trained_float32(model)
    if runtime.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer layer's activations in backward instead of keeping them
    (transformers' own switch, on the outermost Hugging Face models). Non-reentrant, so the
    frozen inputs need no ``requires_grad`` and dropout replays the same masks."""
    from transformers import PreTrainedModel

    found = {name: m for name, m in model.named_modules() if isinstance(m, PreTrainedModel)}
    outermost = [m for name, m in found.items() if not any(name.startswith(f"{o}.") for o in found if o != name)]
    supported = [m for m in outermost if m.supports_gradient_checkpointing]
    if not supported:
        raise DeviceError("runtime.gradient_checkpointing: the model has no transformers layers that support it")
    for module in supported:  # transformers 5.x renamed it; both take the torch.utils.checkpoint kwargs
        enable = getattr(module, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def autocast(model: nn.Module, runtime: RuntimeConfig) -> Iterator[None]:
    """Autocast to ``runtime``'s mixed-precision dtype on the model's device (nothing when off)."""
    name = runtime.autocast_dtype()
    if name is None:
        yield
        return
    with torch.autocast(device_of(model).type, dtype=DTYPES[name]):
        yield


def grad_scaler(model: nn.Module, runtime: RuntimeConfig) -> torch.amp.GradScaler:
    """float16 autocast loses small gradients without loss scaling; bfloat16 and float32 need
    none (the scaler is then disabled and a pass-through)."""
    return torch.amp.GradScaler(device_of(model).type, enabled=runtime.autocast_dtype() == "float16")
