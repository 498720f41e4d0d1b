"""Prompt tuning and P-tuning: learned virtual tokens put in front of every input.

The base model stays whole and untouched. Before each forward pass the input tokens are embedded with
the model's own input embeddings, and `num_virtual_tokens` learned vectors are placed in front of them;
the attention mask gets ones for the virtual tokens and causal-LM labels get -100 (no loss on them).

- Prompt tuning (Lester et al., 2021) trains the virtual token vectors themselves.
- P-tuning (Liu et al., 2021) trains them through a small encoder (an MLP, or a bidirectional LSTM
  followed by an MLP) that maps free input vectors to the virtual tokens; only its output is needed
  once training is over.

Files follow Hugging Face `peft`: one tensor `prompt_embeddings` of shape (num_virtual_tokens,
token_dim). For P-tuning that tensor is the encoder's output, as peft saves it, so a loaded P-tuning
adapter holds the virtual tokens directly and has no encoder. Field names follow peft's
`PromptTuningConfig` and `PromptEncoderConfig`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from typing import Any, Literal

import torch
from torch import nn

from peftkit.config import Method, PeftConfig, register_config
from peftkit.errors import PeftkitError
from peftkit.methods.base import AdaptedModule, Attached, ModelAdapter

# Labels on padding and virtual positions: ignored by the loss of every transformers model.
IGNORED_LABEL = -100


@dataclasses.dataclass
class PromptLearningConfig(PeftConfig):
    """Fields shared by the methods that put learned tokens in front of the input (peft's names).

    num_virtual_tokens: how many virtual tokens. token_dim: their size, the model's embedding size
    (filled from the model when None). num_transformer_submodules: 1 (encoder-decoder models, which
    peft gives 2, are not supported). num_attention_heads, num_layers: the model's, filled from its
    config when None (written to the file for peft). modules_to_save: modules trained whole (e.g. a
    new classifier head).
    """

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def validate(self):
        super().validate()
        name = type(self).__name__
        if self.num_virtual_tokens is None:
            raise PeftkitError(f"{name}.num_virtual_tokens must be set: how many virtual tokens to learn (e.g. 20)")
        if self.num_virtual_tokens <= 0:
            raise PeftkitError(f"{name}.num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens}")
        for field in ("token_dim", "num_attention_heads", "num_layers"):
            value = getattr(self, field)
            if value is not None and value <= 0:
                raise PeftkitError(f"{name}.{field} must be a positive integer (or None to take it from the model), got {value}")
        if self.num_transformer_submodules not in (None, 1):
            raise PeftkitError(
                f"{name}.num_transformer_submodules={self.num_transformer_submodules}: peftkit supports 1 "
                "(decoder-only and encoder-only models); encoder-decoder models are not supported"
            )


@register_config
@dataclasses.dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: the virtual tokens are trained directly.

    prompt_tuning_init: "RANDOM" (standard normal vectors, as peft), "SAMPLE_VOCAB" (embeddings of
    random vocabulary tokens) or "TEXT" (embeddings of `prompt_tuning_init_text`, tokenized with the
    tokenizer in `tokenizer_name_or_path`, repeated or cut to num_virtual_tokens). tokenizer_kwargs:
    extra arguments for `AutoTokenizer.from_pretrained` (TEXT only; trust_remote_code is dropped).
    """

    peft_type = "PROMPT_TUNING"

    prompt_tuning_init: Literal["RANDOM", "TEXT", "SAMPLE_VOCAB"] = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = None

    def validate(self):
        super().validate()
        text = self.prompt_tuning_init == "TEXT"
        if text and not self.tokenizer_name_or_path:
            raise PeftkitError(
                "PromptTuningConfig(prompt_tuning_init='TEXT') needs tokenizer_name_or_path: a folder holding "
                "the base model's tokenizer, to turn prompt_tuning_init_text into tokens"
            )
        if text and not self.prompt_tuning_init_text:
            raise PeftkitError("PromptTuningConfig(prompt_tuning_init='TEXT') needs prompt_tuning_init_text, the text whose embeddings start the prompt")
        if self.tokenizer_kwargs and not text:
            raise PeftkitError("PromptTuningConfig.tokenizer_kwargs is used only with prompt_tuning_init='TEXT'")


@register_config
@dataclasses.dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: the virtual tokens come out of a small trained encoder.

    encoder_reparameterization_type: "MLP" (three linear layers with ReLU between, as peft; it ignores
    encoder_num_layers and encoder_dropout) or "LSTM" (a bidirectional LSTM of encoder_num_layers
    layers with dropout encoder_dropout between them, then a two-layer MLP). encoder_hidden_size: the
    encoder's width (token_dim when None).
    """

    peft_type = "P_TUNING"

    encoder_reparameterization_type: Literal["MLP", "LSTM"] = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def validate(self):
        super().validate()
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise PeftkitError(f"PromptEncoderConfig.encoder_hidden_size must be a positive integer, got {self.encoder_hidden_size}")
        if self.encoder_num_layers <= 0:
            raise PeftkitError(f"PromptEncoderConfig.encoder_num_layers must be a positive integer, got {self.encoder_num_layers}")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise PeftkitError(f"PromptEncoderConfig.encoder_dropout must be in [0, 1), got {self.encoder_dropout}")
        if self.encoder_reparameterization_type == "MLP" and self.encoder_num_layers != 2 and not self.inference_mode:
            raise PeftkitError(
                f"PromptEncoderConfig.encoder_num_layers={self.encoder_num_layers} does not apply to the MLP encoder, "
                "which always has two hidden layers (as in peft); leave it at 2, or use "
                "encoder_reparameterization_type='LSTM' for a deeper encoder"
            )


# -- the model ------------------------------------------------------------------------------------

def input_token_embeddings(model: nn.Module, method: str) -> nn.Module:
    """The model's input token embedding module (possibly wrapped by another adapter).

    Raises PeftkitError when the model has none to put virtual tokens beside, or when its forward
    takes no `inputs_embeds`.
    """
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = getter() if callable(getter) else None
    except NotImplementedError:  # transformers' image models (ResNet, ...) have no token embeddings to return
        embeddings = None
    base = embeddings.base_layer if isinstance(embeddings, AdaptedModule) else embeddings
    if not isinstance(base, nn.Embedding):
        found = f"its input embeddings are {type(base).__name__}" if base is not None else "it has no get_input_embeddings()"
        raise PeftkitError(
            f"{method} needs a model with input token embeddings (an nn.Embedding from get_input_embeddings()) "
            f"to put virtual tokens in front of; {type(model).__name__} has none ({found}). "
            "For image models use a method that changes weights, such as LoRA"
        )
    parameters = inspect.signature(model.forward).parameters
    if "inputs_embeds" not in parameters:
        raise PeftkitError(
            f"{method} passes the input to the model as inputs_embeds, but {type(model).__name__}.forward takes no "
            "inputs_embeds argument"
        )
    return embeddings


def _model_config_value(model: nn.Module, names: tuple[str, ...]) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in names:
        value = getattr(text_config, name, None)
        if isinstance(value, int):
            return value
    return None


def fill_from_model(config: PromptLearningConfig, model: nn.Module, embeddings: nn.Module) -> PromptLearningConfig:
    """A copy of `config` with its model-shaped fields that are None filled in (token_dim, num_layers, ...).

    peft does the same at wrap time and writes the values to adapter_config.json. token_dim is the
    width of the input embeddings, which is what the virtual tokens must match.
    """
    embedding_dim = (embeddings.base_layer if isinstance(embeddings, AdaptedModule) else embeddings).embedding_dim
    if config.token_dim is not None and config.token_dim != embedding_dim:
        raise PeftkitError(
            f"{type(config).__name__}.token_dim={config.token_dim} but the input embeddings of "
            f"{type(model).__name__} have size {embedding_dim}; leave token_dim as None to take it from the model"
        )
    changes: dict[str, Any] = {"token_dim": embedding_dim}
    if config.num_layers is None:
        changes["num_layers"] = _model_config_value(model, ("num_hidden_layers", "num_layers", "n_layer"))
    if config.num_attention_heads is None:
        changes["num_attention_heads"] = _model_config_value(model, ("num_attention_heads", "n_head", "num_heads"))
    if config.num_transformer_submodules is None:
        changes["num_transformer_submodules"] = 1
    if isinstance(config, PromptEncoderConfig) and config.encoder_hidden_size is None:
        changes["encoder_hidden_size"] = embedding_dim
    return config.replace(**changes)


class VirtualTokenAdapter(ModelAdapter):
    """Runs the base model with learned virtual tokens in front of the input.

    Subclasses hold the parameters and implement `virtual_tokens()` -> (num_virtual_tokens, token_dim).
    """

    intercepts_forward = True
    mergeable = False
    merge_refusal = (
        "its virtual tokens are extra inputs put in front of every sequence, not a change of any weight, "
        "so there is nothing to add into the base model"
    )
    # peft leaves the base model unwrapped for prompt learning, so its files key the module
    # tensors (modules_to_save) as `base_model.<path>` rather than `base_model.model.<path>`.
    module_key_prefix = "base_model."

    def __init__(self, config: PromptLearningConfig):
        super().__init__()
        self.num_virtual_tokens = config.num_virtual_tokens
        self.token_dim = config.token_dim
        self.task_type = config.task_type
        self.method = type(config).__name__

    def virtual_tokens(self) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _prompts(self, batch_size: int, like: torch.Tensor) -> torch.Tensor:
        """The virtual tokens for a batch: (batch_size, num_virtual_tokens, token_dim), in `like`'s dtype."""
        tokens = self.virtual_tokens().to(device=like.device, dtype=like.dtype)
        return tokens.unsqueeze(0).expand(batch_size, -1, -1)

    def _extend_inputs(self, model, input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids,
                       always_mask: bool) -> dict[str, torch.Tensor]:
        """inputs_embeds with the virtual tokens in front, and the per-token inputs widened to match."""
        if input_ids is None and inputs_embeds is None:
            raise PeftkitError(f"{self.method}: pass input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = model.get_input_embeddings()(input_ids)
        batch_size, length = inputs_embeds.shape[:2]
        virtual = self.num_virtual_tokens
        device = inputs_embeds.device
        extended = {"inputs_embeds": torch.cat([self._prompts(batch_size, inputs_embeds), inputs_embeds], dim=1)}
        if attention_mask is None and always_mask:
            attention_mask = torch.ones(batch_size, length, dtype=torch.long, device=device)
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise PeftkitError(
                    f"{self.method} needs a 2D attention mask (batch, sequence) to widen for its virtual tokens; "
                    f"got one of shape {tuple(attention_mask.shape)}"
                )
            ones = torch.ones(batch_size, virtual, dtype=attention_mask.dtype, device=attention_mask.device)
            extended["attention_mask"] = torch.cat([ones, attention_mask], dim=1)
        if token_type_ids is not None:
            zeros = torch.zeros(batch_size, virtual, dtype=token_type_ids.dtype, device=token_type_ids.device)
            extended["token_type_ids"] = torch.cat([zeros, token_type_ids], dim=1)
        if position_ids is not None:
            # Virtual tokens take positions 0..V-1 and push the real ones back by V, which is what the
            # model does by itself when no position_ids are given.
            front = torch.arange(virtual, dtype=position_ids.dtype, device=position_ids.device)
            front = front.expand(*position_ids.shape[:-1], virtual)
            extended["position_ids"] = torch.cat([front, position_ids + virtual], dim=-1)
        return extended

    def _labels_per_token(self, labels: torch.Tensor, length: int) -> bool:
        """Whether labels hold one entry per input token (language modelling) rather than per example."""
        if self.task_type in ("CAUSAL_LM", "TOKEN_CLS"):
            return True
        if self.task_type in ("SEQ_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"):
            return False
        return labels.dim() == 2 and labels.shape[1] == length

    def forward(self, model: nn.Module, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                token_type_ids=None, position_ids=None, **kwargs):
        """Run `model` on the input with the virtual tokens in front.

        input_ids: (batch, length) or inputs_embeds: (batch, length, token_dim). Outputs cover
        num_virtual_tokens + length positions (as in peft); per-token labels get -100 for the virtual ones.
        """
        if input_ids is not None and inputs_embeds is not None:
            raise PeftkitError(f"{self.method}: pass input_ids or inputs_embeds, not both")
        extended = self._extend_inputs(model, input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids,
                                       always_mask=False)
        if labels is not None:
            length = extended["inputs_embeds"].shape[1] - self.num_virtual_tokens
            if self._labels_per_token(labels, length):
                ignored = torch.full((labels.shape[0], self.num_virtual_tokens), IGNORED_LABEL, dtype=labels.dtype,
                                     device=labels.device)
                labels = torch.cat([ignored, labels], dim=1)
            extended["labels"] = labels
        return model(**extended, **kwargs)

    def generate(self, model: nn.Module, input_ids=None, attention_mask=None, inputs_embeds=None,
                 token_type_ids=None, position_ids=None, **kwargs):
        """`model.generate` with the virtual tokens in front of the prompt.

        The returned sequences are input_ids followed by the new tokens (only the new tokens when the
        prompt came as inputs_embeds), as in peft. transformers runs the first step on the embeddings
        (virtual tokens included) and caches them, then continues from the token ids; the attention
        mask is always passed so that positions count the virtual tokens.
        """
        if not callable(getattr(model, "generate", None)):
            raise PeftkitError(f"{type(model).__name__} cannot generate text; generate needs a language model (CAUSAL_LM)")
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise PeftkitError(f"{self.method} does not support encoder-decoder models")
        with torch.no_grad():
            extended = self._extend_inputs(model, input_ids, inputs_embeds, attention_mask, token_type_ids,
                                           position_ids, always_mask=True)
        if input_ids is not None:
            extended["input_ids"] = input_ids
        return model.generate(**extended, **kwargs)


class PromptTuningAdapter(VirtualTokenAdapter):
    """prompt_embeddings: (num_virtual_tokens, token_dim), trained directly."""

    def __init__(self, config: PromptTuningConfig, embeddings: nn.Module):
        super().__init__(config)
        self.prompt_embeddings = nn.Parameter(self._initial_tokens(config, embeddings))

    def _initial_tokens(self, config: PromptTuningConfig, embeddings: nn.Module) -> torch.Tensor:
        count, table = config.num_virtual_tokens, embeddings.weight
        # A loaded adapter (inference_mode) gets its tokens from the file: no tokenizer needed then.
        if config.inference_mode or config.prompt_tuning_init == "RANDOM":
            return torch.randn(count, config.token_dim)  # nn.Embedding's default, as peft
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            token_ids = torch.randint(0, table.shape[0], (count,))
        else:
            token_ids = _text_token_ids(config, vocabulary_size=table.shape[0])
        with torch.no_grad():
            return table[token_ids.to(table.device)].detach().float().cpu().clone()

    def virtual_tokens(self):
        return self.prompt_embeddings

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, token_dim={self.token_dim}"

    def file_tensors(self):
        return {"prompt_embeddings": self.prompt_embeddings.detach()}

    def _assign_file_tensors(self, tensors):
        with torch.no_grad():
            self.prompt_embeddings.copy_(tensors["prompt_embeddings"])


def _text_token_ids(config: PromptTuningConfig, vocabulary_size: int) -> torch.Tensor:
    """The init text's token ids, repeated or cut to num_virtual_tokens (peft's rule): (num_virtual_tokens,)."""
    tokenizer = _load_tokenizer(config)
    token_ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not token_ids:
        raise PeftkitError(f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} gives no tokens")
    too_large = [t for t in token_ids if t >= vocabulary_size]
    if too_large:
        raise PeftkitError(
            f"the tokenizer in {config.tokenizer_name_or_path} gives token ids up to {max(too_large)} but the model's "
            f"vocabulary has {vocabulary_size} entries: it is not this model's tokenizer"
        )
    repeats = math.ceil(config.num_virtual_tokens / len(token_ids))
    return torch.tensor((token_ids * repeats)[: config.num_virtual_tokens], dtype=torch.long)


def _load_tokenizer(config: PromptTuningConfig):
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # a config file must not be able to run code
    path = config.tokenizer_name_or_path
    if not os.path.isdir(path):
        kwargs.setdefault("local_files_only", True)  # a hub name works from the local cache only: no downloads
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        raise PeftkitError(
            f"cannot load a tokenizer from tokenizer_name_or_path={path!r} ({error}); pass a folder written by "
            "tokenizer.save_pretrained (hub names work only when already in the local cache)"
        ) from None


class PromptEncoderAdapter(VirtualTokenAdapter):
    """P-tuning: virtual tokens = encoder(embedding), embedding: (num_virtual_tokens, token_dim).

    The encoder has peft's layout, so parameter counts match: MLP = Linear(token_dim, hidden), ReLU,
    Linear(hidden, hidden), ReLU, Linear(hidden, token_dim); LSTM = a bidirectional LSTM (hidden per
    direction) followed by Linear(2 hidden, 2 hidden), ReLU, Linear(2 hidden, token_dim). A loaded
    adapter (inference_mode) has no encoder: `embedding` then holds the virtual tokens themselves.
    """

    def __init__(self, config: PromptEncoderConfig):
        super().__init__(config)
        dim, hidden = config.token_dim, config.encoder_hidden_size
        self.embedding = nn.Parameter(torch.randn(config.num_virtual_tokens, dim))  # nn.Embedding's default, as peft
        self.encoder_type = config.encoder_reparameterization_type
        self.lstm_head = None
        self.mlp_head = None
        if config.inference_mode:
            return
        if self.encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(input_size=dim, hidden_size=hidden, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout if config.encoder_num_layers > 1 else 0.0,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))

    @property
    def has_encoder(self) -> bool:
        return self.mlp_head is not None

    def virtual_tokens(self):
        if not self.has_encoder:
            return self.embedding
        hidden = self.embedding.unsqueeze(0)  # (1, V, token_dim): the LSTM reads the tokens as one sequence
        if self.lstm_head is not None:
            hidden = self.lstm_head(hidden)[0]
        return self.mlp_head(hidden)[0]

    def extra_repr(self) -> str:
        encoder = self.encoder_type if self.has_encoder else "none (loaded tokens)"
        return f"num_virtual_tokens={self.num_virtual_tokens}, token_dim={self.token_dim}, encoder={encoder}"

    def file_tensors(self):
        # peft saves the encoder's output; computed without dropout so the file does not depend on
        # whether the model was in training mode.
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                tokens = self.virtual_tokens().detach().clone()
        finally:
            self.train(was_training)
        return {"prompt_embeddings": tokens}

    def _assign_file_tensors(self, tensors):
        # A file holds the encoder's output only: the encoder (if any) is dropped and the loaded
        # tokens are used as they are.
        self.lstm_head = None
        self.mlp_head = None
        with torch.no_grad():
            self.embedding.copy_(tensors["prompt_embeddings"])


def add_adapter(model: nn.Module, config: PromptLearningConfig, adapter_name: str, skip: list[str]) -> Attached:
    method = "prompt tuning" if isinstance(config, PromptTuningConfig) else "P-tuning"
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) or config.task_type == "SEQ_2_SEQ_LM":
        raise PeftkitError(
            f"{method} in peftkit supports decoder-only and encoder-only models; {type(model).__name__} is an "
            "encoder-decoder model"
        )
    embeddings = input_token_embeddings(model, method)
    config = fill_from_model(config, model, embeddings)
    if isinstance(config, PromptTuningConfig):
        owner = PromptTuningAdapter(config, embeddings.base_layer if isinstance(embeddings, AdaptedModule) else embeddings)
    elif isinstance(config, PromptEncoderConfig):
        owner = PromptEncoderAdapter(config)
    else:  # pragma: no cover - the registry sends only these two here
        raise PeftkitError(f"{type(config).__name__} is not a prompt-learning config")
    return Attached(targets=[], model_adapter=owner, config=config)

# How `peftkit train` trains them.
METHODS = (
    Method("prompt", PromptTuningConfig, dict(num_virtual_tokens=20, prompt_tuning_init="SAMPLE_VOCAB"), learning_rate=3e-2,
           causal_defaults=dict(num_virtual_tokens=20), causal_learning_rate=3e-2),
    Method("ptuning", PromptEncoderConfig, dict(num_virtual_tokens=20, encoder_hidden_size=128), learning_rate=3e-3,
           causal_defaults=dict(num_virtual_tokens=20), causal_learning_rate=3e-3),
)
