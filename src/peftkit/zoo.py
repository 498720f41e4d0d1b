"""Built-in models and tasks under one name: `peftkit.zoo` re-exports `peftkit.models` (the models and
their loading, GGUF conversion included) and `peftkit.tasks` (the packaged tasks), so
`from peftkit.zoo import load_causal_lm` and `zoo.load_task("sst2")` keep working.
"""

from peftkit.models import (  # noqa: F401
    BUILTIN_MODELS,
    CONVERSION_STAMP,
    MODEL_KINDS,
    BuiltinModel,
    cache_folder,
    list_models,
    load_causal_lm,
    load_classifier,
    model_kind,
    resolve_model,
)
from peftkit.tasks import BUILTIN_TASKS, TASK_DATA_FOLDER, BuiltinTask, list_tasks, load_task  # noqa: F401
from peftkit.train.data import Example, TaskData  # noqa: F401

__all__ = [
    "BUILTIN_MODELS",
    "BUILTIN_TASKS",
    "BuiltinModel",
    "BuiltinTask",
    "Example",
    "TaskData",
    "cache_folder",
    "list_models",
    "list_tasks",
    "load_causal_lm",
    "load_classifier",
    "load_task",
    "model_kind",
    "resolve_model",
]
