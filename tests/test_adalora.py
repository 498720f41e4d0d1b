"""AdaLoRA: the rank allocation is peft's, files move both ways with the pruned ranks, the loop drives it."""

import json

import peft
import pytest
import torch
from conftest import TINY_MODELS, randomise, tiny_bert, tiny_gpt2, tiny_llama, tiny_vit
from safetensors.torch import load_file

import peftkit
from peftkit import AdaLoraConfig, PeftkitError, PeftModel, get_peft_model
from peftkit.inspect import inspect_adapter
from peftkit.methods.adalora import RankAllocator, SvdDelta, budget_schedule
from peftkit.methods.base import adapted_modules
from peftkit.train import TrainingArguments, train
from peftkit.train.job import METHOD_DEFAULTS, method_config

pytestmark = pytest.mark.filterwarnings("ignore")

@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: a second intra-op thread only adds waiting on a busy machine (8x slower here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


BERT = dict(init_r=4, target_r=2, target_modules=["query", "value"], total_step=20, tinit=2, tfinal=4, deltaT=2)


def _no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _allocator(model, name="default") -> RankAllocator:
    return model.model_adapters[name]


def _deltas(model, name="default") -> dict[str, SvdDelta]:
    """{module path: the adapter's SvdDelta there}, in model order."""
    found = {}
    for path, module in adapted_modules(model.base_model):
        if name in module.adapters and isinstance(module.adapters[name], SvdDelta):
            found[path] = module.adapters[name]
    return found


# -- counts and basic behaviour ----------------------------------------------------------------------

COUNT_CASES = {
    "bert-qv": (tiny_bert, dict(BERT)),
    "bert-all-linear-cls": (tiny_bert, dict(init_r=6, target_r=3, target_modules="all-linear", task_type="SEQ_CLS", total_step=50)),
    "bert-bias": (tiny_bert, dict(init_r=3, target_r=1, target_modules=["query"], bias="lora_only", modules_to_save=["classifier"], total_step=50)),
    "bert-layers": (tiny_bert, dict(init_r=4, target_r=3, target_modules=["dense"], layers_to_transform=[0, 2], total_step=50)),
    "gpt2": (tiny_gpt2, dict(init_r=4, target_r=2, target_modules=["c_attn", "c_fc"], total_step=50)),
    "vit-conv": (tiny_vit, dict(init_r=4, target_r=2, target_modules=["projection", "q_proj"], total_step=50)),
}


@pytest.mark.parametrize("case", list(COUNT_CASES))
def test_parameter_counts_equal_peft(case):
    build, kwargs = COUNT_CASES[case]
    ours = get_peft_model(build(), AdaLoraConfig(**kwargs))
    theirs = peft.get_peft_model(build(), peft.AdaLoraConfig(**kwargs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_training_changes_only_adapter_and_disable_gives_base(input_ids):
    base_output = tiny_bert()(input_ids=input_ids).logits
    model = get_peft_model(tiny_bert(), AdaLoraConfig(**BERT, lora_dropout=0.1))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_E", "lora_B") for n in names)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("ranknum"))
    frozen_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained_before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(1, 6):
        model(input_ids=input_ids, labels=torch.tensor([0, 2])).loss.backward()
        optimizer.step()
        model.on_optimizer_step(step, 20)
        optimizer.zero_grad()
    model.eval()
    for name, parameter in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(parameter, frozen_before[name]), name
        else:
            assert not torch.equal(parameter, trained_before[name]), name
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=input_ids).logits, base_output)
        with model.disable_adapter():
            assert torch.equal(model(input_ids=input_ids).logits, base_output)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_merge_is_exact_and_unmerge_restores(family, input_ids):
    base = TINY_MODELS[family]()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, AdaLoraConfig(init_r=3, target_r=2, target_modules="all-linear", total_step=10))
    randomise(model)
    with torch.no_grad():
        unmerged = model(input_ids=input_ids).logits
        model.merge_adapter()
        merged = model(input_ids=input_ids).logits
        model.unmerge_adapter()
        restored = model.base_model.state_dict()
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    for key, value in before.items():
        live = restored[key] if key in restored else restored[key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")]
        torch.testing.assert_close(live, value, rtol=0, atol=1e-6)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, peftkit.methods.base.AdaptedModule) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=input_ids).logits, unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_equals_greedy_decoding_without_cache(family, input_ids):
    model = get_peft_model(TINY_MODELS[family](), AdaLoraConfig(init_r=4, target_r=2, target_modules="all-linear", total_step=10,
                                                                init_lora_weights=False))
    with torch.no_grad():
        generated = model.generate(input_ids, max_new_tokens=5, do_sample=False)
        sequence = input_ids
        for _ in range(5):
            next_token = model(input_ids=sequence).logits[:, -1].argmax(dim=-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
        with model.disable_adapter():
            base_generated = model.generate(input_ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(generated, sequence)
    assert not torch.equal(generated, base_generated)  # the adapter really took part


def test_vision_model_with_conv2d(pixel_values):
    model = get_peft_model(tiny_vit(), AdaLoraConfig(init_r=4, target_r=2, target_modules=["projection", "q_proj"],
                                                     total_step=10, init_lora_weights=False))
    with torch.no_grad():
        unmerged = model(pixel_values=pixel_values).logits
        with model.disable_adapter():
            torch.testing.assert_close(model(pixel_values=pixel_values).logits, tiny_vit()(pixel_values=pixel_values).logits)
        model.merge_adapter()
        torch.testing.assert_close(model(pixel_values=pixel_values).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_two_named_adapters(tmp_path, input_ids):
    model = get_peft_model(tiny_bert(), AdaLoraConfig(**BERT))
    model.add_adapter("second", AdaLoraConfig(init_r=3, target_r=2, target_modules=["key"], total_step=10))
    randomise(model)
    with torch.no_grad():
        first = model(input_ids=input_ids).logits
        model.set_adapter("second")
        randomise(model, seed=5)
        second = model(input_ids=input_ids).logits
    assert not torch.allclose(first, second)
    assert all(n.split(".adapters.")[1].startswith("second.") for n, p in model.named_parameters() if p.requires_grad)
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    again.load_adapter(tmp_path / "second", adapter_name="second")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=input_ids).logits, first)
        again.set_adapter("second")
        torch.testing.assert_close(again(input_ids=input_ids).logits, second)


# -- the orthogonal regulariser and the allocation, against peft ---------------------------------------

def _peft_and_ours_from_same_weights(tmp_path, kwargs):
    """A peft AdaLoRA model and a peftkit one loaded from its file (so the weights are equal), both trainable.

    With a task_type: peft's bare PeftModel calls the transformers model directly and never adds the
    orthogonal regulariser; its task models (here sequence classification) do.
    """
    kwargs = dict(kwargs, task_type="SEQ_CLS")
    theirs = peft.get_peft_model(_no_dropout(tiny_bert()), peft.AdaLoraConfig(**kwargs))
    randomise(theirs)
    theirs.save_pretrained(tmp_path / "start")
    theirs = peft.PeftModel.from_pretrained(_no_dropout(tiny_bert()), tmp_path / "start", is_trainable=True)
    ours = PeftModel.from_pretrained(_no_dropout(tiny_bert()), tmp_path / "start", is_trainable=True)
    return theirs, ours


def test_orthogonal_regulariser_is_added_to_the_training_loss_as_in_peft(tmp_path, input_ids):
    theirs, ours = _peft_and_ours_from_same_weights(tmp_path, dict(BERT, orth_reg_weight=0.7))
    labels = torch.tensor([0, 2])
    theirs.train(), ours.train()
    training_loss = ours(input_ids=input_ids, labels=labels).loss
    torch.testing.assert_close(training_loss, theirs(input_ids=input_ids, labels=labels).loss, rtol=1e-5, atol=1e-6)
    ours.eval()
    task_loss = ours(input_ids=input_ids, labels=labels).loss
    regulariser = _allocator(ours).orthogonal_regulariser()
    assert regulariser > 0.1
    torch.testing.assert_close(training_loss, task_loss + 0.7 * regulariser)


def test_rank_allocation_matches_peft_step_by_step(tmp_path):
    kwargs = dict(init_r=4, target_r=2, target_modules=["query", "value", "intermediate.dense"], total_step=16,
                  tinit=2, tfinal=4, deltaT=2, orth_reg_weight=0.3)
    theirs, ours = _peft_and_ours_from_same_weights(tmp_path, kwargs)
    generator = torch.Generator().manual_seed(7)
    batches = [(torch.randint(2, 120, (4, 9), generator=generator), torch.randint(0, 3, (4,), generator=generator))
               for _ in range(16)]
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-2) for m in (theirs, ours)]
    theirs.train(), ours.train()
    for step, (ids, labels) in enumerate(batches, start=1):
        for model, optimizer in zip((theirs, ours), optimizers):
            model(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()
            if model is theirs:
                model.base_model.update_and_allocate(step)
            else:
                model.on_optimizer_step(step, 999)  # total_step in the config wins over the loop's
            optimizer.zero_grad()
        # The same triplets are dropped at every reallocation.
        for path, delta in _deltas(ours).items():
            their_e = theirs.get_submodule(f"base_model.model.{path}").lora_E["default"]
            assert torch.equal(delta.lora_E == 0, their_e == 0), (step, path)
    expected_pattern = {k.replace(".default", ""): v for k, v in theirs.peft_config["default"].rank_pattern.items()}
    assert ours.peft_config["default"].rank_pattern == expected_pattern
    ranks = _allocator(ours).ranks()
    assert sum(ranks.values()) == 2 * len(ranks) and len(set(ranks.values())) > 1
    theirs.eval(), ours.eval()
    ids = batches[0][0]
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("schedule", [
    dict(total_step=20, tinit=2, tfinal=4, deltaT=2),
    dict(total_step=100, tinit=10, tfinal=20, deltaT=10),
    dict(total_step=37, tinit=0, tfinal=0, deltaT=1),
    dict(total_step=50, tinit=5, tfinal=30, deltaT=3),
])
def test_budget_schedule_matches_peft(schedule):
    kwargs = dict(init_r=6, target_r=2, target_modules="all-linear", **schedule)
    theirs = peft.get_peft_model(tiny_bert(), peft.AdaLoraConfig(**kwargs)).base_model.rankallocator
    ours = _allocator(get_peft_model(tiny_bert(), AdaLoraConfig(**kwargs)))
    assert (ours.initial_budget, ours.target_budget) == (theirs.init_bgt, theirs.target_bgt)
    for step in range(1, schedule["total_step"] + 1):
        assert budget_schedule(step, initial_budget=ours.initial_budget, target_budget=ours.target_budget,
                               tinit=schedule["tinit"], tfinal=schedule["tfinal"], total_step=schedule["total_step"],
                               deltaT=schedule["deltaT"]) == theirs.budget_schedule(step), step


def test_schedule_shares_are_resolved_against_the_run():
    config = AdaLoraConfig(init_r=4, target_r=2, target_modules=["query"], tinit=0.1, tfinal=0.5)
    model = get_peft_model(tiny_bert(), config)
    model.on_optimizer_step(1, 63)
    stored = model.peft_config["default"]
    assert stored.total_step == 63 and config.total_step is None  # the caller's config is left alone
    saved = peftkit.methods.adalora.export_config(stored)
    assert (saved.tinit, saved.tfinal, saved.total_step) == (6, 32, 63)


# -- the real training loop ------------------------------------------------------------------------------

def _examples(count, seed):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(2, 120, (9,), generator=generator), "labels": int(torch.randint(0, 3, (), generator=generator))}
            for _ in range(count)]


def _collate(examples):
    return {"input_ids": torch.stack([e["input_ids"] for e in examples]), "labels": torch.tensor([e["labels"] for e in examples])}


def test_training_loop_reaches_the_budget_and_files_keep_the_ranks(tmp_path, input_ids):
    config = AdaLoraConfig(init_r=4, target_r=2, target_modules=["query", "value", "dense"], tinit=2, tfinal=0.25,
                           deltaT=2, lora_alpha=16)
    model = get_peft_model(tiny_bert(), config)
    arguments = TrainingArguments(output_dir=str(tmp_path / "run"), epochs=2, batch_size=4, learning_rate=1e-2, progress=False)
    result = train(model, _examples(40, seed=1), _examples(12, seed=2), arguments, _collate)
    assert result.steps == 20
    model.eval()
    stored = model.peft_config["default"]
    assert stored.total_step == 20 and config.rank_pattern is None
    ranks = _allocator(model).ranks()
    assert sum(ranks.values()) == 2 * len(ranks)  # the budget: target_r on average
    assert len(set(ranks.values())) > 1  # and spent unequally
    assert all(sum(stored.rank_pattern[f"{path}.lora_E"]) == rank for path, rank in ranks.items())

    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["total_step"] == 20 and saved["tfinal"] == 5
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for path, rank in ranks.items():
        assert tensors[f"base_model.model.{path}.lora_A"].shape[0] == rank
        assert tensors[f"base_model.model.{path}.lora_B"].shape[1] == rank
    assert inspect_adapter(tmp_path / "adapter")["ranks"] == ranks

    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        ours = PeftModel.from_pretrained(tiny_bert(), tmp_path / "adapter")
        theirs = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "adapter").eval()
        torch.testing.assert_close(ours(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(theirs(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-6)
    assert _allocator(ours).ranks() == ranks
    assert ours.get_nb_trainable_parameters()[1] == theirs.get_nb_trainable_parameters()[1]


def test_schedule_that_does_not_fit_the_run_is_refused(tmp_path):
    model = get_peft_model(tiny_bert(), AdaLoraConfig(init_r=4, target_r=2, target_modules=["query"], tinit=8, tfinal=8))
    arguments = TrainingArguments(output_dir=str(tmp_path / "run"), epochs=1, batch_size=4, progress=False)
    with pytest.raises(PeftkitError, match="leave no step of a 5-step run"):
        train(model, _examples(20, seed=1), None, arguments, _collate)


def test_resumed_run_recovers_the_final_ranks_from_the_zeroed_values():
    model = get_peft_model(tiny_bert(), AdaLoraConfig(init_r=3, target_r=2, target_modules=["query"], total_step=10, tfinal=3))
    randomise(model)
    with torch.no_grad():
        for index, delta in enumerate(_deltas(model).values()):
            delta.lora_E[index % 3] = 0.0
    model.on_optimizer_step(9, 10)  # past the final allocation at step 7, as after a resume
    assert list(_allocator(model).ranks().values()) == [2, 2, 2]
    assert model.peft_config["default"].rank_pattern["bert.encoder.layer.1.attention.self.query.lora_E"] == [True, False, True]


# -- files both ways -------------------------------------------------------------------------------------

INTEROP = {
    "bert": (tiny_bert, dict(init_r=4, target_r=2, target_modules=["query", "value"], bias="lora_only",
                             modules_to_save=["classifier"], total_step=12, tinit=1, tfinal=3, deltaT=1)),
    "gpt2": (tiny_gpt2, dict(init_r=4, target_r=2, target_modules=["c_attn", "c_fc"], total_step=12, tinit=1, tfinal=3)),
    "llama": (tiny_llama, dict(init_r=3, target_r=1, target_modules=["q_proj", "v_proj", "down_proj"],
                               layers_to_transform=[1], total_step=12, tinit=1, tfinal=3, lora_alpha=5)),
}


def _train_peft_allocation(model, kwargs, family):
    """Run peft's own allocation to the end, so its file carries a rank_pattern."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    generator = torch.Generator().manual_seed(4)
    model.train()
    for step in range(1, kwargs["total_step"] + 1):
        ids = torch.randint(2, 120, (2, 9), generator=generator)
        labels = torch.tensor([0, 1]) if family == "bert" else ids
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("family", list(INTEROP))
def test_peft_adapter_with_pruned_ranks_loads_in_peftkit(family, tmp_path, input_ids):
    build, kwargs = INTEROP[family]
    theirs = peft.get_peft_model(_no_dropout(build()), peft.AdaLoraConfig(**kwargs))
    randomise(theirs)
    _train_peft_allocation(theirs, kwargs, family)
    with torch.no_grad():
        expected = theirs(input_ids=input_ids).logits
    theirs.save_pretrained(tmp_path)
    pattern = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    assert pattern and len({sum(mask) for mask in pattern.values()}) > 1
    ours = PeftModel.from_pretrained(build(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-6)
    assert {f"{path}.lora_E": rank for path, rank in _allocator(ours).ranks().items()} == {
        key: sum(mask) for key, mask in pattern.items()}
    assert ours.get_nb_trainable_parameters()[0] == 0
    assert PeftModel.from_pretrained(build(), tmp_path, adapter_name="t", is_trainable=True).get_nb_trainable_parameters()[0] > 0


@pytest.mark.parametrize("family", list(INTEROP))
def test_peftkit_adapter_with_pruned_ranks_loads_in_peft(family, tmp_path, input_ids):
    build, kwargs = INTEROP[family]
    probe = get_peft_model(build(), AdaLoraConfig(**kwargs))
    paths = list(_deltas(probe))
    # Arbitrary kept triplets, one module dropped entirely (rank 0).
    generator = torch.Generator().manual_seed(11)
    pattern = {f"{p}.lora_E": [bool(v) for v in torch.rand(kwargs["init_r"], generator=generator) > 0.4] for p in paths}
    pattern[f"{paths[0]}.lora_E"] = [False] * kwargs["init_r"]
    pattern[f"{paths[-1]}.lora_E"] = [True] * kwargs["init_r"]
    ours = get_peft_model(build(), AdaLoraConfig(**kwargs, rank_pattern=pattern))
    randomise(ours)
    with torch.no_grad():
        expected = ours(input_ids=input_ids).logits
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-6)
    assert theirs.get_nb_trainable_parameters()[1] == ours.get_nb_trainable_parameters()[1]
    again = PeftModel.from_pretrained(build(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-6)


def test_vit_adapter_moves_both_ways(tmp_path, pixel_values):
    kwargs = dict(init_r=4, target_r=2, target_modules=["projection", "q_proj"], total_step=10)
    ours = get_peft_model(tiny_vit(), AdaLoraConfig(**kwargs))
    randomise(ours)
    with torch.no_grad():
        expected = ours(pixel_values=pixel_values).logits
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_vit(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(pixel_values=pixel_values).logits, expected, rtol=1e-5, atol=1e-6)
    theirs = peft.get_peft_model(tiny_vit(), peft.AdaLoraConfig(**kwargs))
    randomise(theirs, seed=8)
    theirs.eval()
    with torch.no_grad():
        expected = theirs(pixel_values=pixel_values).logits
    theirs.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(PeftModel.from_pretrained(tiny_vit(), tmp_path / "theirs")(pixel_values=pixel_values).logits,
                                   expected, rtol=1e-5, atol=1e-6)


def test_untrained_adapter_without_total_step_saves_a_schedule_peft_accepts(tmp_path, input_ids):
    ours = get_peft_model(tiny_bert(), AdaLoraConfig(init_r=4, target_r=2, target_modules=["query"], tinit=0.1, tfinal=0.5))
    randomise(ours)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert isinstance(saved["tinit"], int) and saved["tinit"] < saved["total_step"] - saved["tfinal"]
    theirs = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=input_ids).logits, ours(input_ids=input_ids).logits, rtol=1e-5, atol=1e-6)


# -- errors ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, message", [
    (dict(init_r=0), "init_r must be a positive integer"),
    (dict(init_r=4, target_r=6), "target_r=6 is above init_r=4"),
    (dict(deltaT=0), "deltaT must be at least 1"),
    (dict(beta1=1.0), "beta1 must be strictly between 0 and 1"),
    (dict(orth_reg_weight=-0.1), "orth_reg_weight must be >= 0"),
    (dict(lora_alpha=0), "lora_alpha must be positive"),
    (dict(tinit=1.5), r"tinit=1.5: a float is a share of the run"),
    (dict(total_step=10, tinit=6, tfinal=5), "leave no step of a 10-step run"),
    (dict(rank_pattern={"bert.encoder.layer.0.attention.self.query": [True] * 12}), "must be '<module path>.lora_E'"),
    (dict(rank_pattern={"bert.encoder.layer.0.attention.self.query.lora_E": [True] * 3}), "has 3 entries; it needs init_r=12"),
    (dict(rank_pattern={"bert.encoder.layer.0.attention.self.key.lora_E": [True] * 12}), "names modules this adapter does not adapt"),
    (dict(target_modules=["word_embeddings"]), "adapts only Linear, Conv1D, Conv2d"),
    (dict(target_modules=["qury"]), "matched no module"),
    (dict(init_r="8"), "AdaLoraConfig.init_r must be int"),
])
def test_bad_config_errors_name_the_problem(bad, message):
    kwargs = {"target_modules": ["query"], **bad}
    with pytest.raises(PeftkitError, match=message):
        get_peft_model(tiny_bert(), AdaLoraConfig(**kwargs))


def test_grouped_convolution_is_refused_at_wrap_time():
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, groups=2), torch.nn.Flatten(), torch.nn.Linear(72, 2))
    with pytest.raises(PeftkitError, match="groups=1"):
        get_peft_model(net, AdaLoraConfig(init_r=2, target_r=1, target_modules=["0"]))


def test_job_default_builds_and_peft_reads_its_fields():
    assert "adalora" in METHOD_DEFAULTS
    config = method_config("adalora")
    assert isinstance(config, AdaLoraConfig) and config.task_type == "SEQ_CLS" and config.target_modules == "all-linear"
    exported = peftkit.methods.adalora.export_config(config.replace(total_step=4210)).to_dict()
    exported.pop("peft_type")
    theirs = peft.AdaLoraConfig(**{k: v for k, v in exported.items() if k != "target_modules"}, target_modules=["query"])
    assert (theirs.tinit, theirs.tfinal, theirs.total_step) == (421, 2105, 4210)


def test_peft_file_with_target_rank_above_initial_rank_loads_for_inference(tmp_path, input_ids):
    # peft writes its default target_r=8 whatever init_r; for inference that is harmless.
    theirs = peft.get_peft_model(tiny_bert(), peft.AdaLoraConfig(init_r=4, target_modules=["query"], total_step=10))
    randomise(theirs)
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=input_ids).logits, theirs(input_ids=input_ids).logits, rtol=1e-5, atol=1e-6)
    trainable = PeftModel.from_pretrained(tiny_bert(), tmp_path, is_trainable=True)
    with pytest.raises(PeftkitError, match="target_r=8 is above init_r=4"):
        trainable.on_optimizer_step(1, 10)
