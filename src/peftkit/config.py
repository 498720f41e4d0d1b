"""The base of every method's config: a dataclass with validation and a JSON round-trip.

A config file is `adapter_config.json` in the layout Hugging Face `peft` writes, with a `peft_type`
field naming the method. Each method's config (LoraConfig, BitFitConfig, ...) lives in that method's
file and registers itself here, so `config_from_dict` can rebuild any config from JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

from peftkit.errors import PeftkitError

# peft_type -> config class; filled by each method file through @register_config.
CONFIG_TYPES: dict[str, type[PeftConfig]] = {}


def register_config(cls):
    """Class decorator: make `cls` known under its `peft_type` for loading from JSON."""
    CONFIG_TYPES[cls.peft_type] = cls
    return cls


@dataclasses.dataclass(frozen=True)
class Method:
    """A method as `peftkit train --method NAME` knows it, declared in the method's own file (its
    `METHODS` tuple) and collected by peftkit.registry.

    defaults: config fields of the classification job (peftkit's choice where it differs from the config
    class's own defaults); learning_rate: the job's AdamW rate; epochs: passes when the caller gives none
    (None: the job's default of 2); causal_defaults / causal_learning_rate: where a causal LM wants
    other ones (fields given as None drop the classification default and leave the config's own).
    """

    name: str
    config: type[PeftConfig]
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    learning_rate: float = 5e-4
    epochs: float | None = None
    causal_defaults: Mapping[str, Any] | None = None
    causal_learning_rate: float | None = None


@dataclasses.dataclass
class PeftConfig:
    """Fields every method shares. Subclasses set the class attribute `peft_type`."""

    peft_type: ClassVar[str] = ""
    # Fields that Hugging Face peft writes but that carry no meaning for peftkit; they are accepted
    # when reading a peft file as long as they hold their neutral value (see `config_from_dict`).
    peft_neutral_fields: ClassVar[dict[str, Any]] = {}

    base_model_name_or_path: str | None = None
    task_type: str | None = None
    inference_mode: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise PeftkitError naming the field when a value makes no sense."""
        _check_types(self)

    def to_dict(self) -> dict[str, Any]:
        out = {"peft_type": self.peft_type}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, (set, frozenset)):
                value = sorted(value)
            out[field.name] = value
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def replace(self, **changes) -> PeftConfig:
        return dataclasses.replace(self, **changes)


# Fields that peft writes into every adapter_config.json whatever the method; neutral for us.
_COMMON_PEFT_FIELDS = {"auto_mapping", "peft_version", "revision", "megatron_core"}


def config_from_dict(data: dict[str, Any], source: str = "config") -> PeftConfig:
    """Build the right config class from a dict read from JSON.

    Unknown fields are an error naming them and the known ones, except fields that Hugging Face peft
    writes for features peftkit does not have, which are accepted while they hold peft's neutral
    value (for example `use_dora: false`), and refused with a clear message otherwise.
    """
    if not isinstance(data, dict):
        raise PeftkitError(f"{source}: expected a JSON object, got {type(data).__name__}")
    peft_type = data.get("peft_type")
    if peft_type not in CONFIG_TYPES:
        known = ", ".join(sorted(CONFIG_TYPES))
        raise PeftkitError(f"{source}: unknown peft_type {peft_type!r}; peftkit knows: {known}")
    cls = CONFIG_TYPES[peft_type]
    # A file written by Hugging Face peft carries fields for every feature peft has; each new peft
    # release adds some. Those are fine while they hold an "off" value.
    written_by_peft = "peft_version" in data
    known_fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key == "peft_type" or key in _COMMON_PEFT_FIELDS:
            continue
        if key in known_fields:
            kwargs[key] = value
        elif key in cls.peft_neutral_fields:
            if not _is_neutral(value, cls.peft_neutral_fields[key]):
                raise PeftkitError(
                    f"{source}: field {key}={value!r} asks for a {cls.__name__} feature that peftkit "
                    f"does not support; only {cls.peft_neutral_fields[key]!r} is accepted there"
                )
        elif written_by_peft and value in (None, False, {}, [], ""):
            continue
        else:
            raise PeftkitError(
                f"{source}: unknown field {key!r} for {cls.__name__}; known fields: "
                + ", ".join(sorted(known_fields))
            )
    try:
        return cls(**kwargs)
    except (TypeError, PeftkitError) as error:  # a missing field, or a value validate() refuses
        raise PeftkitError(f"{source}: {error}") from None


def _is_neutral(value, neutral) -> bool:
    if value == neutral:
        return True
    # peft writes None, {} and False interchangeably for "off"
    return value in (None, False, {}, []) and neutral in (None, False, {}, [])


def load_config(path: str | os.PathLike) -> PeftConfig:
    """Read an `adapter_config.json` (or a folder holding one)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(path):
        raise PeftkitError(f"no adapter config at {path}: expected adapter_config.json from save_pretrained")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise PeftkitError(f"{path} is not valid JSON ({error}); the file may be truncated") from None
    return config_from_dict(data, source=path)


def _check_types(config: PeftConfig) -> None:
    """Check each field's value against its annotation; say which field and what was expected."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        expected = hints.get(field.name)
        if expected is not None and not _matches(value, expected):
            raise PeftkitError(
                f"{type(config).__name__}.{field.name} must be {_describe(expected)}, got {value!r}"
            )


def _matches(value, expected) -> bool:
    origin = typing.get_origin(expected)
    if expected is Any:
        return True
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        return any(_matches(value, arm) for arm in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if origin in (list, tuple, set, frozenset):
        (item_type, *_) = typing.get_args(expected) or (Any,)
        return isinstance(value, (list, tuple, set, frozenset)) and all(_matches(v, item_type) for v in value)
    if origin is dict:
        key_type, value_type = typing.get_args(expected) or (Any, Any)
        return isinstance(value, dict) and all(
            _matches(k, key_type) and _matches(v, value_type) for k, v in value.items()
        )
    if origin is typing.Literal:
        return value in typing.get_args(expected)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(expected, type):
        return isinstance(value, expected)
    return True


def _describe(expected) -> str:
    origin = typing.get_origin(expected)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(expected))
    name = getattr(expected, "__name__", None)
    return name or str(expected).replace("typing.", "")
