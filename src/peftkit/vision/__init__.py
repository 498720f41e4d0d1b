"""Image classification: the built-in EfficientNet-Lite0, image tasks (class folders, CSV / JSONL of paths, the
built-in mnist-5k), the model's preprocessing and light augmentation. The training job is
peftkit.train.image_job; docs/vision.md has the whole picture."""

from peftkit.vision.data import BUILTIN_IMAGE_TASKS, ImageExample, check_images, list_image_tasks, load_image_task
from peftkit.vision.images import Augmentation, ImageCollator, ImagePreprocessor, read_image
from peftkit.vision.models import LITE_PREPROCESSOR, load_image_classifier

__all__ = ["BUILTIN_IMAGE_TASKS", "LITE_PREPROCESSOR", "Augmentation", "ImageCollator", "ImageExample", "ImagePreprocessor",
           "check_images", "list_image_tasks", "load_image_classifier", "load_image_task", "read_image"]
