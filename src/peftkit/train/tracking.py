"""Experiment tracking through Accelerate's own trackers (TensorBoard, MLflow, Weights & Biases).

Nothing here logs: the training loops log with ``accelerator.log``. This module only turns the
``report_to`` setting into what Accelerate needs (``Accelerator(log_with=..., project_dir=...)``,
``init_trackers`` arguments), checks early that the tracker's package is installed (Accelerate
itself would silently skip a missing one), and keeps every run's logs under its output_dir:

- tensorboard: ``<output_dir>/logs/peftkit/`` (event files; ``tensorboard --logdir <output_dir>/logs``)
- mlflow: a local store ``<output_dir>/mlruns`` (experiment "peftkit", run named after the folder),
  unless ``MLFLOW_TRACKING_URI`` is set
- wandb: project "peftkit", run named after the folder, local files in ``<output_dir>/wandb``
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from peftkit.errors import PeftkitError

TRACKERS = ("tensorboard", "mlflow", "wandb")
PROJECT_NAME = "peftkit"  # the TensorBoard subfolder, the MLflow experiment, the W&B project
LOGS_DIRNAME = "logs"
MLFLOW_DIRNAME = "mlruns"

# The package each tracker needs, and how to install it.
_PACKAGES = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "mlflow": ("mlflow", "pip install mlflow-skinny (or mlflow)"),
    "wandb": ("wandb", "pip install wandb"),
}


def trackers_of(report_to: str | Sequence[str] | None) -> list[str]:
    """The trackers named by ``report_to``: "none" (or None, or "") for none, one name, a comma-separated
    list ("tensorboard,mlflow") or a list of names. Raises PeftkitError for an unknown name."""
    if report_to is None:
        return []
    names = report_to.split(",") if isinstance(report_to, str) else list(report_to)
    chosen: list[str] = []
    for name in names:
        if not isinstance(name, str):
            raise PeftkitError(f"report_to must name trackers ({', '.join(TRACKERS)} or none), got {name!r}")
        name = name.strip().lower()
        if name in ("", "none"):
            continue
        if name not in TRACKERS:
            raise PeftkitError(f"--report-to {name}: unknown tracker; use one of {', '.join(TRACKERS)} or none "
                               "(several, comma-separated: tensorboard,mlflow)")
        if name not in chosen:
            chosen.append(name)
    return chosen


def check_installed(trackers: Sequence[str]) -> None:
    """Raise PeftkitError for the first tracker whose package is missing, before any training starts."""
    for name in trackers:
        if not _is_installed(name):
            package, command = _PACKAGES[name]
            raise PeftkitError(f"--report-to {name} needs the {package} package: {command}, "
                               f"or pip install 'peftkit[{name}]'")


def _is_installed(tracker: str) -> bool:
    # Accelerate's own checks, so that what passes here is what Accelerate will start
    # (mlflow-skinny counts as mlflow; tensorboardX as tensorboard).
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    return {"tensorboard": is_tensorboard_available, "mlflow": is_mlflow_available, "wandb": is_wandb_available}[tracker]()


def accelerator_options(trackers: Sequence[str], output_dir: str | os.PathLike) -> dict[str, Any]:
    """Keyword arguments for ``Accelerator``: no options at all when nothing is tracked."""
    if not trackers:
        return {}
    return {"log_with": list(trackers), "project_dir": str(Path(output_dir) / LOGS_DIRNAME)}


@contextlib.contextmanager
def tracked_run(accelerator, trackers: Sequence[str], output_dir: str | os.PathLike,
                config: Mapping[str, Any]) -> Iterator[None]:
    """Start Accelerate's trackers for one run (``init_trackers`` with ``config`` as hyperparameters) and
    end them on the way out, also when training fails. Does nothing when ``trackers`` is empty."""
    if not trackers:
        yield
        return
    output_dir = Path(output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    with _local_mlflow_store(output_dir, "mlflow" in trackers):
        init_kwargs = {"mlflow": {"run_name": output_dir.resolve().name},
                       "wandb": {"name": output_dir.resolve().name, "dir": str(output_dir)}}
        accelerator.init_trackers(PROJECT_NAME, config=hyperparameters(config),
                                  init_kwargs={name: init_kwargs[name] for name in trackers if name in init_kwargs})
        try:
            yield
        finally:
            if accelerator.num_processes > 1:
                # end_training would also destroy the process group, which belongs to the caller.
                for tracker in accelerator.trackers:
                    tracker.finish()
            else:
                accelerator.end_training()


def hyperparameters(config: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """``config`` with every value a bool, int, float or str: TensorBoard's hparams refuse None, lists, dicts."""
    return {key: value if isinstance(value, (bool, int, float, str)) else str(value) for key, value in config.items()}


@contextlib.contextmanager
def _local_mlflow_store(output_dir: Path, enabled: bool) -> Iterator[None]:
    """While inside, MLflow writes to ``<output_dir>/mlruns`` unless MLFLOW_TRACKING_URI already says where.

    MLflow's default would be ``./mlflow.db`` in the working directory (and needs SQLAlchemy, which
    mlflow-skinny lacks). MLflow 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE is set; it
    is set for the run. MLflow reads both variables at each call, so they stay set until the run ends.
    """
    if not enabled or os.environ.get("MLFLOW_TRACKING_URI"):
        yield
        return
    settings = {"MLFLOW_TRACKING_URI": (output_dir / MLFLOW_DIRNAME).resolve().as_uri(),
                "MLFLOW_ALLOW_FILE_STORE": os.environ.get("MLFLOW_ALLOW_FILE_STORE", "true")}
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
