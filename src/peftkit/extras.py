"""Optional packages: each is imported only by the code that needs it, and a missing one is named
together with the peftkit extra that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

from peftkit.errors import PeftkitError

# import name -> the extra of peftkit that installs it
EXTRA_OF = {
    "fastapi": "serve",
    "uvicorn": "serve",
    "datasets": "datasets",
    "peft": "peft",
    "tensorboard": "tensorboard",
    "mlflow": "mlflow",
    "wandb": "wandb",
    "trl": "trl",
    "PIL": "vision",
    "codecarbon": "energy",
    "flwr": "federated",
    "flwr_datasets": "federated",
    "ray": "federated",
}


class MissingExtraError(PeftkitError):
    """An optional package that a feature needs is not installed."""


def require(module: str, purpose: str) -> ModuleType:
    """Import `module`, or raise MissingExtraError saying what needs it and which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRA_OF.get(module.split(".")[0])
        how = f'pip install "peftkit[{extra}]"' if extra else f"pip install {module.split('.')[0]}"
        raise MissingExtraError(f"{purpose} needs the {module.split('.')[0]} package, which is not installed: {how}") from None
