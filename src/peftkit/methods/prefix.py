"""Prefix tuning: trained keys and values put in front of every attention layer (Li & Liang, 2021).

Each attention layer attends to `num_virtual_tokens` extra positions whose keys and values are
trained; the base model's weights and its real tokens stay as they are. The prefix for all layers
is one table of shape (num_virtual_tokens, num_layers * 2 * token_dim): per layer a key and a value
of (num_key_value_heads, head_dim) for each virtual token. It reaches the model as an already filled
key/value cache, which is how Hugging Face `peft` does it, so the real tokens sit at positions
num_virtual_tokens, num_virtual_tokens + 1, ... exactly as in peft. The cache argument is called
`past_key_values` up to transformers 5.23 and `cache` from 5.24 on (the old name is deprecated there);
the prefix is passed under whichever name the model's forward declares.

With `prefix_projection=True` the table is produced by a small network during training (virtual
token embeddings -> Linear -> Tanh -> Linear), which trains more stably; files hold only the table
it produces, under the key `prompt_embeddings` as peft writes it, so a loaded adapter is the table.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Literal

import torch
from torch import nn

from peftkit.config import Method, PeftConfig, register_config
from peftkit.errors import PeftkitError
from peftkit.methods.base import Attached, ModelAdapter

FILE_KEY = "prompt_embeddings"


@register_config
@dataclasses.dataclass
class PrefixTuningConfig(PeftConfig):
    """Prefix tuning. Field names and meanings are those of Hugging Face `peft.PrefixTuningConfig`.

    num_virtual_tokens: how many trained key/value positions each attention layer gets (required).
    token_dim, num_attention_heads, num_layers: the size of one layer's key (heads * head dimension),
    its number of key/value heads, and the number of attention layers; None reads them from the
    model's config when the adapter is attached (for grouped-query attention, as in Llama, the
    key/value heads: token_dim = num_key_value_heads * head_dim). num_transformer_submodules: 1
    (encoder-decoder models, which peft gives 2, are not supported). prefix_projection: produce the
    prefix with a two-layer network of hidden size encoder_hidden_size (None: token_dim) while
    training. init_weights: None (random normal prefix) or "zero" (the prefix starts at zero).
    modules_to_save: modules trained whole (e.g. a new classifier head).
    """

    peft_type = "PREFIX_TUNING"

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: Literal["zero"] | None = None
    modules_to_save: list[str] | None = None

    def validate(self):
        super().validate()
        if self.num_virtual_tokens is None:
            raise PeftkitError("PrefixTuningConfig.num_virtual_tokens must be set: how many key/value positions "
                               "to train per attention layer (10 to 30 is usual)")
        for name in ("num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers", "encoder_hidden_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise PeftkitError(f"PrefixTuningConfig.{name} must be a positive integer, got {value}")
        if self.num_transformer_submodules not in (None, 1):
            raise PeftkitError(
                f"PrefixTuningConfig.num_transformer_submodules={self.num_transformer_submodules}: only 1 is supported "
                "(peftkit's prefix tuning serves decoder-only and encoder-only models, not encoder-decoder ones)"
            )
        if self.token_dim is not None and self.num_attention_heads is not None and self.token_dim % self.num_attention_heads:
            raise PeftkitError(
                f"PrefixTuningConfig.token_dim={self.token_dim} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; token_dim is heads * head dimension"
            )


class KeyValuePrefix(ModelAdapter):
    """The trained prefix of every attention layer, and the forward/generate that feed it to the model.

    Holds either the table itself, `prefix_table` (num_virtual_tokens, num_layers * 2 * token_dim),
    or, with prefix_projection while training, `token_embeddings` (num_virtual_tokens, token_dim) and
    `projection`, the network that maps them to that table.
    """

    intercepts_forward = True
    mergeable = False
    merge_refusal = ("prefix tuning adds trained keys and values to the input of every attention layer rather "
                     "than changing a weight, so there is no weight to merge it into")
    module_key_prefix = "base_model."

    def __init__(self, config: PrefixTuningConfig):
        super().__init__()
        self.num_virtual_tokens = config.num_virtual_tokens
        self.num_layers = config.num_layers
        self.num_heads = config.num_attention_heads
        self.head_dim = config.token_dim // config.num_attention_heads
        table_width = config.num_layers * 2 * config.token_dim
        zero = config.init_weights == "zero"
        # As in peft: the projection network exists only while training; an adapter made for inference
        # (or read from a file) is the table it produced.
        if config.prefix_projection and not config.inference_mode:
            self.token_embeddings = nn.Parameter(torch.randn(config.num_virtual_tokens, config.token_dim))
            self.projection = nn.Sequential(
                nn.Linear(config.token_dim, config.encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, table_width),
            )
            if zero:
                nn.init.zeros_(self.projection[-1].weight)
                nn.init.zeros_(self.projection[-1].bias)
            self.prefix_table = None
        else:
            initial = torch.zeros if zero else torch.randn
            self.prefix_table = nn.Parameter(initial(config.num_virtual_tokens, table_width))
            self.token_embeddings = None
            self.projection = None

    # -- the prefix --------------------------------------------------------------------------------
    def table(self) -> torch.Tensor:
        """(num_virtual_tokens, num_layers * 2 * token_dim): per virtual token, every layer's key and value."""
        if self.prefix_table is not None:
            return self.prefix_table
        return self.projection(self.token_embeddings)

    def key_value_cache(self, batch_size: int, dtype: torch.dtype | None = None):
        """A transformers DynamicCache holding the prefix: per layer, keys and values of shape
        (batch_size, num_key_value_heads, num_virtual_tokens, head_dim)."""
        from transformers import DynamicCache

        table = self.table()
        if dtype is not None:
            table = table.to(dtype)
        # The table's row layout is peft's: for each layer, its key then its value, each heads * head_dim.
        per_layer = table.view(self.num_virtual_tokens, self.num_layers, 2, self.num_heads, self.head_dim)
        per_layer = per_layer.permute(1, 2, 3, 0, 4)  # (layers, key/value, heads, virtual tokens, head_dim)
        per_layer = per_layer.unsqueeze(2).expand(-1, -1, batch_size, -1, -1, -1)
        return DynamicCache([(layer[0], layer[1]) for layer in per_layer])

    def _with_prefix_mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """(batch, sequence) -> (batch, num_virtual_tokens + sequence): every example sees the prefix."""
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2:
            raise PeftkitError(
                f"prefix tuning extends a 2D attention mask (batch, sequence) with the prefix; got shape "
                f"{tuple(attention_mask.shape)}: pass the 2D padding mask"
            )
        ones = attention_mask.new_ones(attention_mask.shape[0], self.num_virtual_tokens)
        return torch.cat([ones, attention_mask], dim=1)

    # -- running the model -------------------------------------------------------------------------
    def forward(self, model: nn.Module, input_ids=None, attention_mask=None, inputs_embeds=None, position_ids=None,
                past_key_values=None, cache=None, **kwargs):
        """Run `model` with the prefix in every attention layer.

        The attention mask gets num_virtual_tokens ones in front; given position ids are shifted by
        num_virtual_tokens (as peft does), otherwise the model counts positions on from the prefix.
        A non-empty cache (`past_key_values`, or `cache` as transformers >= 5.24 calls it) is taken to
        come from an earlier call (it holds the prefix already).
        """
        inputs = input_ids if input_ids is not None else inputs_embeds
        if inputs is None:
            raise PeftkitError("prefix tuning needs input_ids or inputs_embeds to know the batch size")
        given = _one_cache(past_key_values, cache)
        fresh = given is None or given.get_seq_length() == 0
        cache = self.key_value_cache(inputs.shape[0], _dtype_of(model)) if fresh else given
        if position_ids is not None:
            position_ids = position_ids + self.num_virtual_tokens
        arguments = dict(input_ids=input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids,
                         attention_mask=self._with_prefix_mask(attention_mask))
        arguments = {key: value for key, value in arguments.items() if value is not None}
        cache_name = cache_argument(model)
        output = model(**arguments, **{cache_name: cache}, **kwargs)
        if fresh and inputs.shape[1] > 0 and cache.get_seq_length() <= self.num_virtual_tokens:
            # Every attention layer appends its own keys to the cache; if none did, the prefix was ignored.
            raise PeftkitError(
                f"{type(model).__name__} ran without using the key/value prefix (its attention layers never read "
                f"{cache_name}; gradient checkpointing in training mode does this): prefix tuning cannot work here"
            )
        return output

    def generate(self, model: nn.Module, **kwargs):
        """`model.generate(**kwargs)` with the prefix in front of the key/value cache.

        The model's own step preparation is wrapped for the call: when its cache is still empty (the
        first step) it is replaced by the prefix, and at every step the attention mask gets the prefix
        in front and the position ids move on by num_virtual_tokens, as in peft.
        """
        if not hasattr(model, "generate"):
            raise PeftkitError(f"{type(model).__name__} has no generate(); it is not a generative model")
        for name in CACHE_ARGUMENTS:
            if kwargs.get(name) is not None:
                raise PeftkitError(f"prefix tuning fills generate's key/value cache itself; do not pass {name}")
        prepare = model.prepare_inputs_for_generation
        replaced = vars(model).get("prepare_inputs_for_generation")
        cache_name = cache_argument(model)

        def prepare_with_prefix(*args, **kwargs):
            return self._add_prefix_to_step(prepare(*args, **kwargs), model, cache_name)

        model.prepare_inputs_for_generation = prepare_with_prefix
        try:
            return model.generate(**kwargs)
        finally:
            if replaced is None:
                del model.prepare_inputs_for_generation
            else:
                model.prepare_inputs_for_generation = replaced

    def _add_prefix_to_step(self, step_inputs: dict, model: nn.Module, cache_name: str) -> dict:
        """One generation step's model inputs with the prefix in: the cache, under `cache_name` (the
        name the model's forward takes), is the prefix while it is empty; mask and positions are shifted."""
        from transformers import DynamicCache

        inputs = step_inputs.get("input_ids")
        if inputs is None:
            inputs = step_inputs["inputs_embeds"]
        # transformers puts the step's cache under the name its generate uses (`cache` from 5.24 on).
        cache = _one_cache(*(step_inputs.pop(name, None) for name in CACHE_ARGUMENTS))
        if cache is None or cache.get_seq_length() == 0:
            if cache is not None and not isinstance(cache, DynamicCache):
                raise PeftkitError(
                    f"prefix tuning generates with the dynamic key/value cache only, not {type(cache).__name__}; "
                    "leave cache_implementation unset"
                )
            cache = self.key_value_cache(inputs.shape[0], _dtype_of(model))
        step_inputs[cache_name] = cache
        if step_inputs.get("attention_mask") is not None:
            step_inputs["attention_mask"] = self._with_prefix_mask(step_inputs["attention_mask"])
        if step_inputs.get("position_ids") is not None:
            step_inputs["position_ids"] = step_inputs["position_ids"] + self.num_virtual_tokens
        return step_inputs

    # -- files -------------------------------------------------------------------------------------
    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {FILE_KEY: self.table().detach()}

    def _assign_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        table = tensors[FILE_KEY]
        if self.prefix_table is None:
            # A file holds the table the projection produced; the projection cannot be recovered from
            # it, so the loaded adapter is that table (peft loads it the same way).
            device = self.token_embeddings.device
            self.token_embeddings = None
            self.projection = None
            self.prefix_table = nn.Parameter(table.to(device=device, dtype=torch.float32).clone())
            return
        with torch.no_grad():
            self.prefix_table.copy_(table.to(self.prefix_table))


def _dtype_of(model: nn.Module) -> torch.dtype | None:
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _one_cache(past_key_values, cache):
    """The key/value cache given under either name (None if neither); both at once is an error."""
    if past_key_values is not None and cache is not None:
        raise PeftkitError("got both past_key_values and cache, two names for the same key/value cache; pass one")
    return cache if cache is not None else past_key_values


# -- fitting the prefix to the model -----------------------------------------------------------------
# The name of a transformers forward's key/value cache argument: `cache` from transformers 5.24 on,
# `past_key_values` before (5.24 to 5.39 still take the old name through a deprecation shim).
CACHE_ARGUMENTS = ("cache", "past_key_values")


def _cache_parameter(function) -> str | None:
    """Which of CACHE_ARGUMENTS `function` declares (the new name first), or None."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in CACHE_ARGUMENTS if name in parameters), None)


def _backbone(model: nn.Module):
    from transformers import PreTrainedModel

    return next((child for _, child in model.named_children() if isinstance(child, PreTrainedModel)), None)


def cache_argument(model: nn.Module) -> str:
    """The keyword under which `model`'s forward takes a key/value cache: "past_key_values" or "cache".

    Read from the forward's signature, or for a model that hands extra keywords on to its backbone
    (BERT-style classifiers in transformers 5), from the backbone's. Raises PeftkitError if neither
    takes one.
    """
    name = _cache_parameter(model.forward)
    if name is not None:
        return name
    backbone = _backbone(model)
    name = _cache_parameter(backbone.forward) if backbone is not None else None
    if name is not None and _takes_any_keyword(model.forward):
        return name
    where = f" nor does its backbone {type(backbone).__name__}'s" if backbone is not None else ""
    raise PeftkitError(
        f"prefix tuning needs a model with attention key/value caches: {type(model).__name__}'s forward takes no "
        f"past_key_values (or cache, as transformers >= 5.24 names it){where}, so there is nowhere to put trained "
        "keys and values. Use LoRA, IA3 or prompt tuning for this model."
    )


def _takes_any_keyword(function) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def check_model_takes_prefix(model: nn.Module) -> None:
    """Raise PeftkitError unless `model` can run with a key/value cache filled in advance.

    Either its forward takes a cache (`past_key_values`, or `cache` from transformers 5.24 on), or
    (BERT-style classifiers in transformers 5) it hands extra keywords on to a backbone whose forward
    takes one. peft calls such a backbone and the head itself; handing the cache on through the
    model's own forward computes the same.
    """
    name = type(model).__name__
    if not hasattr(getattr(model, "config", None), "to_dict"):
        raise PeftkitError(
            f"prefix tuning needs a transformers model (with a config naming its layers and attention heads); "
            f"{name} has none. Use LoRA or another module-level method for plain PyTorch models."
        )
    if getattr(model.config, "is_encoder_decoder", False):
        raise PeftkitError(
            f"{name} is an encoder-decoder model; peftkit's prefix tuning serves decoder-only and encoder-only "
            "models. Use LoRA or IA3 for encoder-decoder models."
        )
    if any(getattr(module, "gradient_checkpointing", False) for module in model.modules()):
        raise PeftkitError(
            f"{name} has gradient checkpointing on; the recomputed layers do not see the key/value prefix "
            "(peft refuses this too). Turn it off (model.gradient_checkpointing_disable()) for prefix tuning."
        )
    cache_argument(model)


def _text_config(model_config):
    get_text_config = getattr(model_config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else model_config


def _first_attribute(config, names: tuple[str, ...]):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def model_prefix_sizes(model_config) -> dict[str, int]:
    """The prefix sizes a model needs, read from its config as peft reads them.

    Returns num_layers, token_dim and num_attention_heads (None where the config does not say); with
    grouped-query attention (a config with num_key_value_heads) the heads are the key/value heads and
    token_dim = heads * head_dim. Also "query_token_dim" / "query_heads": the plain hidden size and
    head count, which peft accepts in a config for such a model and replaces by the key/value sizes.
    """
    config = _text_config(model_config)
    written = config.to_dict()  # what the config holds itself (every config has a per_layer_config property)
    if written.get("global_head_dim") is not None or written.get("per_layer_config") is not None:
        raise PeftkitError(
            f"{type(config).__name__} has attention layers of different key/value shapes; peftkit's prefix tuning "
            "needs one shape for every layer"
        )
    layers = _first_attribute(config, ("num_hidden_layers", "num_layers", "n_layer"))
    hidden = _first_attribute(config, ("hidden_size", "n_embd", "d_model"))
    heads = _first_attribute(config, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"))
    sizes = dict(num_layers=layers, token_dim=hidden, num_attention_heads=heads, query_token_dim=hidden, query_heads=heads)
    key_value_heads = getattr(config, "num_key_value_heads", None)
    if key_value_heads is not None and hidden is not None and heads is not None:
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        sizes.update(token_dim=head_dim * key_value_heads, num_attention_heads=key_value_heads)
    return sizes


def complete_config(config: PrefixTuningConfig, model: nn.Module) -> PrefixTuningConfig:
    """`config` with the sizes it leaves open read from the model; sizes that do not fit are an error."""
    sizes = model_prefix_sizes(model.config)
    filled = {}
    for field in ("num_layers", "token_dim", "num_attention_heads"):
        given, needed = getattr(config, field), sizes[field]
        query_size = {"token_dim": sizes["query_token_dim"], "num_attention_heads": sizes["query_heads"]}.get(field)
        # peft replaces the query sizes by the key/value sizes for grouped-query attention; do the same.
        if needed is None:
            if given is None:
                raise PeftkitError(
                    f"cannot read {field} from {type(model.config).__name__}; set PrefixTuningConfig.{field} yourself"
                )
            needed = given
        elif given is not None and given not in (needed, query_size):
            raise PeftkitError(
                f"PrefixTuningConfig.{field}={given} does not fit {type(model).__name__}, whose attention layers "
                f"need {field}={needed}; leave it unset to read it from the model"
            )
        filled[field] = needed
    filled["num_transformer_submodules"] = 1
    filled["encoder_hidden_size"] = config.encoder_hidden_size or filled["token_dim"]
    # peft needs a task type to apply a prefix at all (without one its PeftModel runs the bare model);
    # a generative model's is clear. Classifiers need task_type="SEQ_CLS" given, which also trains the head.
    can_generate = getattr(model, "can_generate", None)
    if config.task_type is None and callable(can_generate) and can_generate():
        filled["task_type"] = "CAUSAL_LM"
    return config.replace(**filled)


def add_adapter(model: nn.Module, config: PrefixTuningConfig, adapter_name: str, skip: list[str]) -> Attached:
    check_model_takes_prefix(model)
    config = complete_config(config, model)
    return Attached(targets=[], model_adapter=KeyValuePrefix(config), config=config)

# How `peftkit train` trains it: 20 trained key/value positions per layer, the table trained directly at
# 1e-2 (peft's sequence-classification example; P-tuning v2 trains without the reparameterisation on such
# tasks).
METHODS = (Method("prefix", PrefixTuningConfig, dict(num_virtual_tokens=20, prefix_projection=False), learning_rate=1e-2,
                  causal_defaults=dict(num_virtual_tokens=20, prefix_projection=False), causal_learning_rate=5e-3),)
