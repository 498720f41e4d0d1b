"""Image classification on a tiny random EfficientNet-Lite: the network, image tasks, bad images, the methods that
apply and those refused, peft interop of conv LoRA, and the job / CLI lifecycle (train, eval, predict, merge, export).

The images here are made in the tests (two learnable patterns), only to exercise the code; the real model on real
images is tests/test_vision_real.py. Every method's wrap / train / save / load / merge contract on the CNN is
the "cnn" kind of tests/test_contract.py.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import logits, randomise, tiny_cnn
from PIL import Image

from peftkit import LoraConfig, PeftkitError, PeftModel, get_peft_model
from peftkit.export import export_to_folder, merge_to_folder
from peftkit.train.image_job import (
    evaluate_image_run,
    image_method_config,
    load_image_run,
    predict_images,
    train_image_classifier,
)
from peftkit.vision import Augmentation, ImageCollator, ImagePreprocessor, load_image_classifier, load_image_task, read_image
from peftkit.vision.efficientnet import SamePadding, convert_state_dict

PIXELS = {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))}


def peftkit(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "peftkit.cli", *map(str, args)], capture_output=True, text=True,
                            timeout=600, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    if check and result.returncode != 0:
        raise AssertionError(f"peftkit {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def pattern_image(label: int, index: int, size: int = 20, mode: str = "RGB") -> Image.Image:
    """Class 0: a bright block at the top left, class 1: at the bottom right, on seeded noise."""
    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    half = size // 2
    if label == 0:
        pixels[:half, :half] = 230
    else:
        pixels[half:, half:] = 230
    image = Image.fromarray(pixels)
    return image.convert(mode) if mode != "RGB" else image


def write_class_folders(root, per_class=8, splits=None):
    for split in splits or [None]:
        for label, name in enumerate(["cat", "dog"]):
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pattern_image(label, 100 * label + i + (1000 if split == "validation" else 0)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def cnn_folder(tmp_path_factory):
    """The tiny CNN saved as a model folder with its preprocessing (32 px input)."""
    folder = tmp_path_factory.mktemp("tiny-cnn")
    tiny_cnn(num_labels=3).save_pretrained(folder)
    ImagePreprocessor(image_size=32, resize_size=36, image_mean=(0.5,) * 3, image_std=(0.25,) * 3).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_task(tmp_path_factory):
    return write_class_folders(tmp_path_factory.mktemp("pets"), per_class=12, splits=["train", "validation"])


# ------------------------------------------------------------------------------------------------ the network


def test_same_padding_is_tensorflows():
    pad = SamePadding(3, 2)
    # even input, stride 2: one pixel in all, at the end (TensorFlow's "SAME"); PyTorch's padding=1 would pad both sides
    assert pad(torch.zeros(1, 1, 224, 224)).shape[-2:] == (225, 225)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(pad(x)[..., :4, :4], x)
    assert pad(torch.zeros(1, 1, 5, 5)).shape[-2:] == (7, 7)  # odd input: one pixel each side


def test_efficientnet_checkpoint_names_are_converted_and_unknown_ones_refused():
    converted = convert_state_dict({"_conv_stem.weight": torch.zeros(1), "_blocks.3._depthwise_conv.weight": torch.zeros(1),
                                    "_blocks.0._bn2.running_var": torch.zeros(1), "_fc.bias": torch.zeros(1)})
    assert sorted(converted) == ["blocks.0.project_bn.running_var", "blocks.3.depthwise_conv.weight", "classifier.bias",
                                 "stem_conv.weight"]
    with pytest.raises(KeyError):
        convert_state_dict({"_conv_stem.weight": torch.zeros(1), "_se_reduce.weight": torch.zeros(1)})


def test_batchnorm_statistics_stay_frozen_in_training_mode():
    model = tiny_cnn().train()
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model(**PIXELS, labels=torch.tensor([0, 1])).loss.backward()
    assert all(torch.equal(buffer, before[name]) for name, buffer in model.named_buffers())
    assert model.training and not model.stem_bn.training
    model.eval()
    torch.testing.assert_close(logits(model, **PIXELS), logits(tiny_cnn(), **PIXELS))


# ------------------------------------------------------------------------------------------------ images and tasks


def test_preprocessing_resizes_crops_and_normalizes():
    preprocessor = ImagePreprocessor(image_size=8, resize_size=10, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    white = Image.new("RGB", (30, 20), (255, 255, 255))
    pixels = preprocessor.pixels(white)
    assert pixels.shape == (3, 8, 8) and torch.allclose(pixels, torch.ones(3, 8, 8))
    again = ImagePreprocessor.from_dict(preprocessor.to_dict(), "here")
    assert again == preprocessor
    vit_style = {"do_resize": True, "size": {"height": 16, "width": 16}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    assert ImagePreprocessor.from_dict(vit_style, "vit").image_size == 16


def test_augmentation_is_off_by_default_and_seeded_when_on():
    preprocessor = ImagePreprocessor(image_size=16, resize_size=24)
    image = pattern_image(0, 1, size=24)
    plain = preprocessor.pixels(image)
    assert torch.equal(preprocessor.pixels(image, Augmentation()), plain)
    torch.manual_seed(0)
    first = [preprocessor.pixels(image, Augmentation(random_crop=True, flip=True)) for _ in range(6)]
    torch.manual_seed(0)
    second = [preprocessor.pixels(image, Augmentation(random_crop=True, flip=True)) for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert any(not torch.equal(a, plain) for a in first)
    collate = ImageCollator(preprocessor, Augmentation(flip=True))
    batch = collate([{"image": np.zeros((5, 5), np.uint8), "labels": 1, "augment": False}])
    assert batch["pixel_values"].shape == (1, 3, 16, 16) and batch["labels"].tolist() == [1]


def test_class_folders_with_and_without_split_folders(tmp_path):
    flat = load_image_task(write_class_folders(tmp_path / "flat", per_class=3))
    assert flat.label_names == ["cat", "dog"] and len(flat.train) == 6 and flat.validation is None
    split = load_image_task(write_class_folders(tmp_path / "split", per_class=2, splits=["train", "val", "test"]))
    assert (len(split.train), len(split.validation), len(split.test)) == (4, 4, 4)
    assert [e.label for e in split.test] == [0, 0, 1, 1]
    (tmp_path / "split" / "test" / "bird").mkdir()
    pattern_image(0, 9).save(tmp_path / "split" / "test" / "bird" / "b.png")
    with pytest.raises(PeftkitError, match=r"\['bird'\] do not occur in"):
        load_image_task(tmp_path / "split")
    (tmp_path / "flat" / "empty").mkdir()
    with pytest.raises(PeftkitError, match=r"\['empty'\] hold no image files"):
        load_image_task(tmp_path / "flat")


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_csv_and_jsonl_of_image_paths(tmp_path, suffix):
    (tmp_path / "images").mkdir()
    rows = []
    for i in range(6):
        pattern_image(i % 2, i).save(tmp_path / "images" / f"{i}.png")
        rows.append({"file": f"images/{i}.png", "kind": ["cat", "dog"][i % 2]})
    data = tmp_path / f"train.{suffix}"
    if suffix == "csv":
        data.write_text("file,kind\n" + "\n".join(f"{r['file']},{r['kind']}" for r in rows) + "\n")
    else:
        data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = load_image_task(data, image_column="file", label_column="kind")
    assert task.label_names == ["cat", "dog"] and [e.label for e in task.train] == [0, 1, 0, 1, 0, 1]
    assert task.train[2].image == str(tmp_path / "images" / "2.png")
    with pytest.raises(PeftkitError, match="no column 'image'"):
        load_image_task(data)


def test_bad_images_name_the_file(tmp_path):
    with pytest.raises(PeftkitError, match=r"missing\.png: no such image file"):
        read_image(tmp_path / "missing.png")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(PeftkitError, match=r"notes\.png: not an image Pillow can read"):
        read_image(text)
    good = tmp_path / "good.png"
    pattern_image(0, 1, size=64).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(PeftkitError, match=r"truncated\.png: the image cannot be decoded"):
        read_image(truncated)
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(deep)
    with pytest.raises(PeftkitError, match=r"deep\.png: image mode 'I;16' .* has no faithful 8-bit RGB form"):
        read_image(deep)
    assert read_image(good).mode == "RGB"
    gray = tmp_path / "gray.png"
    pattern_image(1, 2, mode="L").save(gray)
    assert read_image(gray).size == (20, 20) and read_image(gray).mode == "RGB"


def test_a_bad_image_stops_the_cli_run_with_one_line(cnn_folder, tmp_path):
    root = write_class_folders(tmp_path / "pets", per_class=3)
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = peftkit("train", "--model", cnn_folder, "--task", root, "--output-dir", tmp_path / "run", "--no-progress",
                     check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("peftkit: error:")]
    assert len(error_lines) == 1 and "broken.jpg" in error_lines[0]


# ------------------------------------------------------------------------------------------------ methods on the CNN


def test_image_defaults_target_the_pointwise_convolutions():
    model = tiny_cnn()
    config = image_method_config("lora", model)
    assert config.target_modules == ["expand_conv", "project_conv", "head_conv"]
    assert image_method_config("lora", model, {"target_modules": ["head_conv"]}).target_modules == ["head_conv"]
    wrapped = get_peft_model(model, config)
    adapted = [name for name, module in wrapped.base_model.named_modules() if hasattr(module, "adapters")]
    assert "head_conv" in adapted and "blocks.1.expand_conv" in adapted and "classifier" in adapted
    assert not any("depthwise" in name or "stem" in name for name in adapted)


@pytest.mark.parametrize("method, reason", [
    ("prompt", "needs a model with input token embeddings"),
    ("ptuning", "needs a model with input token embeddings"),
    ("prefix", "needs a model with attention key/value caches"),
    ("adapter", "does not recognise the block layout"),
    ("vera", "adapts only Linear, Conv1D"),
    ("oft", "peftkit's OFT adapts only nn.Linear"),
    ("ln_tuning", "has no LayerNorm or RMSNorm layer"),
])
def test_methods_that_do_not_fit_a_cnn_are_refused_at_wrap_time(method, reason):
    with pytest.raises(PeftkitError, match=reason):
        get_peft_model(tiny_cnn(), image_method_config(method, tiny_cnn()))


def test_lora_refuses_depthwise_and_sparse_refuses_spatial_convolutions():
    with pytest.raises(PeftkitError, match="grouped Conv2d"):
        get_peft_model(tiny_cnn(), LoraConfig(r=2, target_modules=["depthwise_conv"]))
    with pytest.raises(PeftkitError, match="'stem_conv' is a Conv2d with kernel"):
        get_peft_model(tiny_cnn(), image_method_config("sparse", tiny_cnn(), {"target_modules": ["stem_conv"]}))


def test_sparse_on_pointwise_convolutions_scores_trains_and_merges():
    model = get_peft_model(tiny_cnn(), image_method_config("sparse", tiny_cnn(), {"budget": 0.05}))
    model.prepare_training([{**PIXELS, "labels": torch.tensor([0, 2])}])
    randomise(model)
    unmerged = logits(model, **PIXELS)
    assert not torch.allclose(unmerged, logits(tiny_cnn(), **PIXELS), atol=1e-4)
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged, **PIXELS), unmerged, rtol=1e-5, atol=1e-5)


def test_conv_lora_moves_to_peft_and_back(tmp_path):
    import peft

    config = dict(r=2, lora_alpha=4, target_modules=["expand_conv", "project_conv", "head_conv", "stem_conv"])
    ours = get_peft_model(tiny_cnn(), LoraConfig(**config))
    randomise(ours)
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_cnn(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs, **PIXELS), logits(ours, **PIXELS), rtol=1e-5, atol=1e-5)

    trained = peft.get_peft_model(tiny_cnn(), peft.LoraConfig(**config))
    randomise(trained, seed=7)
    trained.save_pretrained(tmp_path / "theirs")
    loaded = PeftModel.from_pretrained(tiny_cnn(), tmp_path / "theirs")
    torch.testing.assert_close(logits(loaded, **PIXELS), logits(trained.eval(), **PIXELS), rtol=1e-5, atol=1e-5)
    assert ours.get_nb_trainable_parameters() == trained.get_nb_trainable_parameters()


# ------------------------------------------------------------------------------------------------ the job and the CLI


def test_job_trains_evaluates_predicts_merges_and_exports(cnn_folder, image_task, tmp_path):
    run = tmp_path / "run"
    result = train_image_classifier(str(cnn_folder), str(image_task), "lora", run,
                                    training=dict(max_steps=6, batch_size=8, progress=False, learning_rate=1e-2),
                                    augmentation=Augmentation(random_crop=True))
    assert result.steps == 6 and 0 <= result.validation_accuracy <= 1 and result.trainable_share < 0.5
    adapter = run / "adapter"
    info = json.loads((adapter / "peftkit_run.json").read_text())
    assert info["kind"] == "image" and info["label_names"] == ["cat", "dog"] and info["augmentation"]["random_crop"]
    assert (adapter / "preprocessor_config.json").is_file()
    evaluation = evaluate_image_run(adapter)
    assert evaluation["examples"] == 24 and evaluation["accuracy"] == pytest.approx(result.validation_accuracy)

    model, preprocessor, _ = load_image_run(adapter)
    images = [str(image_task / "validation" / "dog" / "0.png"), str(image_task / "validation" / "cat" / "1.png")]
    probabilities = predict_images(model, preprocessor, images)
    assert probabilities.shape == (2, 2)
    arrays = [np.asarray(read_image(path)) for path in images]  # in-memory uint8 pixels, as mnist-5k holds them
    torch.testing.assert_close(predict_images(model, preprocessor, arrays), probabilities)

    merged = tmp_path / "merged"
    merge_to_folder(adapter, merged)
    plain, plain_preprocessor = load_image_classifier(merged)
    assert plain_preprocessor == preprocessor and plain.config.id2label == {0: "cat", 1: "dog"}
    torch.testing.assert_close(predict_images(plain, plain_preprocessor, images), probabilities, rtol=1e-4, atol=1e-5)

    exported = export_to_folder(adapter, tmp_path / "exported")
    assert (tmp_path / "exported" / "adapter_model.safetensors").is_file()
    assert any("classifier" in problem for problem in exported.problems)  # serving engines load no trained head


@pytest.mark.parametrize("method", ["bitfit", "linear_probe", "full", "freeze", "sparse", "ia3"])
def test_other_methods_train_save_and_reload_on_the_cnn(method, cnn_folder, image_task, tmp_path):
    run = tmp_path / "run"
    result = train_image_classifier(str(cnn_folder), str(image_task), method, run,
                                    training=dict(max_steps=3, batch_size=8, progress=False), method_options=(
                                        {"last_k": 1} if method == "freeze" else None))
    assert result.steps == 3
    assert evaluate_image_run(run / "adapter")["accuracy"] == pytest.approx(result.validation_accuracy)
    if method == "linear_probe":
        assert result.trainable_parameters == 32 * 2 + 2  # the head of a 32-channel network for 2 classes


def test_cli_train_eval_predict_merge_export(cnn_folder, image_task, tmp_path):
    run = tmp_path / "run"
    shown = peftkit("train", "--model", cnn_folder, "--task", image_task, "--method", "lora", "--output-dir", run,
                    "--max-steps", "4", "--batch-size", "8", "--augment", "crop,flip", "--no-progress").stdout
    assert "validation accuracy" in shown and "trainable parameters" in shown
    adapter = run / "adapter"
    evaluation = json.loads(peftkit("eval", adapter, "--json").stdout)
    assert evaluation["examples"] == 24 and evaluation["split"] == "validation"
    image = image_task / "validation" / "dog" / "3.png"
    predicted = json.loads(peftkit("predict", adapter, image, "--json").stdout)
    assert predicted["image"] == str(image) and predicted["label"] in ("cat", "dog")
    missing = peftkit("predict", adapter, tmp_path / "nope.png", check=False)
    assert missing.returncode == 2 and "nope.png: no such image file" in missing.stderr
    assert "peftkit.vision.load_image_classifier" in peftkit("merge", adapter, "--output", tmp_path / "merged").stdout
    peftkit("export", adapter, "--output", tmp_path / "exported")
    refused = peftkit("train", "--model", cnn_folder, "--task", image_task, "--method", "prefix", "--output-dir",
                      tmp_path / "prefix", "--max-steps", "1", check=False)
    assert refused.returncode == 2 and "attention key/value caches" in refused.stderr
    wrong = peftkit("train", "--model", cnn_folder, "--task", image_task, "--augment", "rotate", check=False)
    assert wrong.returncode == 2 and "unknown rotate" in wrong.stderr


def test_a_transformers_image_classification_folder_trains_too(image_task, tmp_path):
    from conftest import tiny_vit

    folder = tmp_path / "vit"
    tiny_vit().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 16, "width": 16},
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    model, preprocessor = load_image_classifier(folder, num_labels=2)
    assert preprocessor.image_size == 16 and model.config.num_labels == 2
    result = train_image_classifier(str(folder), str(image_task), "lora", tmp_path / "run",
                                    training=dict(max_steps=2, batch_size=8, progress=False))
    assert result.steps == 2 and evaluate_image_run(tmp_path / "run" / "adapter")["examples"] == 24
