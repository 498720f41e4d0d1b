"""The contract every PEFT method keeps, run once per method (a row) on every tiny model it applies to.

To add a method, add one `Row(...)` to ROWS below:

    Row("mymethod", MyConfig, lambda kind: dict(r=2, target_modules=TARGETS[kind]),
        kinds=("bert", "gpt2", "llama", "vit"), merges=True, peft="MyConfig")

- `config` (a config class) and `kwargs` (model kind -> the config's fields) build a small adapter for that tiny
  model (tiny_bert / tiny_gpt2 / tiny_llama / tiny_vit from conftest.py);
- `kinds` are the tiny models the method applies to;
- `merges` says whether merge_adapter works (else it must refuse with a PeftkitError and change nothing);
- `peft` names Hugging Face peft's config class where peft has the method: the trainable-parameter counts must
  then be equal;
- the other options say where a method differs from the contract's default, each with its reason.

Every row then runs every `test_*` below. What is specific to one method (its maths, its file layout, its
errors) stays in that method's own test file.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import logits, randomise, tiny_bert, tiny_cnn, tiny_gpt2, tiny_llama, tiny_vit

import peftkit
from peftkit import PeftkitError, PeftModel, get_peft_model
from peftkit.methods.base import AdaptedModule

MODELS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama, "vit": tiny_vit, "cnn": tiny_cnn}
KINDS = tuple(MODELS)
TRANSFORMERS = ("bert", "gpt2", "llama", "vit")  # the kinds of the methods that refuse a CNN (tests/test_vision.py)
TEXT = ("bert", "gpt2", "llama")
TASKS = {"bert": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM"}
# Attention projections with the same role in every tiny model (GPT-2 fuses q, k and v into one Conv1D).
TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"], "vit": ["q_proj", "v_proj"],
           "cnn": ["expand_conv", "project_conv"]}  # the CNN's pointwise (1x1) convolutions


@dataclass(frozen=True)
class Row:
    name: str
    config: type
    kwargs: Callable[[str], dict]
    kinds: tuple[str, ...] = KINDS
    merges: bool = True
    peft: str | None = None  # the peft config class with the same fields, where peft has the method
    starts_at_base: bool = True  # a new adapter computes exactly what the base computes
    trainable: str = r"\.adapters\.default\."  # every trainable parameter's name matches this
    unmerge_atol: float = 1e-6  # unmerge_adapter gives back the base weights within this
    adapter_only: bool = True  # False: the method trains the base itself (full fine-tuning)
    several_adapters: bool = True  # the model takes a second named adapter of this method

    def fields(self, kind):
        # BERT classifies: its freshly initialised head trains with the adapter (peft's SEQ_CLS modules_to_save),
        # without which the tiny head's outputs barely move.
        task = {"task_type": "SEQ_CLS"} if kind == "bert" and self.adapter_only else {}
        return {**task, **self.kwargs(kind)}

    def make_config(self, kind):
        return self.config(**self.fields(kind))

    def __str__(self):
        return self.name


def _prompt(**fields):
    return lambda kind: dict(task_type=TASKS[kind], **fields)


ROWS = [
    Row("lora", peftkit.LoraConfig, lambda k: dict(r=2, lora_alpha=4, target_modules=TARGETS[k]), peft="LoraConfig"),
    # dora: its merge restores the base within float rounding of the weight norm (as test_dora bounds it)
    Row("dora", peftkit.LoraConfig, lambda k: dict(r=2, target_modules=TARGETS[k] if k == "cnn" else "all-linear",
                                                   use_dora=True, bias="lora_only"),
        peft="LoraConfig", unmerge_atol=1e-5),
    Row("adalora", peftkit.AdaLoraConfig, lambda k: dict(init_r=4, target_r=2, total_step=10, target_modules=TARGETS[k]),
        kinds=TRANSFORMERS, peft="AdaLoraConfig"),  # peft's AdaLoRA has no Conv2d layer
    Row("vera", peftkit.VeraConfig, lambda k: dict(r=8, target_modules="all-linear", bias="vera_only"), kinds=TRANSFORMERS,
        peft="VeraConfig"),
    # loha / lokr: no layer for transformers' Conv1D (GPT-2), as in peft
    Row("loha", peftkit.LoHaConfig, lambda k: dict(r=2, alpha=4, target_modules=TARGETS[k]), kinds=("bert", "llama", "vit", "cnn"),
        peft="LoHaConfig"),
    Row("lokr", peftkit.LoKrConfig, lambda k: dict(r=2, alpha=4, target_modules=TARGETS[k]), kinds=("bert", "llama", "vit", "cnn"),
        peft="LoKrConfig"),
    # OFT rotates the inputs of linear layers in blocks (8 wide here: the tiny models are 32 wide); GPT-2's Conv1D is
    # refused at wrap time (tests/test_oft.py), as in peft.
    Row("oft", peftkit.OFTConfig, lambda k: dict(oft_block_size=8, target_modules=TARGETS[k]), kinds=("bert", "llama", "vit"),
        peft="OFTConfig"),
    # ia3 / ln_tuning: peft has no default targets for ViT, so ViT names them
    Row("ia3", peftkit.IA3Config, lambda k: {"vit": dict(target_modules=["k_proj", "v_proj", "fc2"], feedforward_modules=["fc2"]),
                                              "cnn": dict(target_modules=TARGETS["cnn"], feedforward_modules=["project_conv"])
                                              }.get(k, {}), peft="IA3Config"),
    Row("adapter", peftkit.BottleneckConfig, lambda k: dict(bottleneck_size=4), kinds=TRANSFORMERS, merges=False),
    # virtual tokens: text models only; the prompt is random from the start, so the output changes at once
    Row("prompt", peftkit.PromptTuningConfig, _prompt(num_virtual_tokens=3), kinds=TEXT, merges=False,
        peft="PromptTuningConfig", starts_at_base=False, trainable=r"\.default\."),
    Row("ptuning", peftkit.PromptEncoderConfig, _prompt(num_virtual_tokens=3, encoder_hidden_size=8), kinds=TEXT,
        merges=False, peft="PromptEncoderConfig", starts_at_base=False, trainable=r"\.default\."),
    Row("prefix", peftkit.PrefixTuningConfig, _prompt(num_virtual_tokens=3), kinds=TEXT, merges=False,
        peft="PrefixTuningConfig", starts_at_base=False, trainable=r"\.default\."),
    Row("sparse", peftkit.SparseConfig, lambda k: dict(budget=0.1, importance="magnitude", **({"target_modules": TARGETS[k]}
                                                                                              if k == "cnn" else {})),
        trainable=r"adapters\.default\."),  # the entries' values, and BERT's head
    # bitfit: the Llama family has no biases to train
    Row("bitfit", peftkit.BitFitConfig, lambda k: dict(), kinds=("bert", "gpt2", "vit", "cnn")),  # cnn: BatchNorm shifts
    Row("ln_tuning", peftkit.LNTuningConfig, lambda k: {"bert": dict(target_modules=["LayerNorm"]),
                                                        "vit": dict(target_modules=["layernorm_before", "layernorm_after"])
                                                        }.get(k, {}), kinds=TRANSFORMERS, peft="LNTuningConfig"),
    # freeze: a second FreezeConfig cannot find the block list once the first has wrapped the blocks
    Row("freeze", peftkit.FreezeConfig, lambda k: dict(last_k=1), several_adapters=False),
    # linear_probe (peftkit train --method linear_probe): the classification head alone
    Row("linear_probe", peftkit.FreezeConfig, lambda k: dict(modules_to_save=["classifier"]), kinds=("bert", "vit", "cnn")),
    Row("full", peftkit.FullFinetuneConfig, lambda k: dict(), merges=False, trainable=r"", adapter_only=False),
]


def cases(where=lambda row: True):
    """(row, model kind) for every row that `where` keeps, each as its own test id (lora-bert, ...)."""
    return [pytest.param(row, kind, id=f"{row.name}-{kind}") for row in ROWS if where(row) for kind in row.kinds]


def differs(a, b):
    """Outputs that are not the same (virtual-token methods also lengthen a causal LM's output)."""
    return a.shape != b.shape or not torch.allclose(a, b, atol=1e-4)


def inputs(kind):
    if kind in ("vit", "cnn"):
        size = 16 if kind == "vit" else 32
        return {"pixel_values": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))}
    return {"input_ids": torch.randint(2, 120, (2, 9), generator=torch.Generator().manual_seed(1))}


def wrap(row, kind, adapter_name="default"):
    model = get_peft_model(MODELS[kind](), row.make_config(kind), adapter_name=adapter_name)
    model.prepare_training([inputs(kind)])  # sparse fine-tuning picks its entries here; a no-op for the others
    return model


def base_state(model):
    """The base model's own tensors by their plain names, wherever an adapter wrapper moved them."""
    return {re.sub(r"\.base_layer(?=\.)", "", key): value
            for key, value in model.base_model.state_dict().items() if ".adapters." not in key}


@pytest.mark.parametrize("row, kind", cases())
def test_wraps_and_runs_forward(row, kind):
    base = logits(MODELS[kind](), **inputs(kind))
    model = wrap(row, kind)
    out = logits(model, **inputs(kind))
    # (batch, ..., classes or vocabulary); virtual tokens may lengthen the sequence
    assert (out.shape[0], out.shape[-1]) == (base.shape[0], base.shape[-1]) and torch.isfinite(out).all()
    if row.starts_at_base:
        torch.testing.assert_close(out, base, rtol=0, atol=0)


@pytest.mark.parametrize("row, kind", cases(lambda row: row.adapter_only))
def test_disable_adapter_gives_the_base_model(row, kind):
    base = logits(MODELS[kind](), **inputs(kind))
    model = wrap(row, kind)
    randomise(model)
    assert differs(logits(model, **inputs(kind)), base)  # the adapter does something
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, **inputs(kind)), base, rtol=0, atol=0)
    assert differs(logits(model, **inputs(kind)), base)  # and is back after the block


@pytest.mark.parametrize("row, kind", cases())
def test_training_changes_only_the_adapter(row, kind):
    model = wrap(row, kind)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    assert trainable and all(re.search(row.trainable, n) for n in trainable), list(trainable)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):  # zero-initialised factors (LoRA's B) get a gradient only after the first step
        model(**inputs(kind)).logits.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name
        else:
            assert not torch.equal(parameter, trainable[name]), name  # every adapter tensor learns
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    if row.adapter_only:
        base = logits(MODELS[kind](), **inputs(kind))
        assert differs(logits(model, **inputs(kind)), base)
        with model.disable_adapter():
            torch.testing.assert_close(logits(model, **inputs(kind)), base, rtol=0, atol=0)
    else:
        with pytest.raises(PeftkitError, match="no adapter to disable"):
            with model.disable_adapter():
                pass


@pytest.mark.parametrize("row, kind", cases(lambda row: row.adapter_only))  # full: test_model saves a plain model
def test_save_and_load_give_identical_outputs(row, kind, tmp_path):
    model = wrap(row, kind)
    randomise(model)
    expected = logits(model, **inputs(kind))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(MODELS[kind](), tmp_path)
    torch.testing.assert_close(logits(loaded, **inputs(kind)), expected, rtol=0, atol=0)
    assert isinstance(peftkit.load_config(tmp_path), row.config)


@pytest.mark.parametrize("row, kind", cases(lambda row: row.merges))
def test_merge_is_exact_and_unmerge_restores_the_base(row, kind):
    model = wrap(row, kind)
    before = {k: v.clone() for k, v in base_state(model).items()}
    randomise(model)
    unmerged = logits(model, **inputs(kind))
    model.merge_adapter()
    torch.testing.assert_close(logits(model, **inputs(kind)), unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    after = base_state(model)
    assert after.keys() == before.keys()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=row.unmerge_atol, msg=key)
    torch.testing.assert_close(logits(model, **inputs(kind)), unmerged, rtol=0, atol=1e-5)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, AdaptedModule) for m in plain.modules())
    torch.testing.assert_close(logits(plain, **inputs(kind)), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("row, kind", cases(lambda row: not row.merges and row.adapter_only))
def test_merge_is_refused_and_changes_nothing(row, kind):
    model = wrap(row, kind)
    randomise(model)
    expected = logits(model, **inputs(kind))
    with pytest.raises(PeftkitError, match="cannot be merged"):
        model.merge_adapter()
    torch.testing.assert_close(logits(model, **inputs(kind)), expected, rtol=0, atol=0)


@pytest.mark.parametrize("row, kind", cases(lambda row: row.peft is not None))
def test_trainable_parameter_count_equals_peft(row, kind):
    import peft

    ours = get_peft_model(MODELS[kind](), row.make_config(kind))
    theirs = peft.get_peft_model(MODELS[kind](), getattr(peft, row.peft)(**row.fields(kind)))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("row, kind", cases(lambda row: row.adapter_only and row.several_adapters))
def test_several_adapters_switch_save_and_delete(row, kind, tmp_path):
    model = wrap(row, kind)
    randomise(model)  # only the active adapter trains
    first = logits(model, **inputs(kind))
    model.add_adapter("second", row.make_config(kind))
    assert model.active_adapters == ["default"]
    torch.testing.assert_close(logits(model, **inputs(kind)), first, rtol=0, atol=0)  # adding does not activate
    model.set_adapter("second")
    model.prepare_training([inputs(kind)])
    randomise(model, seed=5)
    second = logits(model, **inputs(kind))
    assert differs(first, second)
    model.set_adapter("default")
    torch.testing.assert_close(logits(model, **inputs(kind)), first, rtol=0, atol=0)

    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(MODELS[kind](), tmp_path)
    again.load_adapter(tmp_path / "second", "second")
    torch.testing.assert_close(logits(again, **inputs(kind)), first, rtol=0, atol=0)
    again.set_adapter("second")
    torch.testing.assert_close(logits(again, **inputs(kind)), second, rtol=0, atol=0)

    model.delete_adapter("second")
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    torch.testing.assert_close(logits(model, **inputs(kind)), first, rtol=0, atol=0)
    with pytest.raises(PeftkitError, match="no adapter named 'second'"):
        model.set_adapter("second")
