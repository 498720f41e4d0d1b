"""Adapter arithmetic (peftkit.merging) against hand computations and Hugging Face peft's merge_utils,
and run-time composition (stacking, averaged outputs, per-example routing) against plain loops."""

import json
import re

import pytest
import torch
from conftest import tiny_bert

from peftkit import LoraConfig, PeftkitError, get_peft_model
from peftkit.cli import main
from peftkit.export import layer_updates
from peftkit.merging import (
    adapters_active,
    average_outputs,
    combine_adapters,
    merge_tensors,
    merge_updates,
    save_combined,
)
from peftkit.model import PeftModel

merge_utils = pytest.importorskip("peft.utils.merge_utils")

IDS = torch.tensor([[2, 17, 5, 33, 9, 0], [4, 8, 15, 16, 23, 42]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])


def _with_random_loras(model, count=2, ranks=(2, 3), targets=(["query", "value"], ["value", "intermediate.dense"])):
    """A PeftModel with `count` LoRA adapters "a", "b", ... whose A and B are random (so updates are nonzero)."""
    names = [chr(ord("a") + i) for i in range(count)]
    wrapped = None
    for i, name in enumerate(names):
        config = LoraConfig(r=ranks[i], lora_alpha=2 * ranks[i], target_modules=targets[i], init_lora_weights=False)
        torch.manual_seed(10 + i)
        if wrapped is None:
            wrapped = get_peft_model(model, config, adapter_name=name)
        else:
            wrapped.add_adapter(name, config)
    with torch.no_grad():  # peft's random B (std 0.02) barely moves a tiny model's outputs: make the updates count
        for parameter_name, parameter in wrapped.named_parameters():
            if ".lora_B." in parameter_name:
                parameter.mul_(25)
    return wrapped.eval(), names


# -- tensors: hand-checkable definitions -----------------------------------------------------------
def test_ties_trims_elects_sign_by_summed_mass_and_averages_agreeing_values():
    a = torch.tensor([3.0, -1.0, 0.5, -2.0])
    b = torch.tensor([-1.0, 2.0, -0.2, -3.0])
    # density 0.5 keeps 2 of 4: a -> [3, 0, 0, -2], b -> [0, 2, 0, -3]; summed mass [3, 2, 0, -5] elects [+, +, +, -]
    assert torch.equal(merge_tensors([a, b], [1, 1], "ties", density=0.5), torch.tensor([3.0, 2.0, 0.0, -2.5]))
    # weights scale the values averaged; the sign is elected on the unweighted trimmed updates (as peft does)
    assert torch.equal(merge_tensors([a, b], [1, 0.5], "ties", density=0.5), torch.tensor([3.0, 1.0, 0.0, -1.75]))
    # "frequency" counts signs instead: position 0 has one + (a) and one - (b): a tie goes to +
    c = torch.tensor([-4.0, 1.0])
    d = torch.tensor([1.0, 1.0])
    e = torch.tensor([1.0, -5.0])
    assert torch.equal(merge_tensors([c, d, e], [1, 1, 1], "ties", density=1.0, majority_sign="frequency"),
                       torch.tensor([1.0, 1.0]))
    assert torch.equal(merge_tensors([c, d, e], [1, 1, 1], "ties", density=1.0, majority_sign="total"),
                       torch.tensor([-4.0, -5.0]))


def test_magnitude_prune_and_linear():
    a = torch.tensor([3.0, -1.0, 0.5, -2.0])
    b = torch.tensor([-1.0, 2.0, -0.2, -3.0])
    assert torch.equal(merge_tensors([a, b], [1, 2], "magnitude_prune", density=0.5), torch.tensor([3.0, 4.0, 0.0, -8.0]))
    assert torch.equal(merge_tensors([a, b], [1, 2], "linear"), a + 2 * b)


def test_dare_drops_with_probability_one_minus_density_and_rescales():
    update = torch.full((200, 200), 0.3)
    merged = merge_tensors([update], [1.0], "dare_linear", density=0.25, generator=torch.Generator().manual_seed(0))
    values = merged.unique()
    assert len(values) == 2 and values[0] == 0 and values[1] == pytest.approx(0.3 / 0.25)  # dropped, or kept / density
    kept = (merged != 0).float().mean().item()
    assert abs(kept - 0.25) < 0.01  # 40,000 draws: the standard error is 0.002
    assert abs(merged.mean().item() - 0.3) < 0.01  # rescaling keeps the expected value
    again = merge_tensors([update], [1.0], "dare_linear", density=0.25, generator=torch.Generator().manual_seed(0))
    other = merge_tensors([update], [1.0], "dare_linear", density=0.25, generator=torch.Generator().manual_seed(1))
    assert torch.equal(merged, again) and not torch.equal(merged, other)


# -- tensors: elementwise against Hugging Face peft ------------------------------------------------
@pytest.mark.parametrize("density", [0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("rule", ["total", "frequency"])
def test_ties_and_magnitude_prune_equal_peft(density, rule):
    generator = torch.Generator().manual_seed(3)
    updates = [torch.randn(7, 11, generator=generator) for _ in range(3)]
    weights = [1.0, 0.6, -0.3]
    ours = merge_tensors(updates, weights, "ties", density=density, majority_sign=rule)
    theirs = merge_utils.ties(updates, torch.tensor(weights), density, majority_sign_method=rule)
    assert torch.equal(ours, theirs)
    ours = merge_tensors(updates, weights, "magnitude_prune", density=density)
    assert torch.equal(ours, merge_utils.magnitude_prune(updates, torch.tensor(weights), density))
    ours = merge_tensors(updates, weights, "linear")
    assert torch.allclose(ours, merge_utils.task_arithmetic(updates, torch.tensor(weights)), atol=1e-6)


@pytest.mark.parametrize("density", [0.3, 0.7])
def test_dare_equals_peft_given_the_same_random_stream(density):
    generator = torch.Generator().manual_seed(4)
    updates = [torch.randn(9, 5, generator=generator) for _ in range(3)]
    weights = [0.5, 1.0, 2.0]
    for method, reference in (("dare_linear", merge_utils.dare_linear), ("dare_ties", merge_utils.dare_ties)):
        ours = merge_tensors(updates, weights, method, density=density, generator=torch.Generator().manual_seed(7))
        torch.manual_seed(7)  # peft draws its drops from the global generator
        assert torch.allclose(ours, reference(updates, torch.tensor(weights), density), atol=1e-6), method


# -- per-layer updates -------------------------------------------------------------------------------
def test_a_layer_missing_from_an_adapter_counts_as_zero():
    one = {"layer.x": torch.ones(2, 3), "layer.y": torch.full((4, 2), 2.0)}
    two = {"layer.x": torch.full((2, 3), 3.0)}
    merged = merge_updates([one, two], [1, 1], "ties", density=1.0)
    assert torch.equal(merged["layer.x"], torch.full((2, 3), 2.0))  # mean of 1 and 3
    assert torch.equal(merged["layer.y"], torch.full((4, 2), 2.0))  # one value, the zero does not count
    assert torch.equal(merge_updates([one, two], [1, 1])["layer.y"], torch.full((4, 2), 2.0))


def test_shapes_that_differ_are_refused_naming_the_layer_and_both_shapes():
    with pytest.raises(PeftkitError, match=r"layer enc\.q has shape \(2, 3\) in run-a but \(4, 3\) in run-b"):
        merge_updates([{"enc.q": torch.ones(2, 3)}, {"enc.q": torch.ones(4, 3)}], names=["run-a", "run-b"])


@pytest.mark.parametrize("options, message", [
    (dict(method="slerp"), "unknown combine method 'slerp'; methods: linear, ties, dare_linear, dare_ties, magnitude_prune"),
    (dict(weights=[1.0]), "1 weights for 2 adapters"),
    (dict(method="ties"), "method 'ties' needs a density"),
    (dict(method="ties", density=0.0), r"density must be in \(0, 1\]"),
    (dict(method="dare_linear", density=1.5), r"density must be in \(0, 1\]"),
    (dict(density=0.5), "method 'linear' keeps every value"),
    (dict(method="ties", density=0.5, majority_sign="mean"), "unknown majority sign rule 'mean'"),
])
def test_bad_options_are_refused_clearly(options, message):
    wrapped, names = _with_random_loras(tiny_bert())
    with pytest.raises(PeftkitError, match=message):
        combine_adapters(names, model=wrapped, **options)
    with pytest.raises(PeftkitError, match=r"'c' is neither an adapter on this model \(a, b\) nor a run or adapter folder"):
        combine_adapters(["a", "c"], model=wrapped)


# -- combined adapters -----------------------------------------------------------------------------
def _delta_of(conversion, path):
    tensors, scale = conversion.tensors, conversion.config.lora_alpha / conversion.config.r
    return scale * tensors[f"base_model.model.{path}.lora_B.weight"] @ tensors[f"base_model.model.{path}.lora_A.weight"]


def test_linear_merge_at_the_summed_rank_is_the_exact_weighted_sum_of_updates():
    wrapped, names = _with_random_loras(tiny_bert())
    updates = [layer_updates(wrapped, n) for n in names]
    combined = combine_adapters(names, [0.7, -1.3], model=wrapped)
    assert combined.config.r == 5  # 2 + 3, the default
    assert combined.overall_relative_error < 1e-5 and combined.max_relative_error < 1e-5
    paths = sorted(set(updates[0]) | set(updates[1]))
    assert sorted(combined.relative_errors) == paths  # query only in a, intermediate.dense only in b
    for path in paths:
        expected = 0.7 * updates[0].get(path, 0) + -1.3 * updates[1].get(path, 0)
        assert torch.allclose(_delta_of(combined, path), expected, atol=1e-5)
    assert wrapped.active_adapters == ["a"] and list(wrapped.peft_config) == names  # the model is left as it was


def test_truncated_rank_reports_the_svd_tail_as_its_error():
    wrapped, names = _with_random_loras(tiny_bert())
    combined = combine_adapters(names, model=wrapped, rank=1)
    updates = [layer_updates(wrapped, n) for n in names]
    residual = total = 0.0
    for path, error in combined.relative_errors.items():
        update = sum(u[path] for u in updates if path in u)
        values = torch.linalg.svdvals(update)
        assert error == pytest.approx(float(values[1:].norm() / values.norm()), rel=1e-4, abs=1e-6)
        residual, total = residual + float(values[1:].square().sum()), total + float(values.square().sum())
    assert combined.overall_relative_error == pytest.approx((residual / total) ** 0.5, rel=1e-4)
    assert combined.overall_relative_error > 0.05


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_sparsifying_methods_at_full_rank_equal_peft_on_each_layers_updates(method):
    wrapped, names = _with_random_loras(tiny_bert())
    combined = combine_adapters(names, [1.0, 0.5], method=method, density=0.4, seed=5, model=wrapped, rank=64)
    assert combined.config.r == 32  # 64 asked; no layer of the tiny BERT has a rank above 32
    updates = [layer_updates(wrapped, n) for n in names]
    torch.manual_seed(5)  # our generator is seeded once and walks the layers in sorted order; so does this loop
    for path in sorted(combined.relative_errors):
        layer = [u.get(path, torch.zeros_like(next(x[path] for x in updates if path in x))) for u in updates]
        reference = getattr(merge_utils, method)(layer, torch.tensor([1.0, 0.5]), 0.4)
        assert torch.allclose(_delta_of(combined, path), reference, atol=1e-5), path
    assert combined.max_relative_error < 1e-5


def test_combined_adapter_loads_in_peftkit_and_peft_and_computes_base_plus_merged_update(tmp_path):
    wrapped, names = _with_random_loras(tiny_bert())
    combined = combine_adapters(names, [1.0, 1.0], method="ties", density=0.5, model=wrapped, rank=3)
    folder = save_combined(combined, tmp_path / "combined")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "peftkit_run.json"]
    info = json.loads((folder / "peftkit_run.json").read_text())
    assert info["combined"]["method"] == "ties" and info["combined"]["rank"] == 3
    assert info["combined"]["overall_relative_error"] == pytest.approx(combined.overall_relative_error)

    # Reference: the base model with each layer's weight plus B A of the combination, by hand.
    reference = tiny_bert()
    with torch.no_grad():
        for path in combined.relative_errors:
            reference.get_submodule(path).weight += _delta_of(combined, path)
        expected = reference(input_ids=IDS, attention_mask=MASK).logits
        ours = PeftModel.from_pretrained(tiny_bert(), folder).eval()
        assert torch.allclose(ours(input_ids=IDS, attention_mask=MASK).logits, expected, atol=1e-5)
        peft = pytest.importorskip("peft")
        theirs = peft.PeftModel.from_pretrained(tiny_bert(), str(folder)).eval()
        assert torch.allclose(theirs(input_ids=IDS, attention_mask=MASK).logits, expected, atol=1e-5)
    with pytest.raises(PeftkitError, match="exists and is not empty"):
        save_combined(combined, folder)


# -- folders, heads, command line ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    """A small BERT with minilm's tokenizer, saved as a local Hugging Face folder."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from peftkit import zoo

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(zoo.resolve_model("minilm"))
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64, num_labels=2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _saved_run(model_folder, folder, labels, seed, targets=("query", "value")):
    """A classification run folder (adapter + peftkit_run.json) with random LoRA and a random head."""
    from peftkit import zoo
    from peftkit.train.job import save_run

    base, tokenizer = zoo.load_classifier(model_folder, num_labels=len(labels), id2label=labels)
    torch.manual_seed(seed)
    wrapped = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=list(targets), task_type="SEQ_CLS",
                                              init_lora_weights=False))
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if parameter.requires_grad and "classifier" in name:
                parameter.normal_(0, 0.5)
    save_run(wrapped, tokenizer, folder / "adapter", model=str(model_folder), task="task-" + str(seed), label_names=labels,
             max_length=32)
    return folder


def test_runs_with_different_heads_combine_and_the_chosen_head_is_attached(tiny_model_folder, tmp_path):
    from peftkit.train.job import load_run

    first = _saved_run(tiny_model_folder, tmp_path / "first", ["no", "yes"], seed=1)
    second = _saved_run(tiny_model_folder, tmp_path / "second", ["x", "y", "z"], seed=2, targets=("value", "key"))
    combined = combine_adapters([first, second], method="linear", head=str(second))
    assert combined.config.r == 4 and combined.overall_relative_error < 1e-5
    assert combined.config.modules_to_save == ["classifier"] and combined.config.task_type == "SEQ_CLS"
    save_combined(combined, tmp_path / "out")

    model, tokenizer, info = load_run(tmp_path / "out")
    assert info["label_names"] == ["x", "y", "z"] and info["combined"]["head_from"] == str(second)
    # Reference: the second run as trained, plus the first run's update (linear, weights 1, 1).
    second_model, _, _ = load_run(second / "adapter")
    first_model, _, _ = load_run(first / "adapter")
    first_updates = layer_updates(first_model, "default", skip_modules_to_save=True)
    with torch.no_grad():
        for path, update in first_updates.items():
            module = second_model.base_model.get_submodule(path)
            (module.base_layer if hasattr(module, "adapters") else module).weight += update
        encoded = tokenizer(["a fine day", "rain again and again"], padding=True, return_tensors="pt")
        assert torch.allclose(model(**encoded).logits, second_model(**encoded).logits, atol=1e-5)
        peft = pytest.importorskip("peft")
        from transformers import BertForSequenceClassification

        base = BertForSequenceClassification.from_pretrained(tiny_model_folder, num_labels=3, ignore_mismatched_sizes=True)
        theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "out")).eval()  # Hugging Face peft: same head, same logits
        assert torch.allclose(theirs(**encoded).logits, second_model(**encoded).logits, atol=1e-5)

    without_head = combine_adapters([first, second], method="linear")
    assert without_head.config.modules_to_save is None and without_head.config.task_type is None
    assert not any("classifier" in key for key in without_head.tensors)
    save_combined(without_head, tmp_path / "headless")
    with pytest.raises(PeftkitError, match="without a classification head.*--head N"):
        load_run(tmp_path / "headless")


def test_combine_command_writes_the_adapter_and_prints_the_error(tiny_model_folder, tmp_path, capsys):
    first = _saved_run(tiny_model_folder, tmp_path / "first", ["no", "yes"], seed=1)
    second = _saved_run(tiny_model_folder, tmp_path / "second", ["no", "yes"], seed=2)
    output = tmp_path / "combined"
    assert main(["combine", str(first), str(second), "--method", "ties", "--weights", "1,1", "--density", "0.5",
                 "--rank", "2", "--head", "1", "--output-dir", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "into LoRA r=2 on 4 layers" in printed and "reconstruction error of the SVD step" in printed
    info = json.loads((output / "peftkit_run.json").read_text())
    assert f"overall {info['combined']['overall_relative_error']:.2e}" in printed
    assert main(["eval", str(output), "--task", str(_tiny_task(tmp_path)), "--split", "train"]) == 0
    assert "accuracy" in capsys.readouterr().out


def _tiny_task(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"text {i}", "label": ["no", "yes"][i % 2]}) for i in range(8)))
    return path


@pytest.mark.parametrize("extra, message", [
    (["--method", "slerp"], "unknown combine method 'slerp'; methods: linear, ties"),
    (["--weights", "1,2,3"], "3 weights for 2 adapters"),
    (["--method", "ties", "--density", "1.5"], r"density must be in \(0, 1\]"),
])
def test_combine_command_refuses_bad_options(tiny_model_folder, tmp_path, capsys, extra, message):
    first = _saved_run(tiny_model_folder, tmp_path / "first", ["no", "yes"], seed=1)
    assert main(["combine", str(first), str(first), "--output-dir", str(tmp_path / "out"), *extra]) == 2
    error = capsys.readouterr().err
    assert re.search("peftkit: error: .*" + message, error), error
    assert not (tmp_path / "out").exists()


def test_adapters_of_different_base_models_are_refused(tiny_model_folder, tmp_path, capsys):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    wider = tmp_path / "wider-bert"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_folder)
    BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=48, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=64, num_labels=2)).save_pretrained(wider)
    tokenizer.save_pretrained(wider)
    first = _saved_run(tiny_model_folder, tmp_path / "first", ["no", "yes"], seed=1)
    other = _saved_run(wider, tmp_path / "other", ["no", "yes"], seed=2)
    with pytest.raises(PeftkitError, match="the adapters name different base models"):
        combine_adapters([first, other])
    # Forced onto one base model, the layer that does not fit is named with both shapes.
    with pytest.raises(PeftkitError, match=r"layer bert\.encoder\.layer\.0\.attention\.self\.query: lora_A\.weight has "
                                           r"shape \(2, 48\) in .* but the base model needs \(2, 32\)"):
        combine_adapters([first, other], base_model=str(tiny_model_folder))


# -- composition at run time -----------------------------------------------------------------------
def test_stacking_two_active_loras_adds_their_updates():
    wrapped, names = _with_random_loras(tiny_bert())
    combined = combine_adapters(names, [1.0, 1.0], model=wrapped)
    hidden = lambda model: model(input_ids=IDS, attention_mask=MASK, output_hidden_states=True).hidden_states[-1]  # noqa: E731
    with torch.no_grad():
        wrapped.set_adapter(names)
        stacked = hidden(wrapped)
        reference = tiny_bert()
        for path in combined.relative_errors:
            reference.get_submodule(path).weight += _delta_of(combined, path)
        assert torch.allclose(stacked, hidden(reference), atol=1e-5)
        wrapped.set_adapter("a")
        assert (hidden(wrapped) - stacked).abs().max() > 1e-2  # "a" alone differs


def test_average_outputs_is_the_weighted_sum_of_each_adapters_outputs():
    wrapped, names = _with_random_loras(tiny_bert())
    with torch.no_grad():
        outputs = {}
        for name in names:
            wrapped.set_adapter(name)
            outputs[name] = wrapped(input_ids=IDS, attention_mask=MASK).logits
        with wrapped.disable_adapter():
            outputs["__base__"] = wrapped(input_ids=IDS, attention_mask=MASK).logits
        wrapped.set_adapter("b")
        mixed = average_outputs(wrapped, ["a", "b", "__base__"], [0.5, 0.3, 0.2], input_ids=IDS, attention_mask=MASK)
        assert torch.allclose(mixed, 0.5 * outputs["a"] + 0.3 * outputs["b"] + 0.2 * outputs["__base__"], atol=1e-6)
        mean = average_outputs(wrapped, names, probabilities=True, input_ids=IDS, attention_mask=MASK)
        assert torch.allclose(mean, (outputs["a"].softmax(-1) + outputs["b"].softmax(-1)) / 2, atol=1e-6)
    assert wrapped.active_adapters == ["b"]  # restored
    with pytest.raises(PeftkitError, match="no adapter named 'c'; adapters on this model: a, b"):
        average_outputs(wrapped, ["a", "c"], input_ids=IDS)
    with pytest.raises(PeftkitError, match="2 weights for 3 adapters"):
        average_outputs(wrapped, ["a", "b", "a"], [1, 1], input_ids=IDS)


def test_adapters_active_restores_the_previous_adapters_after_an_error():
    wrapped, names = _with_random_loras(tiny_bert())
    with pytest.raises(RuntimeError):
        with adapters_active(wrapped, names):
            assert wrapped.active_adapters == names
            raise RuntimeError("inside")
    assert wrapped.active_adapters == ["a"]


def test_per_example_routing_equals_running_each_example_with_its_own_adapter():
    wrapped, names = _with_random_loras(tiny_bert())
    routes = ["b", "__base__"]
    try:
        with torch.no_grad():
            routed = wrapped(input_ids=IDS, attention_mask=MASK, adapter_names=routes).logits
    except TypeError as error:  # the mixed engine (peftkit.mixed) adds adapter_names to PeftModel.forward
        pytest.skip(f"PeftModel.forward has no adapter_names yet: {error}")
    with torch.no_grad():
        for row, name in enumerate(routes):
            with adapters_active(wrapped, name):
                alone = wrapped(input_ids=IDS[row:row + 1], attention_mask=MASK[row:row + 1]).logits
            assert torch.allclose(routed[row:row + 1], alone, atol=1e-5), name

