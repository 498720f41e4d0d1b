"""Images in, pixel tensors out: reading (Pillow), the model's preprocessing, light augmentation, batching.

Preprocessing is the standard ImageNet evaluation transform: resize the shorter side to
`resize_size` (bicubic), crop `image_size` x `image_size` from the centre, scale to [0, 1] and
normalize with the model's mean and std. `ImagePreprocessor` holds those numbers and saves them as
`preprocessor_config.json` with Hugging Face's field names (`image_mean`, `image_std`, `size`,
`crop_size`), so a run folder or a merged model carries the preprocessing its weights need.

Augmentation (training only, both off unless asked for): `random_crop` takes the `image_size`
crop at a random place of the resized image instead of its centre, `flip` mirrors half of the
images left to right (wrong for digits and text, right for most photos). Both draw from torch's
global random state, which the training loop seeds and checkpoints.

Every problem with an image file (missing, not an image, damaged, a mode that has no faithful
RGB form such as 16-bit or float) is a PeftkitError naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from peftkit import io
from peftkit.errors import PeftkitError
from peftkit.extras import require

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# Pillow modes with a faithful 8-bit RGB conversion. "I", "I;16" and "F" (16/32-bit integer and float
# pixels) would be clipped at 255 by Pillow's conversion, silently wrong: they are refused instead.
_CONVERTIBLE_MODES = ("RGB", "RGBA", "RGBX", "L", "LA", "La", "P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV")


def _pillow():
    return require("PIL.Image", "reading images")


def read_image(path: str | os.PathLike):
    """The image at `path` as an 8-bit RGB PIL image (first frame of an animation), fully decoded."""
    image_module = _pillow()
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", image_module.DecompressionBombWarning)
            with image_module.open(path) as image:
                image.load()
                return to_rgb(image, str(path))
    except FileNotFoundError:
        raise PeftkitError(f"{path}: no such image file") from None
    except IsADirectoryError:
        raise PeftkitError(f"{path}: is a folder, not an image file") from None
    except PermissionError:
        raise PeftkitError(f"{path}: cannot be read (permission denied)") from None
    except image_module.UnidentifiedImageError:
        raise PeftkitError(f"{path}: not an image Pillow can read (supported: {', '.join(IMAGE_SUFFIXES)})") from None
    except (image_module.DecompressionBombError, image_module.DecompressionBombWarning) as error:
        raise PeftkitError(f"{path}: refused, too many pixels ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:  # truncated or corrupt data, unreadable file
        raise PeftkitError(f"{path}: the image cannot be decoded ({error}); the file is damaged or truncated") from None


def to_rgb(image, where: str):
    """An 8-bit RGB copy of a PIL image; refuses modes whose RGB form would be wrong."""
    if image.mode == "RGB":
        return image.copy()
    if image.mode not in _CONVERTIBLE_MODES:
        raise PeftkitError(f"{where}: image mode {image.mode!r} (16-bit or floating-point pixels) has no faithful 8-bit "
                           "RGB form; save it as an 8-bit image (RGB or grayscale)")
    return image.convert("RGB")


def image_from_array(pixels: np.ndarray, where: str):
    """A PIL RGB image from a uint8 array [H, W] (grayscale) or [H, W, 3]."""
    image_module = _pillow()
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3):
        raise PeftkitError(f"{where}: expected uint8 pixels of shape [H, W] or [H, W, 3], got {pixels.dtype} {pixels.shape}")
    return image_module.fromarray(pixels).convert("RGB")


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Training-time changes of the images: a random crop position and / or a random left-right flip."""

    random_crop: bool = False
    flip: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ImagePreprocessor:
    """How images become the model's input: pixel_values float32 [3, image_size, image_size]."""

    image_size: int = 224
    resize_size: int = 256  # the shorter side before the crop; image_size / 0.875 as in ImageNet evaluation
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self):
        if self.image_size < 8 or self.resize_size < self.image_size:
            raise PeftkitError(f"image size {self.image_size} / resize size {self.resize_size}: need 8 <= image size <= "
                               "resize size")

    def with_image_size(self, image_size: int) -> ImagePreprocessor:
        """The same preprocessing at another input size (the resize keeps the crop's share of the image)."""
        return dataclasses.replace(self, image_size=image_size,
                                   resize_size=max(image_size, round(image_size * self.resize_size / self.image_size)))

    def pixels(self, image, augmentation: Augmentation | None = None) -> torch.Tensor:
        """A PIL RGB image -> normalized float32 [3, image_size, image_size]."""
        image_module = _pillow()
        width, height = image.size
        scale = self.resize_size / min(width, height)
        size = (max(self.image_size, round(width * scale)), max(self.image_size, round(height * scale)))
        image = image.resize(size, image_module.Resampling.BICUBIC)
        room_x, room_y = size[0] - self.image_size, size[1] - self.image_size
        if augmentation is not None and augmentation.random_crop:
            left, top = (int(torch.randint(0, room + 1, ())) for room in (room_x, room_y))
        else:
            left, top = room_x // 2, room_y // 2
        image = image.crop((left, top, left + self.image_size, top + self.image_size))
        array = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
        if augmentation is not None and augmentation.flip and bool(torch.rand(()) < 0.5):
            array = array.flip(-1)
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        return array.sub_(mean).div_(std)

    # -- files: Hugging Face's preprocessor_config.json fields ----------------------------------
    def to_dict(self) -> dict:
        return {"image_processor_type": "ViTImageProcessor", "do_resize": True, "do_rescale": True, "do_normalize": True,
                "rescale_factor": 1 / 255, "image_mean": list(self.image_mean), "image_std": list(self.image_std),
                "size": {"shortest_edge": self.resize_size}, "crop_size": {"height": self.image_size, "width": self.image_size},
                "do_center_crop": True, "resample": 3}

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write preprocessor_config.json into `folder` (what a model folder carries; merge writes it too)."""
        io.write_json(Path(folder) / PREPROCESSOR_CONFIG_NAME, self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping, where: str) -> ImagePreprocessor:
        """From a Hugging Face preprocessor config (ViT, ResNet, ConvNeXt, EfficientNet styles)."""
        try:
            mean = tuple(float(x) for x in data.get("image_mean", cls.image_mean))
            std = tuple(float(x) for x in data.get("image_std", cls.image_std))
            crop = data.get("crop_size") or {}
            size = data.get("size") or {}
            if isinstance(size, int):
                size = {"shortest_edge": size}
            if isinstance(crop, int):
                crop = {"height": crop}
            if crop and data.get("do_center_crop", True):
                image_size = int(crop.get("height") or crop.get("shortest_edge"))
                resize = int(size.get("shortest_edge") or size.get("height") or image_size)
            else:  # no centre crop: the resize gives the input size itself (ViT: size {"height": 224, "width": 224})
                image_size = int(size.get("height") or size.get("shortest_edge") or 224)
                resize = image_size
        except (TypeError, ValueError, AttributeError) as error:
            raise PeftkitError(f"{where}: cannot read the image preprocessing from it ({error})") from None
        if len(mean) == 1:
            mean, std = mean * 3, std * 3
        return cls(image_size=image_size, resize_size=max(resize, image_size), image_mean=mean, image_std=std)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, default: ImagePreprocessor | None = None) -> ImagePreprocessor:
        """The preprocessing a model folder's preprocessor_config.json describes, else `default` (or ImageNet's)."""
        path = Path(folder) / PREPROCESSOR_CONFIG_NAME
        if not path.is_file():
            return default or cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise PeftkitError(f"{path}: not readable JSON ({error})") from None
        return cls.from_dict(data, str(path))


class ImageCollator:
    """Turns a list of image features into a batch: "pixel_values" float32 [batch, 3, S, S] and "labels" [batch].

    A feature is {"image": path or uint8 array, "labels": int, "augment": bool}; images are read
    and preprocessed here, per batch, so a data set never sits in memory as float tensors.
    """

    def __init__(self, preprocessor: ImagePreprocessor, augmentation: Augmentation | None = None):
        self.preprocessor = preprocessor
        self.augmentation = augmentation if augmentation and (augmentation.flip or augmentation.random_crop) else None

    def __call__(self, features: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        pixels = [self.preprocessor.pixels(load_image(f["image"]), self.augmentation if f.get("augment") else None)
                  for f in features]
        batch = {"pixel_values": torch.stack(pixels)}
        if "labels" in features[0]:
            batch["labels"] = torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
        return batch


def load_image(source) -> object:
    """A PIL RGB image from a path or an in-memory uint8 array."""
    if isinstance(source, np.ndarray):
        return image_from_array(source, "an in-memory image")
    return read_image(source)


def image_features(examples, augment: bool = False) -> list[dict]:
    """Features for ImageCollator from ImageExamples: {"image", "labels", "augment"}."""
    return [{"image": example.image, "labels": example.label, "augment": augment} for example in examples]
