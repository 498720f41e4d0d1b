"""Running a federation: Flower's simulation engine on one machine, or the apps as separate processes.

`simulate` runs the ServerApp and one virtual SuperNode per client in Flower's simulation engine (Ray
actors; `cpus` of them train at once). `write_flower_app` writes the small Flower app folder (a
pyproject.toml naming peftkit's ClientApp and ServerApp) that `flwr run` sends to a running SuperLink,
for a deployment with `flower-superlink` and one `flower-supernode` per data owner.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError
from peftkit.extras import require
from peftkit.federated import rounds
from peftkit.federated.settings import FederationSettings


def simulate(settings: FederationSettings, cpus: int = 2) -> dict[str, Any]:
    """Run the federation in Flower's simulation engine; returns the report (also in OUTPUT/federation.json)."""
    settings.validate()
    output = Path(settings.output_dir)
    if not settings.resume and rounds.checkpoint_dir(output).exists():
        raise PeftkitError(f"{output} already holds a federation; pass --resume to continue it, or choose another --output-dir")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no usage reports from Flower
    simulation = require("flwr.simulation", "peftkit federate")
    require("ray", "Flower's simulation engine (peftkit federate)")
    from peftkit.federated.apps import make_client_app, make_server_app

    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": max(1, cpus), "num_gpus": 0, "include_dashboard": False,
                      "object_store_memory": 256 * 2**20, "logging_level": "error", "log_to_driver": True},
    }
    simulation.run_simulation(server_app=make_server_app(settings), client_app=make_client_app(settings),
                              num_supernodes=settings.clients, backend_config=backend)
    return read_report(output)


def read_report(output_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(output_dir) / rounds.REPORT_NAME
    if not path.is_file():
        raise PeftkitError(f"the federation ended without its report ({path}); its log above says why")
    return json.loads(path.read_text(encoding="utf-8"))


PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "peftkit-federated"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "peftkit"

[tool.flwr.app.components]
serverapp = "peftkit.federated.apps:server_app"
clientapp = "peftkit.federated.apps:client_app"

[tool.flwr.app.config]
{config}
"""


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def write_flower_app(folder: str | os.PathLike, settings: FederationSettings) -> Path:
    """A Flower app folder for `flwr run`: its components are peftkit's apps, its run config the settings."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = "\n".join(f"{key} = {toml_value(value)}" for key, value in settings.to_run_config().items())
    from peftkit.io import atomic_path

    with atomic_path(folder / "pyproject.toml") as temporary:
        Path(temporary).write_text(PYPROJECT.format(config=config), encoding="utf-8")
    return folder
