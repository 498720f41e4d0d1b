"""Mixed-adapter batches: each example runs with its own LoRA adapter, checked against running each
example alone with its adapter (PeftModel) and against Hugging Face peft's `adapter_names`."""

import json

import peft
import pytest
import torch
from conftest import randomise, tiny_bert, tiny_gpt2, tiny_llama

from peftkit import IA3Config, LoraConfig, PeftkitError, PeftModel, get_peft_model
from peftkit.mixed import BASE_ADAPTER, MixedLoraModel, gathered_lora_update

# Different ranks, per-module rank/alpha patterns and rsLoRA: each adapter is padded to the largest rank.
BERT_ADAPTERS = {
    "alpha": dict(r=2, lora_alpha=4, target_modules="all-linear"),
    "beta": dict(r=4, lora_alpha=8, target_modules=["query", "value"], rank_pattern={"value": 3}, alpha_pattern={"query": 2.0}),
    "gamma": dict(r=3, lora_alpha=5, target_modules=["key", "dense"], use_rslora=True),
}


def _save_adapters(make_model, adapters, root, **extra):
    """Save each adapter with random nonzero factors (and its own head for SEQ_CLS); {name: folder}."""
    folders = {}
    for seed, (name, fields) in enumerate(adapters.items()):
        model = get_peft_model(make_model(), LoraConfig(**fields, **extra))
        randomise(model, seed, scale=0.2)
        folders[name] = str(root / name)
        model.save_pretrained(folders[name])
    return folders


def _alone(make_model, folder, **inputs):
    model = make_model() if folder is None else PeftModel.from_pretrained(make_model(), folder)
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture
def bert_folders(tmp_path):
    return _save_adapters(tiny_bert, BERT_ADAPTERS, tmp_path, task_type="SEQ_CLS")


def test_mixed_batch_equals_each_example_alone_and_peft(bert_folders):
    mixed = MixedLoraModel.from_adapter_folders(tiny_bert(), bert_folders)
    assert mixed.max_rank == 4 and mixed.head is not None
    names = ["beta", BASE_ADAPTER, "alpha", "gamma", "beta", "alpha"]
    input_ids = torch.randint(2, 120, (len(names), 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = mixed(input_ids=input_ids, adapter_names=names).logits
    expected = torch.cat([_alone(tiny_bert, None if n == BASE_ADAPTER else bert_folders[n], input_ids=input_ids[i:i + 1])
                          for i, n in enumerate(names)])
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)

    theirs = peft.PeftModel.from_pretrained(tiny_bert(), bert_folders["alpha"], adapter_name="alpha")
    for name in ("beta", "gamma"):
        theirs.load_adapter(bert_folders[name], adapter_name=name)
    theirs.eval()
    with torch.no_grad():
        peft_logits = theirs(input_ids=input_ids, adapter_names=names).logits
    torch.testing.assert_close(logits, peft_logits, rtol=1e-5, atol=1e-6)


def test_one_adapter_for_every_row_and_ids_tensor(bert_folders):
    mixed = MixedLoraModel.from_adapter_folders(tiny_bert(), bert_folders, capacity=5)
    input_ids = torch.randint(2, 120, (3, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        same = mixed(input_ids=input_ids, adapter_ids=mixed.adapter_ids(["gamma"] * 3)).logits
        base = mixed(input_ids=input_ids, adapter_names=[BASE_ADAPTER] * 3).logits
    torch.testing.assert_close(same, _alone(tiny_bert, bert_folders["gamma"], input_ids=input_ids), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(base, _alone(tiny_bert, None, input_ids=input_ids), rtol=1e-6, atol=1e-7)


def test_kernel_pads_ranks_exactly_and_expands_rows():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, generator=generator)
    a1, b1 = torch.randn(2, 6, generator=generator), torch.randn(4, 2, generator=generator)
    a2, b2 = torch.randn(3, 6, generator=generator), torch.randn(4, 3, generator=generator)
    lora_A = torch.zeros(3, 3, 6)
    lora_B = torch.zeros(3, 4, 3)
    lora_A[1, :2], lora_B[1, :, :2], lora_A[2], lora_B[2] = a1, b1, a2, b2
    scaling = torch.tensor([0.0, 0.5, 2.0])
    update = gathered_lora_update(x, lora_A, lora_B, scaling, torch.tensor([2, 1]))
    torch.testing.assert_close(update[0], 2.0 * x[0] @ a2.T @ b2.T)
    torch.testing.assert_close(update[1], 0.5 * x[1] @ a1.T @ b1.T)
    # generate repeats each example's rows (beams): each row keeps its example's adapter
    repeated = gathered_lora_update(x.repeat_interleave(2, 0), lora_A, lora_B, scaling, torch.tensor([2, 1]))
    torch.testing.assert_close(repeated, update.repeat_interleave(2, 0))
    flat = gathered_lora_update(x[:, 0], lora_A, lora_B, scaling, torch.tensor([2, 0]))  # (batch, in) input
    torch.testing.assert_close(flat, torch.stack([update[0, 0], torch.zeros(4)]))
    with pytest.raises(PeftkitError, match="adapter ids were given for 2 examples but a layer received a batch of 3"):
        gathered_lora_update(torch.randn(3, 6), lora_A, lora_B, scaling, torch.tensor([2, 1]))


# Rows in a few runs of one adapter: a matmul pair per run; otherwise 1 token per row: slot-major
# layout; many tokens per row: factors gathered per row.
@pytest.mark.parametrize("layout,tokens", [("runs", 9), ("runs", 1), ("slot-major", 1), ("gathered", 9)])
def test_kernel_layouts_match_a_loop_in_value_and_gradient(layout, tokens, monkeypatch):
    from peftkit.methods.lora import mixed_batch as mixed_module

    if layout != "runs":
        monkeypatch.setattr(mixed_module, "MAX_RUNS", 0)
    generator = torch.Generator().manual_seed(1)
    lora_A = torch.randn(4, 3, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    lora_B = torch.randn(4, 6, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    scaling = torch.tensor([0.0, 1.5, 0.5, 2.0], dtype=torch.float64)
    x = torch.randn(6, tokens, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([2, 2, 1, 0, 2, 2])  # repeated slots (slot 2 in two runs), base rows, slot 3 unused
    base = torch.randn(6, tokens, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    def reference():
        return torch.stack([base[b] + scaling[i] * x[b] @ lora_A[i].T @ lora_B[i].T for b, i in enumerate(ids.tolist())])

    for with_base in (True, False):
        expected = reference()
        output = gathered_lora_update(x, lora_A, lora_B, scaling, ids, base if with_base else None, layouts={})
        torch.testing.assert_close(output, expected if with_base else expected - base)
        weights = torch.randn(output.shape, generator=generator, dtype=torch.float64)
        inputs = (x, lora_A, lora_B) + ((base,) if with_base else ())
        grads = torch.autograd.grad((output * weights).sum(), inputs)
        expected_grads = torch.autograd.grad((expected * weights).sum(), inputs)
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad, expected_grad)
        assert torch.count_nonzero(grads[1][3]) == 0 and torch.count_nonzero(grads[2][0]) == 0
    with torch.no_grad():  # in place into the base output
        into = base.detach().clone()
        assert gathered_lora_update(x.detach(), lora_A.detach(), lora_B.detach(), scaling, ids, into) is into
        torch.testing.assert_close(into, expected.detach())
    torch.autograd.gradcheck(lambda x_, a_, b_: gathered_lora_update(x_, a_, b_, scaling, ids, base.detach()),
                             (x, lora_A, lora_B))


# 2 rows x 1 token per run: the low-rank path; 9 x 3: merged (from 3 rows on: rows * (5 + 4) >= 5 * 4)
@pytest.mark.parametrize("rows_per_run,tokens,bias,conv1d", [(2, 1, True, False), (9, 3, False, False), (9, 3, True, True)])
def test_training_on_runs_fuses_the_frozen_matmul_exactly(rows_per_run, tokens, bias, conv1d, monkeypatch):
    """Training on rows in runs of one slot (co-training's layout) runs the whole layer as one node: with
    few rows the frozen matmul plus the low-rank path, with many the merged weight W + s B A."""
    from transformers.pytorch_utils import Conv1D

    from peftkit.methods.lora import mixed_batch as mixed_module
    from peftkit.mixed import AdapterSelection, MixedLoraLinear, _Selecting

    torch.manual_seed(3)
    in_features, out_features = 5, 4
    if conv1d:
        base = Conv1D(out_features, in_features).double()
        weight_rows = base.weight.detach().T
    else:
        base = torch.nn.Linear(in_features, out_features, bias=bias).double()
        weight_rows = base.weight.detach()
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    selection = AdapterSelection()
    layer = MixedLoraLinear(base, slots=4, max_rank=3, selection=selection).train()
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
        layer.scaling.copy_(torch.tensor([0.0, 1.5, 0.5, 2.0]))
    ids = torch.tensor([2] * rows_per_run + [0] * rows_per_run + [1] * rows_per_run)
    x = torch.randn(len(ids), tokens, in_features, dtype=torch.float64, requires_grad=True)
    called = []
    # the node computes the frozen matmul itself (the fused path) when it is given the weight (a[1])
    monkeypatch.setattr(mixed_module.LoraRuns, "forward", staticmethod(
        lambda ctx, *a, _f=mixed_module.LoraRuns.forward: (called.append(1) if a[1] is not None else None) or _f(ctx, *a)))
    with _Selecting(selection, ids):
        output = layer(x)
    assert called, "the fused path did not run"
    base_bias = base.bias.detach() if getattr(base, "bias", None) is not None else torch.zeros(out_features, dtype=torch.float64)

    def reference(x_, a_, b_):
        return torch.stack([x_[r] @ weight_rows.T + base_bias + layer.scaling[i] * x_[r] @ a_[i].T @ b_[i].T
                            for r, i in enumerate(ids.tolist())])

    expected = reference(x, layer.lora_A, layer.lora_B)
    torch.testing.assert_close(output, expected)
    weights = torch.randn(output.shape, dtype=torch.float64)
    inputs = (x, layer.lora_A, layer.lora_B)
    grads = torch.autograd.grad((output * weights).sum(), inputs)
    for grad, expected_grad in zip(grads, torch.autograd.grad((expected * weights).sum(), inputs)):
        torch.testing.assert_close(grad, expected_grad)
    assert torch.count_nonzero(grads[1][3]) == 0 and torch.count_nonzero(grads[1][0]) == 0
    assert all(p.grad is None for p in base.parameters())  # the frozen weight gets no gradient

    def fused(x_, a_, b_):
        with _Selecting(selection, ids):
            return mixed_module.LoraRuns.apply(x_, weight_rows, base.bias, None, a_, b_, layer.scaling,
                                               mixed_module.contiguous_runs(ids, None))

    torch.autograd.gradcheck(fused, (x, layer.lora_A.detach().clone().requires_grad_(),
                                     layer.lora_B.detach().clone().requires_grad_()))
    # dropout in a slot of the batch: the unfused path, which draws per-example masks
    called.clear()
    with torch.no_grad():
        layer.dropout[2] = 0.5
    with _Selecting(selection, ids):
        layer(x)
    assert not called


def test_runs_are_found_once_per_batch_and_many_runs_are_gathered():
    from peftkit.methods.lora.mixed_batch import MAX_RUNS, contiguous_runs

    layouts = {}
    assert contiguous_runs(torch.tensor([3, 3, 1, 0, 0, 3]), layouts) == [(3, 0, 2), (1, 2, 3), (0, 3, 5), (3, 5, 6)]
    assert len(layouts) == 1 and contiguous_runs(torch.tensor([3, 3, 1, 0, 0, 3]), layouts) is next(iter(layouts.values()))
    assert contiguous_runs(torch.arange(MAX_RUNS + 1), None) is None  # one adapter per example: gathered
    assert contiguous_runs(torch.arange(MAX_RUNS), None) == [(i, i, i + 1) for i in range(MAX_RUNS)]


def test_gradients_of_a_mixed_batch_are_the_per_adapter_sums(bert_folders):
    mixed = MixedLoraModel.from_adapter_folders(tiny_bert(), bert_folders, capacity=4)
    mixed.train()  # no dropout in these adapters; BERT's own dropout is switched off below
    for module in mixed.base_model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    names = ["gamma", "alpha", "gamma", BASE_ADAPTER]
    input_ids = torch.randint(2, 120, (4, 6), generator=torch.Generator().manual_seed(2))
    weights = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))

    def loss_of(rows, row_names):
        logits = mixed(input_ids=input_ids[rows], adapter_names=row_names).logits
        return (logits * weights[rows]).sum()

    loss_of(list(range(4)), names).backward()
    batch_grads = [p.grad.clone() for p in mixed.slot_parameters()]
    mixed.zero_grad()
    for row, name in enumerate(names):  # each example alone, gradients summed
        loss_of([row], [name]).backward()
    for parameter, batch_grad in zip(mixed.slot_parameters(), batch_grads):
        torch.testing.assert_close(batch_grad, parameter.grad, rtol=1e-4, atol=1e-6)
    used = {mixed.slot(n) for n in names if n != BASE_ADAPTER}
    for batch_grad in batch_grads:
        for slot in range(batch_grad.shape[0]):
            if slot not in used:  # slot 0 ("no adapter"), "beta" (not in the batch) and the empty slot 4
                assert torch.count_nonzero(batch_grad[slot]) == 0
    assert any(torch.count_nonzero(g[mixed.slot("gamma")]) > 0 for g in batch_grads)
    assert all(not p.requires_grad for p in mixed.base_model.parameters() if not any(p is q for q in mixed.slot_parameters()))


def test_gradient_matches_peftmodel_training(bert_folders):
    # The stacked slot's gradient is the same as a PeftModel's own adapter gradient.
    mixed = MixedLoraModel.from_adapter_folders(tiny_bert(), {"beta": bert_folders["beta"]})
    ours = PeftModel.from_pretrained(tiny_bert(), bert_folders["beta"], is_trainable=True)
    input_ids = torch.randint(2, 120, (2, 5), generator=torch.Generator().manual_seed(4))
    mixed(input_ids=input_ids, adapter_names=["beta", "beta"]).logits.square().sum().backward()
    ours(input_ids=input_ids).logits.square().sum().backward()
    layer = mixed.layers["bert.encoder.layer.1.attention.self.value"]
    delta = ours.base_model.bert.encoder.layer[1].attention.self.value.adapters["default"]
    torch.testing.assert_close(layer.lora_A.grad[1, :3], delta.lora_A.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(layer.lora_B.grad[1, :, :3], delta.lora_B.grad, rtol=1e-4, atol=1e-7)
    assert torch.count_nonzero(layer.lora_A.grad[1, 3:]) == 0  # padding stays zero


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_with_an_adapter_per_row_equals_each_row_alone(family, tmp_path):
    make = {"llama": tiny_llama, "gpt2": tiny_gpt2}[family]
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] if family == "llama" else ["c_attn", "c_proj", "c_fc"]
    adapters = {"one": dict(r=4, lora_alpha=8, target_modules=targets), "two": dict(r=2, lora_alpha=8, target_modules=targets[:2])}
    folders = _save_adapters(make, adapters, tmp_path)
    mixed = MixedLoraModel.from_adapter_folders(make(), folders)
    names = ["two", "one", BASE_ADAPTER]
    prompts = torch.randint(2, 120, (3, 5), generator=torch.Generator().manual_seed(5))
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        generated = mixed.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), adapter_names=names, **settings)
        beams = mixed.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), adapter_names=names,
                               num_beams=2, num_return_sequences=2, **settings)
    for row, name in enumerate(names):
        alone = make() if name == BASE_ADAPTER else PeftModel.from_pretrained(make(), folders[name])
        with torch.no_grad():
            expected = alone.generate(input_ids=prompts[row:row + 1], attention_mask=torch.ones_like(prompts[row:row + 1]), **settings)
            expected_beams = alone.generate(input_ids=prompts[row:row + 1], attention_mask=torch.ones_like(prompts[row:row + 1]),
                                            num_beams=2, num_return_sequences=2, **settings)
        assert torch.equal(generated[row:row + 1], expected), (name, generated[row], expected)
        assert torch.equal(beams[2 * row:2 * row + 2], expected_beams), name


def test_load_remove_reload_copies_into_slots_without_rewrapping(bert_folders):
    mixed = MixedLoraModel(tiny_bert(), "all-linear", capacity=2, max_rank=4, head="classifier")
    layers_before = [(name, id(module)) for name, module in mixed.base_model.named_modules()]
    input_ids = torch.randint(2, 120, (2, 5), generator=torch.Generator().manual_seed(6))
    assert mixed.load_adapter("alpha", bert_folders["alpha"]) == 1
    assert mixed.load_adapter("beta", bert_folders["beta"]) == 2
    with torch.no_grad():
        first = mixed(input_ids=input_ids, adapter_names=["alpha", "beta"]).logits
    mixed.remove_adapter("alpha")
    assert mixed.adapter_names == ["beta"]
    assert all(torch.count_nonzero(layer.lora_A[1]) == 0 for layer in mixed.layers.values())
    with pytest.raises(PeftkitError, match=r"no adapter named 'alpha' is loaded; loaded: beta"):
        mixed(input_ids=input_ids, adapter_names=["alpha", "beta"])
    assert mixed.load_adapter("gamma", bert_folders["gamma"]) == 1  # the freed slot
    mixed.remove_adapter("gamma")
    mixed.load_adapter("alpha", bert_folders["alpha"], tensors=None)
    with torch.no_grad():
        again = mixed(input_ids=input_ids, adapter_names=["alpha", "beta"]).logits
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert [(name, id(module)) for name, module in mixed.base_model.named_modules()] == layers_before


def test_save_adapter_loads_in_peftmodel_and_peft(bert_folders, tmp_path):
    mixed = MixedLoraModel.from_adapter_folders(tiny_bert(), bert_folders)
    input_ids = torch.randint(2, 120, (2, 5), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = mixed(input_ids=input_ids, adapter_names=["beta", "beta"]).logits
    mixed.save_adapter("beta", tmp_path / "saved")
    torch.testing.assert_close(_alone(tiny_bert, tmp_path / "saved", input_ids=input_ids), expected, rtol=1e-5, atol=1e-6)
    theirs = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-6)
    assert mixed.adapter_bytes("beta") == sum(t.numel() * 4 for t in PeftModel.from_pretrained(
        tiny_bert(), tmp_path / "saved").adapter_state("default").values())


def test_added_adapters_train_with_their_own_heads(tmp_path):
    mixed = MixedLoraModel(tiny_bert(num_labels=2), ["query", "value"], capacity=3, max_rank=8, head="classifier", max_labels=5)
    mixed.add_adapter("two", LoraConfig(r=8, target_modules=["query", "value"]), num_labels=2)
    mixed.add_adapter("five", LoraConfig(r=4, target_modules=["value"], init_lora_weights=False), num_labels=5)
    assert (mixed.num_labels("two"), mixed.num_labels("five"), mixed.num_labels(BASE_ADAPTER)) == (2, 5, 2)
    input_ids = torch.randint(2, 120, (3, 5), generator=torch.Generator().manual_seed(8))
    logits = mixed(input_ids=input_ids, adapter_names=["two", "five", BASE_ADAPTER]).logits
    assert logits.shape == (3, 5)
    assert torch.isinf(logits[0, 2:]).all() and torch.isfinite(logits[1]).all() and torch.isinf(logits[2, 2:]).all()
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([1, 4, 0]))
    loss.backward()
    assert torch.isfinite(loss)
    head = mixed.head
    assert torch.count_nonzero(head.weight.grad[0]) == 0  # the base head never trains
    assert torch.count_nonzero(head.weight.grad[1, :2]) > 0 and torch.count_nonzero(head.weight.grad[1, 2:]) == 0
    with pytest.raises(PeftkitError, match="cross_entropy"):
        mixed(input_ids=input_ids, adapter_names=["two"] * 3, labels=torch.tensor([0, 1, 0]))
    mixed.save_adapter("five", tmp_path / "five")
    with torch.no_grad():
        expected = mixed(input_ids=input_ids, adapter_names=["five"] * 3).logits
    torch.testing.assert_close(_alone(lambda: tiny_bert(num_labels=5), tmp_path / "five", input_ids=input_ids),
                               expected, rtol=1e-5, atol=1e-6)


def test_saved_slot_loads_as_a_run_without_naming_the_base(tiny_model_folder, tmp_path):
    """save_adapter writes no peftkit_run.json; load_run / `peftkit eval` take the base from adapter_config.json."""
    from peftkit import zoo
    from peftkit.train.job import load_run

    base, tokenizer = zoo.load_classifier(tiny_model_folder, num_labels=2)
    mixed = MixedLoraModel(base, ["query", "value"], capacity=2, max_rank=4, head="classifier", max_labels=3)
    mixed.add_adapter("three", LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False), num_labels=3)
    mixed.save_adapter("three", tmp_path / "three")
    encoded = tokenizer(["a fine day", "rain again"], padding=True, return_tensors="pt")
    loaded, _, info = load_run(tmp_path / "three")
    assert info == {}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**encoded).logits, mixed(**encoded, adapter_names=["three"] * 2).logits,
                                   rtol=1e-5, atol=1e-6)
    config = json.loads((tmp_path / "three" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "some-hub/model-not-here"
    (tmp_path / "three" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(PeftkitError, match="pass --model"):
        load_run(tmp_path / "three")


def test_errors_name_the_problem_and_the_way_out(bert_folders, tmp_path):
    mixed = MixedLoraModel(tiny_bert(), ["query", "value"], capacity=1, max_rank=3, head="classifier")
    with pytest.raises(PeftkitError, match=r"rank 4 at bert.encoder.layer.0.attention.self.query > max_rank 3"):
        mixed.load_adapter("beta", bert_folders["beta"])
    assert mixed.adapter_names == []
    with pytest.raises(PeftkitError, match=r"does not target"):
        mixed.load_adapter("alpha", bert_folders["alpha"])  # all-linear adapter, query/value model
    mixed.add_adapter("mine", LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(PeftkitError, match=r"all 1 adapter slots are taken \(mine\); remove_adapter one"):
        mixed.add_adapter("other", LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(PeftkitError, match=r"no adapter named 'nope' is loaded; loaded: mine"):
        mixed.adapter_ids(["mine", "nope"])
    with pytest.raises(PeftkitError, match="exactly one of adapter_ids"):
        mixed(input_ids=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(PeftkitError, match=r"adapter_ids must lie in 0..1"):
        mixed(input_ids=torch.ones(1, 3, dtype=torch.long), adapter_ids=torch.tensor([2]))

    # another base model's shapes: both shapes named
    from transformers import BertConfig, BertForSequenceClassification
    wide = BertForSequenceClassification(BertConfig(vocab_size=120, hidden_size=48, num_hidden_layers=3, num_attention_heads=2,
                                                    intermediate_size=64, num_labels=3, max_position_embeddings=64))
    other = MixedLoraModel(wide, "all-linear", capacity=3, max_rank=4, head="classifier")
    with pytest.raises(PeftkitError, match=r"lora_A \(2, 32\) and lora_B \(32, 2\) but this base model needs lora_A \(2, 48\)"):
        other.load_adapter("alpha", bert_folders["alpha"])

    dora = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"], use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(PeftkitError, match=r"DoRA adapter \(use_dora=True\); mixed batches hold plain LoRA only"):
        other.load_adapter("dora", tmp_path / "dora")
    ia3 = get_peft_model(tiny_bert(), IA3Config(target_modules=["key", "output.dense"], feedforward_modules=["output.dense"]))
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(PeftkitError, match=r"holds a IA3 adapter; mixed batches hold LoRA adapters only"):
        other.load_adapter("ia3", tmp_path / "ia3")
    with pytest.raises(PeftkitError, match=r"is a Embedding; this method adapts only Linear"):
        MixedLoraModel(tiny_bert(), ["query", "word_embeddings"], capacity=1, max_rank=2)
    saved_pooler = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"], modules_to_save=["pooler"]))
    saved_pooler.save_pretrained(tmp_path / "pooler")
    fresh = MixedLoraModel(tiny_bert(), ["query"], capacity=1, max_rank=2, head="classifier")
    with pytest.raises(PeftkitError, match=r"also saves modules \['bert.pooler.dense'\]"):
        fresh.load_adapter("pooler", tmp_path / "pooler")
    assert other.adapter_names == [] and fresh.adapter_names == []


# -- PeftModel(..., adapter_names=[...]) --------------------------------------------------------------

def _peft_model_with(make_model, folders, is_trainable=False):
    first, *rest = folders
    model = PeftModel.from_pretrained(make_model(), folders[first], adapter_name=first, is_trainable=is_trainable)
    for name in rest:
        model.load_adapter(folders[name], adapter_name=name, is_trainable=is_trainable)
    return model


def test_peftmodel_adapter_names_equals_each_example_alone_and_peft(bert_folders):
    ours = _peft_model_with(tiny_bert, bert_folders)
    names = ["gamma", "alpha", BASE_ADAPTER, "beta", "gamma"]
    input_ids = torch.randint(2, 120, (len(names), 6), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        logits = ours(input_ids=input_ids, adapter_names=names).logits
        again = ours(input_ids=input_ids, adapter_names=names).logits  # from the kept stacks
    expected = torch.cat([_alone(tiny_bert, None if n == BASE_ADAPTER else bert_folders[n], input_ids=input_ids[i:i + 1])
                          for i, n in enumerate(names)])
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, logits, rtol=0, atol=0)
    theirs = peft.PeftModel.from_pretrained(tiny_bert(), bert_folders["alpha"], adapter_name="alpha")
    for name in ("beta", "gamma"):
        theirs.load_adapter(bert_folders[name], adapter_name=name)
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits, theirs(input_ids=input_ids, adapter_names=names).logits, rtol=1e-5, atol=1e-6)
        # the active adapter is untouched by a mixed call
        ours.set_adapter("beta")
        torch.testing.assert_close(ours(input_ids=input_ids).logits, _alone(tiny_bert, bert_folders["beta"], input_ids=input_ids))
        # changed weights are seen (the kept stacks are rebuilt)
        ours.base_model.bert.encoder.layer[0].attention.self.key.adapters["gamma"].lora_B.mul_(3)
        changed = ours(input_ids=input_ids, adapter_names=names).logits
    assert not torch.allclose(changed[0], logits[0]) and torch.equal(changed[1:4], logits[1:4])


def test_peftmodel_adapter_names_from_several_threads_take_turns(bert_folders):
    """Mixed calls install hooks on shared modules; threads running at once must not see each other's."""
    from concurrent.futures import ThreadPoolExecutor

    ours = _peft_model_with(tiny_bert, bert_folders)
    batches = [["alpha", "beta"], ["gamma", BASE_ADAPTER], ["beta", "beta"], [BASE_ADAPTER, "alpha"]]
    input_ids = torch.randint(2, 120, (2, 6), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        expected = [ours(input_ids=input_ids, adapter_names=names).logits for names in batches]

        def run(index):
            return index % len(batches), ours(input_ids=input_ids, adapter_names=batches[index % len(batches)]).logits

        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(run, range(32)))
    for index, logits in results:
        torch.testing.assert_close(logits, expected[index], rtol=0, atol=1e-6)


def test_peftmodel_adapter_names_gradients_are_per_adapter_sums(bert_folders):
    ours = _peft_model_with(tiny_bert, bert_folders, is_trainable=True)
    ours.set_adapter(["alpha", "beta", "gamma"])  # all trainable
    names = ["beta", "alpha", "beta"]
    input_ids = torch.randint(2, 120, (3, 5), generator=torch.Generator().manual_seed(10))
    ours(input_ids=input_ids, adapter_names=names).logits.square().sum().backward()
    trainable = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    batch_grads = {n: None if p.grad is None else p.grad.clone() for n, p in trainable}
    ours.zero_grad()
    for row, name in enumerate(names):
        ours(input_ids=input_ids[row:row + 1], adapter_names=[name]).logits.square().sum().backward()
    for name, parameter in trainable:
        if ".gamma" in name:  # not in the batch
            assert batch_grads[name] is None or torch.count_nonzero(batch_grads[name]) == 0
        else:
            torch.testing.assert_close(batch_grads[name], parameter.grad, rtol=1e-4, atol=1e-6)
    assert any(".alpha" in n and g is not None and torch.count_nonzero(g) for n, g in batch_grads.items())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_peftmodel_generate_with_adapter_names(family, tmp_path):
    make = {"llama": tiny_llama, "gpt2": tiny_gpt2}[family]
    targets = ["q_proj", "v_proj", "down_proj"] if family == "llama" else ["c_attn", "c_fc"]
    folders = _save_adapters(make, {"one": dict(r=4, target_modules=targets), "two": dict(r=2, target_modules=targets[:1])}, tmp_path)
    ours = _peft_model_with(make, folders)
    names = ["one", BASE_ADAPTER, "two"]
    prompts = torch.randint(2, 120, (3, 4), generator=torch.Generator().manual_seed(11))
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompts))
    with torch.no_grad():
        generated = ours.generate(input_ids=prompts, adapter_names=names, **settings)
    for row, name in enumerate(names):
        alone = make() if name == BASE_ADAPTER else PeftModel.from_pretrained(make(), folders[name])
        settings["attention_mask"] = torch.ones_like(prompts[row:row + 1])
        with torch.no_grad():
            assert torch.equal(generated[row:row + 1], alone.generate(input_ids=prompts[row:row + 1], **settings)), name


def test_peftmodel_adapter_names_refuses_what_it_cannot_mix(bert_folders, tmp_path):
    ours = _peft_model_with(tiny_bert, bert_folders)
    input_ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(PeftkitError, match=r"no adapter named 'delta'; adapters on this model: alpha, beta, gamma"):
        ours(input_ids=input_ids, adapter_names=["alpha", "delta"])
    ours.add_adapter("dora", LoraConfig(r=2, target_modules=["query"], use_dora=True))
    ours.add_adapter("ia3", IA3Config(target_modules=["key"], feedforward_modules=[]))
    with pytest.raises(PeftkitError, match=r"DoRA adapter"):
        ours(input_ids=input_ids, adapter_names=["alpha", "dora"])
    with pytest.raises(PeftkitError, match=r"adapter 'ia3' is IA3; adapter_names mixes LoRA adapters only"):
        ours(input_ids=input_ids, adapter_names=["ia3", "alpha"])
    with pytest.raises(PeftkitError, match=r"one adapter name \(str\) per example"):
        ours(input_ids=input_ids, adapter_names="alpha")
    with pytest.raises(PeftkitError, match=r"adapter ids were given for 3 examples but a layer received a batch of 2"):
        ours(input_ids=input_ids, adapter_names=["alpha", "beta", "gamma"])
    assert not any(m.disabled for _, m in __import__("peftkit.methods.base", fromlist=["x"]).adapted_modules(ours.base_model))
