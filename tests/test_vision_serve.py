"""`/v1/classify` for images (peftkit serve on an image model), through FastAPI's TestClient on a tiny random CNN."""

import base64
import io

import pytest
import torch
from conftest import tiny_cnn
from PIL import Image
from test_vision import pattern_image, write_class_folders

from peftkit.serve.server import ServeSettings
from peftkit.train.image_job import load_image_run, predict_images, train_image_classifier
from peftkit.vision import ImagePreprocessor

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from fastapi.testclient import TestClient

    from peftkit.serve.image_app import create_image_app
    from peftkit.serve.images import load_image_server

    root = tmp_path_factory.mktemp("serve")
    model = root / "cnn"
    tiny_cnn(num_labels=2).save_pretrained(model)
    ImagePreprocessor(image_size=32, resize_size=36).save_pretrained(model)
    task = write_class_folders(root / "pets", per_class=4)
    adapters = root / "adapters"
    train_image_classifier(str(model), str(task), "lora", adapters / "pets",
                           training=dict(max_steps=2, batch_size=4, progress=False), validation_fraction=0.25)
    images = root / "images"
    images.mkdir()
    pattern_image(1, 5).save(images / "dog.png")
    (root / "secret.png").write_bytes((images / "dog.png").read_bytes())
    (images / "link.png").symlink_to(root / "secret.png")
    server = load_image_server(str(model), adapters, ServeSettings(max_texts=4), image_root=images)
    with TestClient(create_image_app(server)) as client:
        yield client, root, adapters / "pets" / "adapter"


def encoded(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_classifies_base64_and_paths_like_predict(served):
    client, root, adapter = served
    response = client.post("/v1/classify", json={"adapter": "pets", "images": [
        {"base64": encoded(pattern_image(0, 3))}, {"path": "dog.png"}]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["labels"] == ["cat", "dog"] and len(body["results"]) == 2
    model, preprocessor, _ = load_image_run(adapter)
    expected = predict_images(model, preprocessor, [pattern_image(0, 3), str(root / "images" / "dog.png")])
    got = torch.tensor([row["probabilities"] for row in body["results"]])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert client.get("/v1/adapters").json()["adapters"][0] == {"name": "pets", "state": "memory"}
    assert client.get("/health").json()["requests"] >= 1


@pytest.mark.parametrize("path", ["../secret.png", "link.png", "/etc/passwd", "sub/../../secret.png"])
def test_paths_that_leave_the_image_root_are_refused(served, path):
    client, _, _ = served
    response = client.post("/v1/classify", json={"adapter": "pets", "images": [{"path": path}]})
    assert response.status_code == 400 and "outside the server's image root" in response.json()["error"]["message"]


@pytest.mark.parametrize("item, status, message", [
    ({"base64": "not base64!"}, 422, "images[0]: base64 is not valid base64"),
    ({"base64": base64.b64encode(b"plain text").decode()}, 422, "not an image Pillow can read"),
    ({"path": "missing.png"}, 422, "missing.png: no such image file"),
    ({}, 422, "give exactly one of"),
    ({"base64": "", "path": "dog.png"}, 422, "give exactly one of"),
])
def test_bad_images_are_named(served, item, status, message):
    client, _, _ = served
    response = client.post("/v1/classify", json={"adapter": "pets", "images": [item]})
    assert response.status_code == status and message in response.json()["error"]["message"]


def test_adapters_and_limits(served):
    client, _, _ = served
    one = {"path": "dog.png"}
    assert client.post("/v1/classify", json={"adapter": "nope", "images": [one]}).status_code == 404
    assert client.post("/v1/classify", json={"adapter": "../pets", "images": [one]}).status_code == 400
    assert client.post("/v1/classify", json={"adapter": "pets", "images": [one] * 5}).status_code == 413
    assert client.post("/v1/classify", json={"adapter": "pets", "images": []}).status_code == 422
    assert client.post("/v1/classify", json={"adapter": "pets", "texts": ["hi"]}).status_code == 422


def test_without_an_image_root_paths_are_refused(served, tmp_path):
    from fastapi.testclient import TestClient

    from peftkit.serve.image_app import create_image_app
    from peftkit.serve.images import load_image_server

    _, root, _ = served
    server = load_image_server(str(root / "cnn"), root / "adapters")
    with TestClient(create_image_app(server)) as client:
        response = client.post("/v1/classify", json={"adapter": "pets", "images": [{"path": "dog.png"}]})
    assert response.status_code == 400 and "--image-root" in response.json()["error"]["message"]
