"""Low-memory loading: build a model layer by layer, quantizing each linear layer as it is made.

`load_model_layerwise(source, quantize="nf4")` never holds the whole float model: the model is first
built with every parameter on the meta device (no memory; buffers such as rotary frequencies are made
for real), then each module's parameters are made in turn, and a linear layer that `quantize_model`
would replace becomes a `QuantizedLinear` at once, its float weight freed before the next layer is made.
The peak while loading is the finished model plus one layer's float weight and the quantizer's slice
(`peftkit.quantize.QUANTIZE_SLICE_VALUES`): benchmarks/scaling.py measures it.

Where the values come from (one function, two sources):
- a model folder (or built-in name) with safetensors files: each tensor is read alone with safetensors'
  `safe_open` (the file is mapped only while that tensor is copied out), so a checkpoint far larger than
  memory loads when its quantized form fits;
- a config alone (a config.json file, a folder without weights, or a transformers config): random
  weights, normal(0, initializer_range) for matrices and embeddings, ones for norm weights, zeros for
  biases, from a seeded generator. Memory and time do not depend on the values, which is what the
  scaling benchmark measures with such models; they are not for accuracy.

On CUDA (`device="cuda"`, typically with `dtype=torch.bfloat16`) each float weight is moved to the GPU
before it is quantized, and QuantizedLinear dequantizes with bitsandbytes' NF4 kernel where it is
installed; the host never holds more than one layer.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import torch
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.quantize import QuantizedLinear, check_scheme, layers_to_quantize


@dataclasses.dataclass
class LoadReport:
    """How a model was loaded: where its values came from and what was quantized."""

    source: str
    random_weights: bool
    quantize: str | None
    quantized_layers: int
    model_bytes: int  # every parameter and buffer of the loaded model, tied weights once


def release_freed_memory() -> None:
    """Give freed heap memory back to the operating system (glibc's malloc_trim; nothing elsewhere).

    A float weight freed after quantizing sits between the codes allocated after it; glibc keeps such holes
    mapped, so without this the process's RSS grows by every float weight it ever made, although the
    memory is free.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, for every *.safetensors file of a folder."""
    from safetensors import safe_open

    where = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                where[key] = path
    return where


def _source_config(source):
    """(transformers config, model folder or None, kind) for a name, a folder, a config.json or a config object."""
    from peftkit.estimate import load_model_config

    if hasattr(source, "to_dict"):  # a transformers config
        architectures = getattr(source, "architectures", None) or ["ForCausalLM"]
        causal = any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures)
        return source, None, "causal" if causal else "encoder"
    config, kind = load_model_config(source)
    path = Path(source).expanduser()
    if path.is_file():
        return config, None, kind
    from peftkit import zoo

    return config, zoo.resolve_model(str(source)), kind


def _read_tensor(path: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:  # mapped only while this one tensor is copied out
        return handle.get_tensor(key)


def _random_value(module: nn.Module, name: str, shape, dtype, std: float, generator: torch.Generator) -> torch.Tensor:
    """A random-weight model's initial value: normal(0, std) for matrices and embeddings, ones for a norm's
    weight, zeros for biases and other vectors."""
    if len(shape) >= 2:
        return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator).to(dtype)
    if name == "weight" and "norm" in type(module).__name__.lower():
        return torch.ones(shape, dtype=dtype)
    return torch.zeros(shape, dtype=dtype)


@torch.no_grad()
def load_model_layerwise(source, quantize: str | None = "nf4", *, dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu", seed: int = 0, block_size: int = 64,
                         double_quant: bool = True, num_labels: int = 2) -> tuple[nn.Module, LoadReport]:
    """(model, report): `source` (a built-in name, a model folder, a config.json or a transformers config)
    loaded module by module, its linear layers quantized with `quantize` ("nf4", "int8", or None for a
    plain float model) as they are made. A folder with safetensors files gives its weights; a config alone
    gives random weights (seeded). A causal LM loads as AutoModelForCausalLM, an encoder as a sequence
    classifier with `num_labels` classes. The model is in eval mode, as transformers loads one.
    """
    import transformers
    from accelerate import init_empty_weights

    if quantize is not None:
        check_scheme(quantize, block_size)
    config, folder, kind = _source_config(source)
    where = _weight_files(folder) if folder is not None else {}
    random_weights = not where
    if kind != "causal":
        config.num_labels = num_labels
    auto = transformers.AutoModelForCausalLM if kind == "causal" else transformers.AutoModelForSequenceClassification
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary frequencies) for real
        model = auto.from_config(config, dtype=dtype)
    chosen = set(layers_to_quantize(model, task_type="CAUSAL_LM" if kind == "causal" else "SEQ_CLS")[0]) if quantize else set()
    generator = torch.Generator().manual_seed(seed)
    std = float(getattr(config, "initializer_range", 0.02))
    made: dict[int, nn.Parameter] = {}  # id of a meta parameter -> its real one (shared ones are made once)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    output = model.get_output_embeddings() if getattr(text_config, "tie_word_embeddings", False) else None

    def value_of(module_name: str, module: nn.Module, name: str, meta: torch.Tensor) -> torch.Tensor:
        key = f"{module_name}.{name}" if module_name else name
        if random_weights:
            return _random_value(module, name, meta.shape, dtype, std, generator)
        path = where.get(key) or where.get(key.removeprefix(model.base_model_prefix + "."))
        if path is None:
            raise PeftkitError(f"{folder} has no tensor {key!r} that the model needs; is it a checkpoint of this model?")
        return _read_tensor(path, key if key in where else key.removeprefix(model.base_model_prefix + ".")).to(dtype)

    for module_name, module in list(model.named_modules()):
        if module_name in chosen:
            weight = value_of(module_name, module, "weight", module.weight).to(device)
            bias = None if module.bias is None else value_of(module_name, module, "bias", module.bias).to(device)
            layer = QuantizedLinear(weight, bias, quantize, block_size, double_quant)
            del weight
            release_freed_memory()
            parent_name, _, child_name = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child_name, layer)
            continue
        for name, meta in list(module._parameters.items()):
            if meta is None or not meta.is_meta or (module is output and name == "weight"):
                continue  # a tied output layer takes the input embedding's weight below
            if id(meta) not in made:
                made[id(meta)] = nn.Parameter(value_of(module_name, module, name, meta).to(device),
                                              requires_grad=meta.requires_grad)
            module._parameters[name] = made[id(meta)]
    if output is not None:
        output.weight = model.get_input_embeddings().weight
    model.to(device)  # buffers made on the host (a no-op on the CPU)
    model.eval()
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    report = LoadReport(source=str(folder or getattr(source, "name_or_path", source)), random_weights=random_weights,
                        quantize=quantize, quantized_layers=len(chosen),
                        model_bytes=sum(t.numel() * t.element_size() for t in tensors.values()))
    return model, report

