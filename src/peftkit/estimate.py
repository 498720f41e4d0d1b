"""Will a training run fit? Trainable parameters and peak training memory, predicted from a config alone.

`estimate_training_memory("smollm2", "lora", quantize="nf4", batch_size=1, max_length=256)` builds the
model from its config on the meta device (shapes, no memory, no weights read), quantizes it and wraps it
with the method exactly as `peftkit train` would, and counts:

- weights: every parameter and buffer of the wrapped model (quantized codes and scales where the base is
  quantized; tied weights once);
- gradients: one per trainable value (same dtype as the parameter);
- optimizer state: AdamW's two moments per trainable value;
- activations: the tensors autograd saves for the backward pass in one training forward of a batch of
  `batch_size` x `max_length` tokens. They are counted, not guessed: the weightless model runs that
  forward on meta tensors with a `saved_tensors_hooks` pair that adds up every saved tensor (a view
  counts as its base, once). With gradient checkpointing, each decoder / encoder block keeps only its
  input, and one block's saved tensors exist again while it is recomputed in the backward pass;
- workspace: what the backward pass and the optimizer allocate on top (the gradient of the largest saved
  tensor, usually the logits, twice; where the base is quantized, the reused buffers that dequantizing
  fills, one per distinct layer size);
- allocator: what the process holds on top of the live tensors while they come and go every step. The
  CPU allocator (glibc malloc) keeps freed blocks for reuse, and a forward pass makes short-lived tensors
  that are never saved; over the first steps the RSS settles at about a factor x (activations +
  workspace), 1.5 on a float base, 2 on a quantized one, 2.4 on a quantized one with gradient
  checkpointing (TRANSIENT_FACTORS, measured with benchmarks/scaling.py);
- runtime: Python, torch, transformers and peftkit themselves, a constant measured on this project's
  CPU build (RUNTIME_BYTES, see benchmarks/scaling.py).

The peak is taken as the sum of all parts: runtime + weights + gradients + optimizer state + activations +
workspace + allocator. (With full fine-tuning the gradients fill in as the activations are freed, but the
allocator does not hand the freed activations' memory back in time: measured, the two add up.)
The verdict compares it with the memory available now (MemAvailable, or $PEFTKIT_AVAILABLE_MEMORY, e.g. "2GiB", which tests use to force a refusal).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError

# RSS of a training process before the model: Python, torch, transformers, accelerate, peftkit, a tokenizer
# and the data. Measured with benchmarks/scaling.py (`--runtime`) on this project's CPU build of torch.
RUNTIME_BYTES = 452 * 2**20
ADAM_STATES = 2  # exp_avg and exp_avg_sq, each the size of the trainable parameters
AVAILABLE_MEMORY_VARIABLE = "PEFTKIT_AVAILABLE_MEMORY"
# Dequantizing a weight of n values on the CPU fills a reused buffer of int32 indices (n / 2 for NF4) and one
# of float32 values (n), scaled in place: 6 bytes per value, kept for each distinct layer size.
DEQUANTIZE_BYTES_PER_VALUE = 6
# Peak RSS over a step's transient memory (saved activations + backward workspace), once the allocator has
# settled (3-5 steps), by setting. The CPU allocator (glibc) keeps freed blocks for reuse, and a forward pass
# makes short-lived tensors that it never saves; recomputing blocks (gradient checkpointing) makes them
# again. Fitted on the SmolLM2 135M, 360M and 1.7B rows of benchmarks/scaling.py (batch 1 x 256 tokens;
# measured 1.27-1.76 on a float base, 1.74-2.13 on NF4, 2.03-2.57 on NF4 with checkpointing) and checked on
# Llama-3.2-3B's rows, which the fit did not see (1.62, 1.74, 1.83).
TRANSIENT_FACTORS = {  # (quantized base, gradient checkpointing) -> factor
    (False, False): 1.5,
    (False, True): 2.0,  # not measured (no float row with checkpointing): between the two measured neighbours
    (True, False): 2.0,
    (True, True): 2.4,
}


@dataclasses.dataclass
class MemoryEstimate:
    """Predicted peak training memory of one run, in bytes, by part."""

    model: str
    method: str
    quantize: str | None
    batch_size: int
    max_length: int
    gradient_checkpointing: bool
    total_parameters: int
    trainable_parameters: int
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    workspace_bytes: int
    runtime_bytes: int
    allocator_bytes: int = 0
    available_bytes: int | None = None  # memory available on this machine when estimated

    @property
    def peak_bytes(self) -> int:
        return (self.runtime_bytes + self.weights_bytes + self.gradients_bytes + self.optimizer_bytes
                + self.activations_bytes + self.workspace_bytes + self.allocator_bytes)

    @property
    def fits(self) -> bool | None:
        return None if self.available_bytes is None else self.peak_bytes <= self.available_bytes

    def setting(self) -> str:
        """The `peftkit train` options this estimate is for, e.g. '--method lora --quantize nf4'."""
        parts = [f"--method {self.method}"]
        if self.quantize:
            parts.append(f"--quantize {self.quantize}")
        if self.gradient_checkpointing:
            parts.append("--gradient-checkpointing")
        parts.append(f"--batch-size {self.batch_size} --max-length {self.max_length}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "peak_bytes": self.peak_bytes, "fits": self.fits}


def gib(count: float) -> str:
    return f"{count / 2**30:.2f} GiB"


# --------------------------------------------------------------------------- the model, from its config


def load_model_config(model: str | os.PathLike):
    """(transformers config, kind) for a built-in model name, a model folder or a config.json file.

    kind is "causal" for a causal LM (its architectures name *ForCausalLM / *LMHeadModel), else "encoder".
    Reads no weights (the built-in smollm2 is converted once into the cache, as for training).
    """
    import transformers

    from peftkit import zoo

    path = Path(model).expanduser()
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise PeftkitError(f"{path} is not a valid JSON config file ({error})") from None
        if not isinstance(data, dict) or "model_type" not in data:
            raise PeftkitError(f"{path} has no \"model_type\"; give a Hugging Face config.json (e.g. from a model folder)")
        model_type = data.pop("model_type")
        try:
            config = transformers.AutoConfig.for_model(model_type, **data)
        except (ValueError, KeyError) as error:
            raise PeftkitError(f"{path}: transformers does not know model_type {model_type!r} ({error})") from None
        architectures = data.get("architectures") or []
    else:
        folder = zoo.resolve_model(str(model))  # a clear error for an unknown name or a folder without config.json
        config = transformers.AutoConfig.from_pretrained(folder)
        architectures = getattr(config, "architectures", None) or []
    causal = any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures)
    return config, "causal" if causal else "encoder"


def weightless_model(config, kind: str, dtype=None, num_labels: int = 2):
    """The model of `config` on the meta device: every parameter shaped, none allocated."""
    import torch
    import transformers

    dtype = dtype or torch.float32
    with torch.device("meta"):
        if kind == "causal":
            return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        config.num_labels = num_labels
        return transformers.AutoModelForSequenceClassification.from_config(config, dtype=dtype)


def _method_config(method: str, kind: str, method_options: dict | None):
    from peftkit.registry import causal_method_config, list_methods, method_config

    if method not in list_methods():
        raise PeftkitError(f"unknown method {method!r}; methods: {', '.join(list_methods())}")
    options = method_options or {}
    return causal_method_config(method, **options) if kind == "causal" else method_config(method, **options)


# --------------------------------------------------------------------------- counting


def tensor_bytes(tensors) -> int:
    """Bytes of tensors, each counted once (tied weights are one tensor)."""
    unique = {id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


def _checkpointed_blocks(model) -> list:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def saved_activation_bytes(model, kind: str, batch_size: int, max_length: int, gradient_checkpointing: bool) -> tuple[int, int]:
    """(bytes autograd saves in one training forward, bytes of the largest saved tensor), on meta tensors.

    With `gradient_checkpointing`, a checkpointed block keeps its input instead of what it saves, and the
    largest block's saved tensors are counted once more (its recomputation in the backward pass).
    """
    import torch

    current: list[int | None] = [None]  # the block running now, or None
    saved: dict[int, tuple[int | None, int]] = {}  # id of a saved tensor's storage owner -> (block, bytes)
    block_inputs: dict[int, int] = {}

    weights = {id(t) for t in [*model.parameters(), *model.buffers()]}  # saved weights are counted as weights

    def pack(tensor):
        owner = tensor._base if tensor._base is not None else tensor
        if id(owner) not in weights:
            saved.setdefault(id(owner), (current[0], owner.numel() * owner.element_size()))
        return tensor

    blocks = _checkpointed_blocks(model)
    handles = []
    for index, block in enumerate(blocks):
        def enter(module, args, kwargs, index=index):
            current[0] = index
            hidden = args[0] if args else next(iter(kwargs.values()))
            block_inputs[index] = hidden.numel() * hidden.element_size()

        def leave(module, args, output):
            current[0] = None

        handles.append(block.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(block.register_forward_hook(leave))
    input_ids = torch.zeros(batch_size, max_length, dtype=torch.long, device="meta")
    labels = input_ids if kind == "causal" else torch.zeros(batch_size, dtype=torch.long, device="meta")
    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(input_ids=input_ids, labels=labels)  # no attention mask: meta tensors cannot be inspected
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    largest = max((size for _, size in saved.values()), default=0)
    if not gradient_checkpointing or not blocks:
        return sum(size for _, size in saved.values()), largest
    outside = sum(size for block, size in saved.values() if block is None)
    per_block = [0] * len(blocks)
    for block, size in saved.values():
        if block is not None:
            per_block[block] += size
    return outside + sum(block_inputs.values()) + max(per_block), largest


def _dequantize_scratch_values(model) -> int:
    """Values of the reused dequantization buffers a training step keeps: one per distinct layer size."""
    from peftkit.quantize import QuantizedLinear

    return sum({m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear)})


def estimate_training_memory(model: str | os.PathLike, method: str = "lora", *, quantize: str | None = None,
                             batch_size: int = 1, max_length: int = 256, gradient_checkpointing: bool = False,
                             method_options: dict | None = None, config=None, dtype=None,
                             available_bytes: int | None = None) -> MemoryEstimate:
    """Predict the peak memory of training `method` on `model` (a built-in name, a folder or a config.json).

    `method_options` are the method's config fields (e.g. {"r": 16}); `config` a ready PeftConfig instead.
    `dtype` the weights' dtype (float32 by default, as `peftkit train` loads them). `available_bytes`
    defaults to `available_memory_bytes()`. Raises PeftkitError for an unknown model, a bad config file, an
    unknown method or a method that cannot apply to the model.
    """
    import torch

    from peftkit.model import get_peft_model
    from peftkit.quantize import QuantizedLinear, check_method, check_scheme, quantize_model

    for name, value in (("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PeftkitError(f"{name} must be a whole number >= 1, got {value!r}")
    if quantize is not None:
        check_method(method)
        check_scheme(quantize, 64)
    model_config, kind = load_model_config(model)
    peft_config = config or _method_config(method, kind, method_options)
    base = weightless_model(model_config, kind, dtype=dtype)
    if quantize:
        quantize_model(base, quantize, task_type="CAUSAL_LM" if kind == "causal" else "SEQ_CLS")
    with torch.random.fork_rng(devices=[]):
        wrapped = get_peft_model(base, peft_config)
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    weights = tensor_bytes([*wrapped.parameters(), *wrapped.buffers()])
    trainable_bytes = tensor_bytes(trainable)
    activations, largest = saved_activation_bytes(wrapped, kind, batch_size, max_length, gradient_checkpointing)
    workspace = 2 * largest + DEQUANTIZE_BYTES_PER_VALUE * _dequantize_scratch_values(wrapped)
    return MemoryEstimate(
        model=str(model), method=method, quantize=quantize, batch_size=batch_size, max_length=max_length,
        gradient_checkpointing=gradient_checkpointing,
        total_parameters=sum(p.numel() for p in {id(p): p for p in wrapped.parameters()}.values())
        + sum(m.in_features * m.out_features for m in wrapped.modules() if isinstance(m, QuantizedLinear)),
        trainable_parameters=sum(p.numel() for p in {id(p): p for p in trainable}.values()),
        weights_bytes=weights, gradients_bytes=trainable_bytes, optimizer_bytes=ADAM_STATES * trainable_bytes,
        activations_bytes=activations, workspace_bytes=workspace, runtime_bytes=RUNTIME_BYTES,
        allocator_bytes=int((TRANSIENT_FACTORS[bool(quantize), bool(gradient_checkpointing)] - 1) * (activations + workspace)),
        available_bytes=available_memory_bytes() if available_bytes is None else available_bytes,
    )


# --------------------------------------------------------------------------- this machine


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1.5GB' or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b|b)?\s*", text.lower())
    if match is None:
        raise PeftkitError(f"cannot read {text!r} as a memory size; write e.g. 2GiB, 512MiB or a number of bytes")
    number, unit = match.groups()
    unit = unit or "b"
    power = " kmgt".index(unit[0]) if unit != "b" else 0
    return int(float(number) * (1024 if "i" in unit else 1000) ** power)


def available_memory_bytes() -> int | None:
    """Memory a new process can use now: $PEFTKIT_AVAILABLE_MEMORY if set, else MemAvailable of
    /proc/meminfo (Linux), else psutil's figure where psutil is installed, else None (unknown)."""
    override = os.environ.get(AVAILABLE_MEMORY_VARIABLE)
    if override:
        return parse_bytes(override)
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


# Cheaper settings, tried in order until one fits: what `peftkit train` suggests when a run will not fit.
CHEAPER_SETTINGS = (
    dict(method="lora"),
    dict(method="lora", quantize="nf4"),
    dict(method="lora", quantize="nf4", gradient_checkpointing=True),
    dict(method="lora", quantize="nf4", gradient_checkpointing=True, batch_size=1),
)


def cheaper_setting(estimate: MemoryEstimate) -> MemoryEstimate | None:
    """The first of CHEAPER_SETTINGS that fits where `estimate` does not (same model and lengths), or None."""
    if estimate.available_bytes is None:
        return None
    for change in CHEAPER_SETTINGS:
        settings = dict(method=estimate.method, quantize=estimate.quantize, batch_size=estimate.batch_size,
                        gradient_checkpointing=estimate.gradient_checkpointing)
        settings.update(change)
        if settings == dict(method=estimate.method, quantize=estimate.quantize, batch_size=estimate.batch_size,
                            gradient_checkpointing=estimate.gradient_checkpointing):
            continue
        candidate = estimate_training_memory(estimate.model, max_length=estimate.max_length,
                                             available_bytes=estimate.available_bytes, **settings)
        if candidate.fits:
            return candidate
    return None


def describe(estimate: MemoryEstimate) -> list[tuple[str, str]]:
    """(label, value) rows for printing an estimate."""
    rows = [
        ("model", estimate.model),
        ("setting", estimate.setting()),
        ("parameters", f"{estimate.total_parameters:,d}"),
        ("trainable parameters", f"{estimate.trainable_parameters:,d} "
                                 f"({100 * estimate.trainable_parameters / max(estimate.total_parameters, 1):.4f}%)"),
        ("weights", gib(estimate.weights_bytes)),
        ("gradients", gib(estimate.gradients_bytes)),
        ("optimizer state (AdamW)", gib(estimate.optimizer_bytes)),
        ("activations", gib(estimate.activations_bytes)),
        ("backward workspace", gib(estimate.workspace_bytes)),
        ("allocator (measured)", gib(estimate.allocator_bytes)),
        ("runtime (Python, torch)", gib(estimate.runtime_bytes)),
        ("predicted peak", gib(estimate.peak_bytes)),
    ]
    if estimate.available_bytes is None:
        rows.append(("verdict", "unknown: this machine does not say how much memory is available"))
    else:
        verdict = "fits" if estimate.fits else "does NOT fit"
        rows.append(("verdict", f"{verdict} in the {gib(estimate.available_bytes)} available now"))
    return rows
