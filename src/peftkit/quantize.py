"""A quantized frozen base (QLoRA-style): linear weights stored as 4-bit NF4 or int8, adapters on top.

`quantize_model(model, "nf4")` replaces the frozen nn.Linear layers of a model, in place, by
`QuantizedLinear` layers that hold only packed codes and scales; `forward` dequantizes the weight
(to the input's dtype) and calls F.linear, in the backward pass too, so no dequantized weight is
kept between layers. Adapters then target these layers like any nn.Linear.

Formats (the weight is flattened row-major, (out, in) -> (out * in,), and cut into blocks of
`block_size` values; the last block is padded with zeros, so any shape works):

- "nf4": each value becomes the index of the nearest of the 16 NormalFloat levels of the QLoRA
  paper (Dettmers et al., 2023) after dividing its block by the block's absolute maximum (absmax).
  Two codes share a byte, the first value of a pair in the high nibble. This is bitsandbytes' NF4
  layout (codes, one float32 absmax per block), so on CUDA, where bitsandbytes is installed, its
  kernel dequantizes the same stored tensors.
- "int8": each value is round(127 * value / absmax) in int8, one absmax per block (blocks, not rows:
  the same padding and scale code serve both formats, and smaller blocks follow outliers better).
- double quantization (`double_quant=True`, QLoRA's): the float32 absmax values themselves are
  stored as 8-bit codes: their mean is subtracted (a float32 offset), then each block of 256 is
  scaled by its own absolute maximum (float32) onto a signed linear table of 256 levels, level k =
  (k - 127) / 127. (QLoRA uses bitsandbytes' dynamic 8-bit map for this table; a linear one is
  simpler to state and its error is within a step of 1/127 of a scale block's spread.)

Stored per layer (buffers, so state_dict and safetensors hold them; nothing requires grad):
`codes` (uint8 for NF4, int8 for int8), and either `absmax` (float32, one per block) or `absmax_codes` (uint8) +
`absmax_scale` (float32, one per 256 blocks) + `absmax_offset` (float32). The bias stays a frozen float parameter.

Merging an adapter into a quantized layer dequantizes the weight, lets the adapter add its update to
that float copy, and requantizes the result; the error this introduces is measured against the exact float sum and
kept on the layer (`merge_error_report`). Unmerging restores the codes saved before the merge bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.errors import PeftkitError

SCHEMES = ("nf4", "int8")
# The 16 NormalFloat levels (QLoRA, appendix E; the values bitsandbytes uses), ascending.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
SCALE_BLOCK_SIZE = 256  # absmax values per second-level scale (QLoRA's choice)
# bitsandbytes' 4-bit kernels accept these block sizes; other sizes dequantize in PyTorch.
BITSANDBYTES_BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)
# Methods whose training changes the quantized weights themselves, which the codes cannot hold.
METHODS_NEEDING_FLOAT_WEIGHTS = {
    "full": "full fine-tuning trains every weight of the base, and a quantized base has no float weights to "
            "train (nothing would stay frozen). Train without --quantize, or pick an adapter method such as lora",
    "freeze": "layer-wise freezing trains copies of whole blocks, and the linear weights inside a quantized "
              "block are fixed codes that cannot train. Train without --quantize, or use lora",
    "sparse": "sparse fine-tuning trains chosen entries of the base weights themselves (and scores them by "
              "their gradients), which quantized codes cannot hold. Train without --quantize, or use lora",
}


def nf4_levels(device=None) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def _nf4_pair_table(device) -> torch.Tensor:
    """(256, 2): the two NF4 values each byte stands for, high nibble first."""
    levels = nf4_levels(device)
    byte = torch.arange(256, device=device)
    return torch.stack((levels[byte >> 4], levels[byte & 15]), dim=1)


def scale_levels(device=None) -> torch.Tensor:
    """(256,) the signed linear table of the second-level (absmax) codes: (k - 127) / 127, k = 255 -> 1."""
    return ((torch.arange(256, dtype=torch.float32, device=device) - 127).clamp(max=127)) / 127


def check_scheme(scheme: str, block_size: int) -> None:
    if scheme not in SCHEMES:
        raise PeftkitError(f"unknown quantization scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2 or block_size % 2:
        raise PeftkitError(
            f"block_size must be an even integer >= 2 (values per absmax scale; 64 is QLoRA's), got {block_size!r}"
        )


def _blocks(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """The weight flattened row-major and padded with zeros: (blocks, block_size), float32."""
    flat = weight.detach().reshape(-1).float()
    padding = -flat.numel() % block_size
    if padding:
        flat = F.pad(flat, (0, padding))
    return flat.view(-1, block_size)


# Values quantized at once: a large weight is quantized in slices of whole blocks, so the float32 and index
# copies that quantizing makes stay small (about 17 bytes per value of a slice) whatever the layer's size.
QUANTIZE_SLICE_VALUES = 2**20


def quantize_blockwise(weight: torch.Tensor, scheme: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax) of `weight` (any shape, n values).

    NF4: codes uint8 (blocks * block_size / 2,), two 4-bit indices per byte, first in the high nibble.
    int8: codes int8 (blocks * block_size,). absmax: float32 (blocks,), blocks = ceil(n / block_size).
    """
    check_scheme(scheme, block_size)
    flat = weight.detach().reshape(-1)
    step = max(block_size, QUANTIZE_SLICE_VALUES - QUANTIZE_SLICE_VALUES % block_size)
    if flat.numel() <= step:
        return _quantize_slice(flat, scheme, block_size)
    # Every slice but the last holds whole blocks, so the result is the same as quantizing the whole at once.
    parts = [_quantize_slice(flat[start:start + step], scheme, block_size) for start in range(0, flat.numel(), step)]
    return torch.cat([codes for codes, _ in parts]), torch.cat([absmax for _, absmax in parts])


def _quantize_slice(weight: torch.Tensor, scheme: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = _blocks(weight, block_size)
    absmax = blocks.abs().amax(dim=1)
    # An all-zero block keeps absmax 0 (it dequantizes to zeros); divide by 1 instead of 0.
    scaled = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    if scheme == "int8":
        return torch.round(scaled * 127).clamp(-127, 127).to(torch.int8).reshape(-1), absmax
    levels = nf4_levels(weight.device)
    # Nearest level: count the midpoints below each value (ties go to the lower level).
    indices = torch.bucketize(scaled.reshape(-1), (levels[1:] + levels[:-1]) / 2).to(torch.uint8)
    return (indices[0::2] << 4) | indices[1::2], absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, scheme: str, block_size: int,
                         numel: int, scratch: bool = False) -> torch.Tensor:
    """The first `numel` values that (codes, absmax) stand for: float32 (numel,).

    scratch=True writes them into this thread's reusable buffer for that size (see `_scratch`): the result
    is only valid until the next scratch dequantization of the same size in this thread.
    """
    # index_select with int32 indices and an in-place scale: half the time of table[codes.long()] * absmax
    # (no int64 index copy, one float tensor instead of two); the same values, bit for bit.
    if scheme == "nf4":
        if scratch:
            indices = _scratch("indices", codes.numel(), torch.int32, codes.device).copy_(codes)
            pairs = _scratch("values", 2 * codes.numel(), torch.float32, codes.device).view(-1, 2)
            values = torch.index_select(_nf4_pair_table(codes.device), 0, indices, out=pairs).view(-1, block_size)
        else:
            values = _nf4_pair_table(codes.device).index_select(0, codes.int()).view(-1, block_size)
        values.mul_(absmax.float()[:, None])
    else:
        values = _scratch("values", codes.numel(), torch.float32, codes.device).copy_(codes) if scratch else codes.float()
        values = values.view(-1, block_size)
        values.div_(127).mul_(absmax.float()[:, None])
    return values.reshape(-1)[:numel]


_SCRATCH = threading.local()


def _scratch(kind: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This thread's reusable buffer of `numel` values (one per kind, size, dtype and device).

    A training step dequantizes every frozen weight twice (three times with gradient checkpointing) and
    drops it at once; a fresh tensor each time costs page faults and leaves the CPU allocator holding
    freed blocks. A model has a few distinct layer sizes, so a few buffers serve all its layers.
    """
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    key = (kind, numel, dtype, device)
    buffer = buffers.get(key)
    if buffer is None:
        buffer = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer


def quantize_scales(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization of the absmax values (blocks,): (codes uint8 (blocks,), scale float32
    (ceil(blocks / 256),), offset float32 ())."""
    offset = absmax.float().mean()
    centred = _blocks(absmax.float() - offset, SCALE_BLOCK_SIZE)
    scale = centred.abs().amax(dim=1)
    scaled = centred / torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
    codes = (torch.round(scaled * 127) + 127).to(torch.uint8).reshape(-1)[: absmax.numel()]
    return codes, scale, offset


def dequantize_scales(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The absmax values (blocks,) float32 that (codes, scale, offset) stand for."""
    values = scale_levels(codes.device)[codes.long()]
    padding = -values.numel() % SCALE_BLOCK_SIZE
    values = F.pad(values, (0, padding)).view(-1, SCALE_BLOCK_SIZE) * scale.float()[:, None]
    return values.reshape(-1)[: codes.numel()] + offset.float()


class _QuantizedMatmul(torch.autograd.Function):
    """x @ W.T with W dequantized in forward and again in backward, so autograd keeps no float weight."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer, ctx.input_dtype = layer, x.dtype
        return F.linear(x, layer.dequantize(x.dtype, scratch=True))

    @staticmethod
    def backward(ctx, grad_output):
        weight = ctx.layer.dequantize(grad_output.dtype, scratch=True)
        return (grad_output @ weight).to(ctx.input_dtype), None


class QuantizedLinear(nn.Linear):
    """A frozen linear layer whose weight (out_features, in_features) is stored quantized.

    A subclass of nn.Linear, as bitsandbytes' Linear4bit is, so that every method treats it as a
    linear layer; `weight` is a property that returns a freshly dequantized (out, in) tensor, for
    code that reads the weight (LoRA's shapes, DoRA's norm). Writing into it changes nothing, which
    is why merging goes through `merge_requantized`.
    """

    is_quantized = True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scheme: str = "nf4", block_size: int = 64,
                 double_quant: bool = True):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a float weight
        check_scheme(scheme, block_size)
        if weight.dim() != 2:
            raise PeftkitError(f"QuantizedLinear needs a 2-d weight (out_features, in_features), got {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.scheme, self.block_size, self.double_quant = scheme, block_size, bool(double_quant)
        self.compute_dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False))
        self.merge_error: dict | None = None
        self._store(weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str = "nf4", block_size: int = 64,
                    double_quant: bool = True) -> QuantizedLinear:
        return cls(linear.weight, linear.bias, scheme, block_size, double_quant)

    @torch.no_grad()
    def _store(self, weight: torch.Tensor) -> None:
        """Quantize `weight` (out, in) into this layer's buffers, replacing what they held."""
        codes, absmax = quantize_blockwise(weight, self.scheme, self.block_size)
        self.register_buffer("codes", codes)
        if self.double_quant:
            absmax_codes, absmax_scale, absmax_offset = quantize_scales(absmax)
            self.register_buffer("absmax_codes", absmax_codes)
            self.register_buffer("absmax_scale", absmax_scale)
            self.register_buffer("absmax_offset", absmax_offset)
        else:
            self.register_buffer("absmax", absmax)

    def block_absmax(self) -> torch.Tensor:
        """The absmax of every block (blocks,), float32 (decoded when double-quantized)."""
        if self.double_quant:
            return dequantize_scales(self.absmax_codes, self.absmax_scale, self.absmax_offset)
        return self.absmax.float()

    def dequantize(self, dtype: torch.dtype | None = None, scratch: bool = False) -> torch.Tensor:
        """The weight (out_features, in_features) in `dtype` (default: the dtype it was quantized from).

        scratch=True (the forward and backward passes, which use the weight at once and keep nothing) may
        return a view of a reused buffer on the CPU, valid only until the next dequantization of a layer of
        the same size in this thread.
        """
        dtype = dtype or self.compute_dtype
        absmax = self.block_absmax()
        if self.scheme == "nf4" and self.codes.is_cuda and self.block_size in BITSANDBYTES_BLOCK_SIZES:
            weight = _bitsandbytes_dequantize(self.codes, absmax, self.block_size, (self.out_features, self.in_features), dtype)
            if weight is not None:
                return weight
        numel = self.out_features * self.in_features
        flat = dequantize_blockwise(self.codes, absmax, self.scheme, self.block_size, numel,
                                    scratch=scratch and self.codes.device.type == "cpu")
        return flat.view(self.out_features, self.in_features).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    @weight.setter
    def weight(self, value) -> None:
        raise PeftkitError("a QuantizedLinear's weight is stored as codes; quantize a new weight with requantize(weight)")

    def reset_parameters(self) -> None:  # nn.Linear's would draw a new float weight
        raise PeftkitError("a QuantizedLinear holds a fixed quantized weight; it cannot be re-initialised")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            output = _QuantizedMatmul.apply(x, self)
        else:
            output = F.linear(x, self.dequantize(x.dtype, scratch=True))
        return output if self.bias is None else output + self.bias.to(output.dtype)

    def weight_bytes(self) -> int:
        """Bytes of the stored weight: codes plus scales (the bias is not counted)."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers(recurse=False))

    @torch.no_grad()
    def requantize(self, weight: torch.Tensor) -> None:
        """Replace the stored weight by `weight` (out_features, in_features), quantized with this layer's format."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise PeftkitError(f"requantize needs a weight of shape {(self.out_features, self.in_features)}, got {tuple(weight.shape)}")
        device = self.codes.device
        self._store(weight.to(device))

    def quantized_state(self) -> dict[str, torch.Tensor]:
        """Copies of the stored tensors (codes, scales, bias), for restoring them exactly later."""
        state = {name: buffer.clone() for name, buffer in self.named_buffers(recurse=False)}
        if self.bias is not None:
            state["bias"] = self.bias.detach().clone()
        return state

    @torch.no_grad()
    def load_quantized_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, tensor in state.items():
            if name == "bias":
                self.bias.copy_(tensor)
            else:
                self.register_buffer(name, tensor.clone())

    @torch.no_grad()
    def merge_requantized(self, merge: Callable[[nn.Linear], None], owner: nn.Module) -> dict:
        """Merge an adapter into this layer: dequantize, let `merge` add the update to a float copy,
        requantize. The codes before the merge are kept on `owner` (the adapter's delta) for unmerging.
        Returns (and keeps as `merge_error`) the error of the requantized weight against the float sum.
        """
        float_layer = _float_linear(self, torch.float32)
        before = float_layer.weight.detach().clone()
        merge(float_layer)
        exact = float_layer.weight.detach()
        owner._quantized_base_before_merge = (self.quantized_state(), self.merge_error)
        self.requantize(exact)
        if self.bias is not None:
            self.bias.copy_(float_layer.bias.to(self.bias.dtype))
        error = (self.dequantize(torch.float32) - exact).double()
        update = (exact - before).double()
        self.merge_error = {
            "max_abs_error": float(error.abs().max()),
            "mean_abs_error": float(error.abs().mean()),
            "error_sq": float(error.square().sum()),
            "weight_sq": float(exact.double().square().sum()),
            "update_sq": float(update.square().sum()),
            "values": exact.numel(),
        }
        return self.merge_error

    @torch.no_grad()
    def restore_before_merge(self, owner: nn.Module) -> None:
        """Undo `merge_requantized(..., owner)` exactly, from the codes it saved."""
        saved = getattr(owner, "_quantized_base_before_merge", None)
        if saved is None:
            raise PeftkitError("this adapter was not merged into this quantized layer; nothing to unmerge")
        state, self.merge_error = saved
        self.load_quantized_state(state)
        del owner._quantized_base_before_merge

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.scheme}, block_size={self.block_size}, double_quant={self.double_quant}")


def _bitsandbytes_dequantize(codes, absmax, block_size, shape, dtype) -> torch.Tensor | None:
    """bitsandbytes' CUDA NF4 kernel on the same codes and (decoded) absmax; None where it is not installed."""
    try:
        from bitsandbytes import functional as bnb_functional
    except ImportError:
        return None
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return None
    out = torch.empty(shape, dtype=dtype, device=codes.device)
    return bnb_functional.dequantize_4bit(codes, absmax=absmax.float().contiguous(), out=out, blocksize=block_size,
                                          quant_type="nf4")


@dataclasses.dataclass
class QuantizationReport:
    """What quantize_model did: which layers it quantized, which it left in float and why, and bytes."""

    scheme: str
    block_size: int
    double_quant: bool
    quantized: list[str]
    skipped: dict[str, str]  # module path -> why it stays in float
    float_bytes: int  # the quantized layers' weights as they were (their dtype)
    quantized_bytes: int  # the same weights now: codes + scales

    @property
    def ratio(self) -> float:
        return self.quantized_bytes / self.float_bytes if self.float_bytes else 0.0

    def summary(self) -> str:
        skipped = ", ".join(f"{name} ({why})" for name, why in self.skipped.items()) or "none"
        return (f"quantized {len(self.quantized)} linear layers to {self.scheme} (block {self.block_size}, double quant "
                f"{'on' if self.double_quant else 'off'}): {self.float_bytes / 2**20:.1f} MiB -> "
                f"{self.quantized_bytes / 2**20:.1f} MiB ({self.ratio:.3f}x); left in float: {skipped}")

    def settings(self) -> dict:
        """The arguments that quantize a fresh copy of the base the same way (saved with a run)."""
        return {"scheme": self.scheme, "block_size": self.block_size, "double_quant": self.double_quant}


def _head_paths(model: nn.Module, task_type: str | None) -> dict[str, str]:
    from peftkit.targeting import CLASSIFIER_HEAD_NAMES, output_layer_names

    heads = {}
    for name, _module in model.named_modules():
        if name.rsplit(".", 1)[-1] in CLASSIFIER_HEAD_NAMES:
            heads[name] = "classification head (trained whole as modules_to_save)"
    for name in output_layer_names(model, task_type):
        heads.setdefault(name, "output layer (LM head)")
    return heads


def layers_to_quantize(model: nn.Module, skip: Iterable[str] = (), task_type: str | None = None) -> tuple[list[str], dict[str, str]]:
    """(paths of the nn.Linear layers quantize_model replaces, {path: why it stays in float} for the others).

    Works on a model whose weights are not allocated yet (meta device), so a loader can quantize each
    layer as it is made (peftkit.loading).
    """
    skip = list(skip)
    heads = _head_paths(model, task_type)
    chosen, skipped = [], {}
    for name, module in model.named_modules():
        if not name or isinstance(module, QuantizedLinear):
            continue
        under_head = next((h for h in heads if name == h or name.startswith(h + ".")), None)
        is_linear = isinstance(module, nn.Linear)
        if under_head is not None:
            if is_linear:
                skipped[name] = heads[under_head]
            continue
        parts = name.split(".")
        ancestors = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]  # the module and what holds it
        if any(a == s or a.endswith("." + s) for a in ancestors for s in skip):
            if is_linear:
                skipped[name] = "named in skip"
            continue
        if type(module).__name__ == "Conv1D":
            skipped[name] = "GPT-2 Conv1D (only nn.Linear is quantized)"
            continue
        if is_linear:
            chosen.append(name)
    return chosen, skipped


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: str = "nf4", block_size: int = 64, double_quant: bool = True,
                   skip: Iterable[str] = (), task_type: str | None = None) -> QuantizationReport:
    """Replace the model's nn.Linear layers in place by QuantizedLinear layers.

    Left in float, and named in the report: the output layer (LM head) and classification heads
    ("classifier" / "score" and what they contain), modules whose path equals or ends with a name in
    `skip` (or lies under one), and layers that are not nn.Linear (GPT-2's Conv1D, embeddings). Call it
    before adding adapters.
    """
    from peftkit.methods.base import AdaptedModule

    check_scheme(scheme, block_size)
    if any(isinstance(m, AdaptedModule) for m in model.modules()):
        raise PeftkitError("this model already carries adapters; quantize the base model first, then add adapters")
    chosen, skipped = layers_to_quantize(model, skip, task_type)
    quantized = []
    float_bytes = quantized_bytes = 0
    for name in chosen:
        module = model.get_submodule(name)
        layer = QuantizedLinear.from_linear(module, scheme, block_size, double_quant)
        float_bytes += module.weight.numel() * module.weight.element_size()
        quantized_bytes += layer.weight_bytes()
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child_name, layer)
        quantized.append(name)
    if not quantized:
        raise PeftkitError(
            f"{type(model).__name__} has no nn.Linear layer to quantize"
            + (f" (left in float: {', '.join(skipped)})" if skipped else "")
        )
    return QuantizationReport(scheme, block_size, bool(double_quant), quantized, skipped, float_bytes, quantized_bytes)


def quantized_layers(model: nn.Module):
    """(path, QuantizedLinear) pairs of a model, wrapped by adapters or not."""
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            yield name.replace(".base_layer", ""), module


def check_method(method: str) -> None:
    """Raise PeftkitError when `method` (a `peftkit train --method` name) cannot train on a quantized base."""
    if method in METHODS_NEEDING_FLOAT_WEIGHTS:
        raise PeftkitError(f"--quantize cannot be used with --method {method}: {METHODS_NEEDING_FLOAT_WEIGHTS[method]}")


def merge_error_report(model: nn.Module) -> dict:
    """The error merging introduced in each quantized layer, and over all of them.

    Per layer and overall: max_abs_error and mean_abs_error of the requantized weight against the
    exact float sum (dequantized base + update); relative_error = ||error|| / ||exact weight||; and
    update_relative_error = ||error|| / ||update||, the share of the adapter's update the
    requantization changed (Frobenius norms). Empty `layers` when nothing is merged into a quantized layer.
    """
    layers = {name: layer.merge_error for name, layer in quantized_layers(model) if layer.merge_error}
    summary = {"layers": {}, "max_abs_error": 0.0, "mean_abs_error": 0.0, "relative_error": 0.0,
               "update_relative_error": 0.0}
    if not layers:
        return summary
    for name, error in layers.items():
        summary["layers"][name] = {
            "max_abs_error": error["max_abs_error"], "mean_abs_error": error["mean_abs_error"],
            "relative_error": math.sqrt(error["error_sq"] / error["weight_sq"]) if error["weight_sq"] else 0.0,
            "update_relative_error": math.sqrt(error["error_sq"] / error["update_sq"]) if error["update_sq"] else math.inf,
        }
    error_sq = sum(e["error_sq"] for e in layers.values())
    update_sq = sum(e["update_sq"] for e in layers.values())
    weight_sq = sum(e["weight_sq"] for e in layers.values())
    values = sum(e["values"] for e in layers.values())
    summary["max_abs_error"] = max(e["max_abs_error"] for e in layers.values())
    summary["mean_abs_error"] = sum(e["mean_abs_error"] * e["values"] for e in layers.values()) / values
    summary["relative_error"] = math.sqrt(error_sq / weight_sq) if weight_sq else 0.0
    summary["update_relative_error"] = math.sqrt(error_sq / update_sq) if update_sq else math.inf
    return summary


def describe_merge_error(report: dict) -> str:
    """One line for users: the merge error over all quantized layers."""
    if not report["layers"]:
        return "no adapter was merged into a quantized layer"
    return (f"requantizing after the merge changed the weights of {len(report['layers'])} quantized layers by "
            f"{100 * report['relative_error']:.3f}% (relative, Frobenius; max abs {report['max_abs_error']:.3g}, "
            f"mean abs {report['mean_abs_error']:.3g}); that is {100 * report['update_relative_error']:.1f}% of the "
            "adapter's update")


@contextlib.contextmanager
def float_base_layer(module: nn.Module):
    """Inside the block, an adapted module (methods.base.AdaptedModule) whose base layer is quantized
    has a float nn.Linear copy of it instead (same values), so merges there are exact float additions;
    the quantized layer is put back afterwards, untouched. Other modules are left as they are."""
    quantized = getattr(module, "base_layer", None)
    if not isinstance(quantized, QuantizedLinear):
        yield module
        return
    module.base_layer = _float_linear(quantized, torch.float32)
    try:
        yield module
    finally:
        module.base_layer = quantized


@torch.no_grad()
def _float_linear(layer: QuantizedLinear, dtype: torch.dtype) -> nn.Linear:
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=layer.codes.device,
                      dtype=dtype)
    plain.weight.copy_(layer.dequantize(dtype))
    if layer.bias is not None:
        plain.bias.copy_(layer.bias)
    return plain


@torch.no_grad()
def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every QuantizedLinear by a plain nn.Linear holding its dequantized weight (in place)."""
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, QuantizedLinear):
            continue
        plain = _float_linear(layer, layer.compute_dtype)
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child_name, plain)
    return model


def base_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes the model's weights hold: "quantized_linear" (codes + scales of its QuantizedLinear layers),
    "float_linear" (weights of the nn.Linear layers still in float, e.g. heads) and "whole_model" (every
    parameter and buffer, tied weights once)."""
    quantized = float_linear = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            quantized += module.weight_bytes()
        elif isinstance(module, nn.Linear):
            float_linear += module.weight.numel() * module.weight.element_size()
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    whole = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"quantized_linear": quantized, "float_linear": float_linear, "whole_model": whole}


def dequantize_merged(model: nn.Module) -> str | None:
    """For writing a merged model that transformers can load: None when the model holds no quantized
    layer; else replaces them (in place) by float layers holding the same requantized values and
    returns what the user should know (the merge error and that the file holds float weights)."""
    if not any(isinstance(m, QuantizedLinear) for m in model.modules()):
        return None
    report = merge_error_report(model)
    dequantize_model(model)
    return (f"merged into a quantized base: {describe_merge_error(report)}. The folder holds these requantized "
            "weights dequantized to float, so transformers loads it as a plain model")
