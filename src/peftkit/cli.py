"""The `peftkit` command: thin; every subcommand calls the library.

    peftkit train                       LoRA on minilm / sst2 (the default job)
    peftkit train --method bitfit --task trec
    peftkit eval runs/default/adapter --split test
    peftkit predict runs/default/adapter "a gripping , funny film"
    peftkit inspect runs/default/adapter
    peftkit merge runs/default/adapter --output merged-model
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from peftkit.errors import PeftkitError


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _target_modules(text: str) -> str | list[str]:
    """'all-linear' and regexes stay strings; 'query,value' becomes a list of names."""
    if text == "all-linear" or any(c in text for c in "*()[]|^$+?\\"):
        return text
    return _comma_list(text)


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in _comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help when it has a real default the help does not already state."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "(default" in text or action.option_strings == []:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def _add_train_parser(commands) -> None:
    from peftkit import zoo
    from peftkit.train.job import list_methods

    parser = commands.add_parser(
        "train", help="train a method on a task and save the adapter",
        description="Train a PEFT method on a text-classification task, or instruction-tune a causal LM on a "
                    "chat / instruction task (e.g. --model smollm2 --task trec-instruct). With no arguments: LoRA on "
                    "minilm / sst2, then print validation accuracy, trainable share, adapter size, "
                    "wall time and peak memory.",
        formatter_class=_DefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="minilm", help=f"built-in model ({', '.join(zoo.list_models())}) or a local Hugging Face model folder")
    from peftkit.train.chat import list_instruct_tasks

    parser.add_argument("--task", default="sst2", help=f"built-in task ({', '.join(zoo.list_tasks())}; chat: "
                        f"{', '.join(list_instruct_tasks())}), a folder, or a .jsonl/.csv file (chat files: "
                        "'messages' or 'instruction'/'input'/'output' per line); several, comma-separated (sst2,trec,cr,mr), "
                        "co-train a LoRA adapter per task in one run with mixed batches")
    parser.add_argument("--method", default="lora", choices=list_methods(), help="how to adapt the model")
    parser.add_argument("--output-dir", default=None, help="run folder (default: runs/<model>-<task>-<method>)")
    parser.add_argument("--config", default=None, help="a JSON file with the method's config (an adapter_config.json works)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--quantize", default=None, choices=["nf4", "int8"], help="store the frozen base's linear weights "
                        "as 4-bit NF4 (QLoRA-style, double-quantized scales) or int8, dequantized on the fly")

    common = parser.add_argument_group(
        "method options", "each applies to the methods whose config has the field; --set reaches any config field")
    common.add_argument("--r", type=int, default=None, help="rank: r of LoRA, DoRA, VeRA, LoHa, LoKr (default 8)")
    common.add_argument("--alpha", type=float, default=None, help="lora_alpha / alpha (default 16)")
    common.add_argument("--dropout", type=float, default=None, help="lora_dropout / vera_dropout / dropout (default 0)")
    common.add_argument("--target-modules", default=None,
                        help="comma-separated module names, a regex, or all-linear (the default)")
    common.add_argument("--use-rslora", action="store_true", default=None, help="LoRA: scale by alpha/sqrt(r)")
    common.add_argument("--init", default=None, choices=["default", "gaussian", "pissa"], help="LoRA initialisation")
    common.add_argument("--bias", default=None, choices=["none", "all", "lora_only"], help="train biases too")
    common.add_argument("--layers", type=_int_list, default=None, help="freeze: block indices to train, e.g. 4,5")
    common.add_argument("--last-k", type=int, default=None, help="freeze: train the last k blocks (default 2)")
    common.add_argument("--train-layernorm", action="store_true", default=None, help="freeze: also train every LayerNorm")
    common.add_argument("--set", dest="settings", action="append", default=[], metavar="FIELD=VALUE",
                        help="any field of the method's config, e.g. --set num_virtual_tokens=30 or "
                             "--set budget=0.01; VALUE is read as JSON when it parses (numbers, true, [1,2]), else as text")

    loop = parser.add_argument_group("training")
    loop.add_argument("--epochs", type=float, default=None, help="passes over the training data (default: 2, bitfit 4; 1 for chat tasks)")
    loop.add_argument("--max-steps", type=int, default=None, help="optimizer steps; overrides --epochs")
    loop.add_argument("--max-minutes", type=float, default=None, help="time budget: stop after the step that passes this many "
                      "minutes of training (evaluation excluded), then evaluate and save as at a normal end")
    loop.add_argument("--batch-size", type=int, default=None, help="examples per step (default: 32; 8 for chat tasks)")
    loop.add_argument("--lr", type=float, default=None, help="learning rate (default depends on the method)")
    loop.add_argument("--weight-decay", type=float, default=0.0)
    loop.add_argument("--warmup-ratio", type=float, default=0.06)
    loop.add_argument("--scheduler", default="linear", choices=["linear", "cosine", "constant"])
    loop.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    loop.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 = off)")
    loop.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    loop.add_argument("--gradient-checkpointing", action="store_true",
                      help="recompute activations in the backward pass: less memory, about a third more compute")
    loop.add_argument("--save-steps", type=int, default=None, help="checkpoint every N steps (always at epoch ends)")
    loop.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    loop.add_argument("--max-length", type=int, default=None, help="tokens per text (default: 128; 256 for chat tasks, "
                      "longer conversations are cut and counted)")
    loop.add_argument("--packing", action="store_true", help="chat tasks: pack conversations into blocks of --max-length")
    loop.add_argument("--max-train-examples", type=int, default=None, help="use only the first N training examples")
    loop.add_argument("--max-eval-examples", type=int, default=None)
    loop.add_argument("--seed", type=int, default=0)
    loop.add_argument("--patience", type=int, default=None, help="co-training (several tasks): a task stops after N evaluations without gain")
    loop.add_argument("--evals-per-epoch", type=int, default=None, help="co-training (several tasks): evaluations per epoch (default 1)")
    loop.add_argument("--no-progress", action="store_true", help="no progress bar")
    loop.add_argument("--report-to", default="none", help="log loss, learning rate, eval metrics, examples/s and memory "
                      "to tensorboard, mlflow or wandb (several: tensorboard,mlflow), under --output-dir; see docs/tracking.md")
    parser.set_defaults(handler=_train)


# flag -> the config fields it may set, first match wins (method configs name the same idea differently).
_FLAG_FIELDS = {
    "--r": ("r",), "--alpha": ("lora_alpha", "alpha"), "--dropout": ("lora_dropout", "vera_dropout", "dropout"),
    "--target-modules": ("target_modules",), "--use-rslora": ("use_rslora",), "--init": ("init_lora_weights",),
    "--bias": ("bias",), "--layers": ("layers_to_train",), "--last-k": ("last_k",), "--train-layernorm": ("train_layernorm",),
}


def _method_options(args) -> dict:
    """The config fields the command line sets for args.method; a flag the method lacks is an error."""
    import dataclasses

    from peftkit.train.job import METHOD_DEFAULTS

    fields = {f.name for f in dataclasses.fields(METHOD_DEFAULTS[args.method][0])}
    values = {"--r": args.r, "--alpha": args.alpha, "--dropout": args.dropout, "--target-modules": args.target_modules,
              "--use-rslora": args.use_rslora, "--init": args.init, "--bias": args.bias, "--layers": args.layers,
              "--last-k": args.last_k, "--train-layernorm": args.train_layernorm}
    if args.target_modules:
        values["--target-modules"] = _target_modules(args.target_modules)
    if args.init:
        values["--init"] = True if args.init == "default" else args.init
    options, wrong = {}, []
    for flag, value in values.items():
        if value is None:
            continue
        field = next((f for f in _FLAG_FIELDS[flag] if f in fields), None)
        if field is None:
            wrong.append(flag)
        else:
            options[field] = value
    if wrong:
        fitting = [flag for flag, names in _FLAG_FIELDS.items() if any(n in fields for n in names)]
        raise PeftkitError(f"{', '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not apply to --method {args.method}; "
                           f"it applies to: {', '.join(fitting) or 'no method flag'} (and --set FIELD=VALUE for any field)")
    if args.layers is not None and "last_k" in fields:
        options["last_k"] = None  # explicit layers replace the default last_k
    for setting in args.settings:
        field, sep, text = setting.partition("=")
        field = field.strip()
        if not sep or not field:
            raise PeftkitError(f"--set {setting!r}: write FIELD=VALUE, e.g. --set r=16")
        if field not in fields:
            raise PeftkitError(f"--set {field}: --method {args.method} has no field {field!r}; its fields: {', '.join(sorted(fields))}")
        try:
            options[field] = json.loads(text)
        except json.JSONDecodeError:
            options[field] = text
    return options


def _is_causal_job(model: str, task: str) -> bool:
    """Chat / instruction tasks and causal LMs go to the instruction-tuning job, the rest to classification."""
    from peftkit import zoo
    from peftkit.train import chat

    if task in chat.list_instruct_tasks():
        return True
    if task not in zoo.list_tasks() and chat.looks_like_chat_data(task):
        return True
    return zoo.model_kind(model) == "causal"


def _train(args) -> int:
    from peftkit.config import load_config

    if "," in args.task:  # several tasks: one co-training run, a LoRA adapter per task (peftkit.train.cotrain)
        return __import__("peftkit.train.cotrain").train.cotrain.cotrain_from_cli(args, _method_options(args), _print_rows)
    causal = _is_causal_job(args.model, args.task)
    options = _method_options(args)
    config = load_config(args.config) if args.config else None
    model_label = Path(args.model).name if os.sep in args.model else args.model
    task_label = Path(args.task).stem if os.sep in args.task or "." in args.task else args.task
    output_dir = args.output_dir or os.path.join("runs", f"{model_label}-{task_label}-{args.method}")
    training = dict(
        epochs=args.epochs if args.epochs is not None else (1 if causal else None),  # None: the method's default
        max_steps=args.max_steps, max_time_s=None if args.max_minutes is None else 60 * args.max_minutes, batch_size=args.batch_size or (8 if causal else 32), weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio, lr_scheduler=args.scheduler, gradient_accumulation_steps=args.grad_accum,
        max_grad_norm=args.max_grad_norm or None, mixed_precision=args.mixed_precision, save_steps=args.save_steps,
        resume=args.resume, seed=args.seed, progress=not args.no_progress,
        gradient_checkpointing=args.gradient_checkpointing, report_to=args.report_to,
    )
    if args.lr is not None:
        training["learning_rate"] = args.lr
    main_process = int(os.environ.get("RANK", "0")) == 0  # under `accelerate launch`, one report
    if main_process:
        print(f"peftkit train: {args.method} on {args.model} / {args.task} -> {output_dir}", flush=True)
    if causal:
        return _train_causal(args, config, options, training, output_dir)
    if args.packing:
        raise PeftkitError("--packing applies to chat / instruction tasks, not to classification")
    from peftkit.train.job import train_classifier

    result = train_classifier(
        args.model, args.task, args.method, output_dir, config=config, method_options=options,
        training=training, max_length=args.max_length or 128, max_train_examples=args.max_train_examples,
        max_eval_examples=args.max_eval_examples, text_column=args.text_column, label_column=args.label_column,
        seed=args.seed, quantize=args.quantize,
    )
    if not main_process:
        return 0
    accuracy = "n/a (no validation split)" if result.validation_accuracy is None else f"{100 * result.validation_accuracy:.2f}%"
    rows = [
        ("validation accuracy", accuracy),
        ("trainable parameters", f"{result.trainable_parameters:,d} of {result.total_parameters:,d} ({100 * result.trainable_share:.4f}%)"),
        ("adapter file size", _human_bytes(result.adapter_bytes)),
        ("wall time", f"{result.wall_time_s:.1f} s (training {result.train_time_s:.1f} s, {result.examples_per_second:.1f} examples/s)"),
        ("peak memory (RSS)", f"{result.peak_rss_mb:,.0f} MiB"),
        ("adapter", result.adapter_dir),
    ]
    _print_rows(rows)
    return 0


def _train_causal(args, config, options, training, output_dir) -> int:
    from peftkit.train.instruct import train_causal_lm

    if (args.text_column, args.label_column) != ("text", "label"):
        raise PeftkitError("--text-column / --label-column are for classification files; chat files have "
                           "'messages' (or 'instruction' / 'input' / 'output')")
    result = train_causal_lm(
        args.model, args.task, args.method, output_dir, config=config, method_options=options, training=training,
        max_length=args.max_length or 256, packing=args.packing, max_train_examples=args.max_train_examples,
        max_eval_examples=args.max_eval_examples if args.max_eval_examples is not None else 200, seed=args.seed,
        quantize=args.quantize,
    )
    loss = "n/a (no validation split)" if result.validation_loss is None else f"{result.validation_loss:.4f}"
    token_accuracy = result.validation_token_accuracy
    rows = [
        ("validation loss", loss + ("" if token_accuracy is None else f" (assistant-token accuracy {100 * token_accuracy:.2f}%)")),
        ("trainable parameters", f"{result.trainable_parameters:,d} of {result.total_parameters:,d} ({100 * result.trainable_share:.4f}%)"),
        ("adapter file size", _human_bytes(result.adapter_bytes)),
        ("wall time", f"{result.wall_time_s:.1f} s (training {result.train_time_s:.1f} s, {result.examples_per_second:.1f} examples/s)"),
        ("peak memory (RSS)", f"{result.peak_rss_mb:,.0f} MiB"),
        ("adapter", result.adapter_dir),
        ("next", f"peftkit eval {result.adapter_dir}   (exact match, beside the untuned model)"),
    ]
    _print_rows(rows)
    return 0


def _print_rows(rows) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _add_eval_parser(commands) -> None:
    parser = commands.add_parser("eval", help="accuracy of a trained adapter on a task split (chat runs: exact match beside the untuned model)",
                                 formatter_class=_DefaultsHelpFormatter)
    parser.add_argument("adapter", help="adapter folder written by peftkit train (runs/NAME/adapter)")
    parser.add_argument("--task", default=None, help="task to score on (default: the one it was trained on)")
    parser.add_argument("--split", default=None, choices=["train", "validation", "test"],
                        help="split to score (default: validation; test for chat / instruction runs)")
    parser.add_argument("--model", default=None, help="base model, if the folder does not name it (a peft adapter)")
    parser.add_argument("--max-examples", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print JSON")
    chat_group = parser.add_argument_group("chat / instruction runs", "answers are generated greedily and scored by exact match")
    chat_group.add_argument("--no-base", action="store_true", help="skip the untuned model's score")
    chat_group.add_argument("--max-new-tokens", type=int, default=None, help="tokens generated per answer (default 8)")
    chat_group.add_argument("--batch-size", type=int, default=16, help="prompts generated together")
    parser.set_defaults(handler=_eval)


def _eval_causal(args) -> int:
    from peftkit.train.instruct import evaluate_generation

    split = args.split or "test"
    result = evaluate_generation(args.adapter, task=args.task, split=split, model=args.model,
                                 max_examples=args.max_examples, batch_size=args.batch_size,
                                 max_new_tokens=args.max_new_tokens or 8, compare_base=not args.no_base)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['task']} / {result['split']}: exact match on {result['examples']} examples")
    for label, name in (("tuned", "with the adapter"), ("base", "untuned base")):
        if label in result:
            score = result[label]
            print(f"  {name:<17} {100 * score['accuracy']:6.2f}%  ({score['correct']}/{score['total']}, "
                  f"{score['invalid']} answers outside the label set, {score['seconds']:.1f} s)")
    if "base" in result:
        print(f"  difference        {100 * (result['tuned']['accuracy'] - result['base']['accuracy']):+6.2f} points")
    return 0


def _is_causal_run(folder: str) -> bool:
    """A run of the instruction-tuning job, or a peft adapter made for a causal LM."""
    from peftkit.train.job import read_run_info

    if read_run_info(folder).get("kind") == "causal":
        return True
    config = Path(folder) / "adapter_config.json"
    if config.is_file():
        try:
            return json.loads(config.read_text(encoding="utf-8")).get("task_type") == "CAUSAL_LM"
        except json.JSONDecodeError:
            return False
    return False


def _eval(args) -> int:
    from peftkit.train.job import evaluate_run

    if _is_causal_run(args.adapter):
        return _eval_causal(args)
    result = evaluate_run(args.adapter, task=args.task, split=args.split or "validation", model=args.model, max_examples=args.max_examples)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['task']} / {result['split']}: accuracy {100 * result['accuracy']:.2f}% on {result['examples']} examples")
    return 0


def _add_predict_parser(commands) -> None:
    parser = commands.add_parser("predict", help="classify texts with a trained adapter")
    parser.add_argument("adapter", help="adapter folder written by peftkit train")
    parser.add_argument("texts", nargs="*", help="texts to classify (or use --file)")
    parser.add_argument("--file", default=None, help="a text file, one text per line ('-' for standard input)")
    parser.add_argument("--model", default=None, help="base model, if the folder does not name it")
    parser.add_argument("--json", action="store_true", help="print one JSON object per text")
    parser.set_defaults(handler=_predict)


def _predict(args) -> int:
    from peftkit.train.job import load_run, predict_texts

    texts = list(args.texts)
    if args.file:
        handle = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
        with handle:
            texts += [line.rstrip("\n") for line in handle if line.strip()]
    if not texts:
        raise PeftkitError("no text to classify: give texts as arguments or --file FILE")
    if _is_causal_run(args.adapter):
        raise PeftkitError(f"{args.adapter} adapts a causal language model, which writes replies rather than labels: "
                           f"use peftkit generate {args.adapter} --prompt TEXT (or peftkit chat {args.adapter})")
    model, tokenizer, info = load_run(args.adapter, model=args.model)
    probabilities = predict_texts(model, tokenizer, texts, info.get("max_length", 128))
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    for text, row in zip(texts, probabilities):
        label = int(row.argmax())
        name = info.get("label_names", [None] * (label + 1))[label] if info.get("label_names") else id2label.get(label, str(label))
        if args.json:
            print(json.dumps({"text": text, "label": name, "label_id": label, "probability": round(float(row[label]), 4)}))
        else:
            print(f"{name}\t{float(row[label]):.3f}\t{text}")
    return 0


def _add_inspect_parser(commands) -> None:
    parser = commands.add_parser("inspect", help="show an adapter's config, targets, parameter count and size")
    parser.add_argument("adapter", help="adapter folder (peftkit's or Hugging Face peft's)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(handler=_inspect)


def _inspect(args) -> int:
    from peftkit.inspect import inspect_adapter

    report = inspect_adapter(args.adapter)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"adapter      {report['folder']}")
    print(f"method       {report['peft_type']}")
    print(f"base model   {report['base_model'] or 'not recorded'}")
    print(f"parameters   {report['parameters']:,d} in {report['tensors']} tensors ({report['dtype']})")
    print(f"file size    {_human_bytes(report['file_bytes'])}")
    print(f"modules      {len(report['modules'])}: " + ", ".join(report["modules"][:8]) + (" ..." if len(report["modules"]) > 8 else ""))
    ranks = report.get("ranks", {})
    if ranks and (len(set(ranks.values())) > 1 or report["peft_type"] == "ADALORA"):  # where AdaLoRA put its ranks
        shown = ", ".join(f"{m}: {r}" for m, r in list(ranks.items())[:8])
        print(f"ranks        {sum(ranks.values())} in total; {shown}" + (" ..." if len(ranks) > 8 else ""))
    print("config")
    for key, value in sorted(report["config"].items()):
        if key == "rank_pattern" and isinstance(value, dict) and any(isinstance(v, list) for v in value.values()):
            continue  # AdaLoRA's kept-triplet masks: the ranks line above sums them up
        if value not in (None, {}, [], False) or key in ("r", "lora_alpha"):
            print(f"  {key}: {value}")
    for name, sub in report.get("other_adapters", {}).items():
        print(f"other adapter {name!r}: {sub['peft_type']}, {sub['parameters']:,d} parameters, {_human_bytes(sub['file_bytes'])}")
    return 0


def _add_merge_parser(commands) -> None:
    parser = commands.add_parser("merge", help="merge an adapter into its base and write a plain model folder")
    parser.add_argument("adapter", help="adapter folder written by peftkit train")
    parser.add_argument("--output", required=True, help="folder for the merged model (plain transformers loads it)")
    parser.add_argument("--model", default=None, help="base model, if the folder does not name it")
    parser.set_defaults(handler=_merge)


def _merge(args) -> int:
    from peftkit.train.job import load_run

    output = Path(args.output)
    if output.exists() and any(output.iterdir()):
        raise PeftkitError(f"{output} exists and is not empty; choose a new --output folder")
    started = time.perf_counter()
    causal = _is_causal_run(args.adapter)
    if causal:
        from peftkit.train.instruct import load_causal_run

        model, tokenizer, _ = load_causal_run(args.adapter, model=args.model)
    else:
        model, tokenizer, _ = load_run(args.adapter, model=args.model)
    plain = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    from peftkit.quantize import dequantize_merged

    note = dequantize_merged(plain)  # a quantized base: the merge error, and float layers transformers can load
    if note:
        print(note)
    # Written beside the target, then renamed: an interrupted merge leaves no half model folder.
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if output.exists():
        output.rmdir()  # empty (checked above)
    os.replace(partial, output)
    auto_class = "AutoModelForCausalLM" if causal else "AutoModelForSequenceClassification"
    print(f"merged model written to {output} in {time.perf_counter() - started:.1f} s; "
          f"load it with transformers.{auto_class}.from_pretrained({str(output)!r})")
    return 0


def _add_generate_parser(commands) -> None:
    parser = commands.add_parser("generate", help="generate a reply with a causal LM and (optionally) an adapter",
                                 formatter_class=_DefaultsHelpFormatter)
    parser.add_argument("adapter", nargs="?", default=None, help="adapter folder written by peftkit train (omit for the base model)")
    parser.add_argument("--prompt", required=True, help="the user message ('-' reads standard input)")
    parser.add_argument("--system", default=None, help="a system message")
    _add_generation_options(parser)
    parser.set_defaults(handler=_generate)


def _add_chat_parser(commands) -> None:
    parser = commands.add_parser("chat", help="chat in the terminal with a causal LM and (optionally) an adapter",
                                 formatter_class=_DefaultsHelpFormatter)
    parser.add_argument("adapter", nargs="?", default=None, help="adapter folder written by peftkit train (omit for the base model)")
    parser.add_argument("--system", default=None, help="a system message")
    _add_generation_options(parser)
    parser.set_defaults(handler=_chat)


def _add_generation_options(parser) -> None:
    parser.add_argument("--model", default=None, help="base model (default: the one the adapter names; smollm2 without an adapter)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--merge", action="store_true", help="merge the adapter into the base first (faster tokens)")
    parser.add_argument("--seed", type=int, default=0)


def _load_generator(args):
    from peftkit import zoo
    from peftkit.train.instruct import load_causal_run

    if args.adapter is None:
        model, tokenizer = zoo.load_causal_lm(args.model or "smollm2")
        return model.eval(), tokenizer
    model, tokenizer, _ = load_causal_run(args.adapter, model=args.model)
    if args.merge and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model, tokenizer


def _generate(args) -> int:
    from peftkit.train.instruct import stream_reply

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise PeftkitError("--prompt is empty: give the user message")
    model, tokenizer = _load_generator(args)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
    stream_reply(model, tokenizer, messages, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_p=args.top_p, seed=args.seed, write=lambda text: print(text, end="", flush=True))
    print()
    return 0


def _chat(args) -> int:
    from peftkit.train.instruct import stream_reply

    model, tokenizer = _load_generator(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    print("peftkit chat: type a message; /reset clears the conversation, /exit (or Ctrl-D) quits", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = []
            print("(conversation cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        reply = stream_reply(model, tokenizer, system + history, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                             write=lambda piece: print(piece, end="", flush=True))
        print()
        history.append({"role": "assistant", "content": reply})


def _add_export_parser(commands) -> None:
    parser = commands.add_parser(
        "export", help="write an adapter for serving engines (peft LoRA layout; --to-lora converts other methods)",
        formatter_class=_DefaultsHelpFormatter)
    parser.add_argument("adapter", help="adapter folder written by peftkit train (or a peft adapter)")
    parser.add_argument("--output", required=True, help="new folder for the exported adapter")
    parser.add_argument("--model", default=None, help="base model, if the folder does not name it")
    parser.add_argument("--to-lora", action="store_true",
                        help="rewrite the adapter as plain LoRA (exact where the update's rank fits, else an SVD approximation; the error is printed)")
    parser.add_argument("--rank", type=int, default=None, help="--to-lora: the LoRA rank (default: the smallest that is exact to 1e-3)")
    parser.set_defaults(handler=_export)


def _export(args) -> int:
    from peftkit.export import lora_from_adapter, save_lora_conversion, serving_problems

    output = Path(args.output)
    if output.exists() and any(output.iterdir()):
        raise PeftkitError(f"{output} exists and is not empty; choose a new --output folder")
    if _is_causal_run(args.adapter):
        from peftkit.train.instruct import load_causal_run

        model, tokenizer, info = load_causal_run(args.adapter, model=args.model)
    else:
        from peftkit.train.job import load_run

        model, tokenizer, info = load_run(args.adapter, model=args.model)
    if not hasattr(model, "peft_config") or model.is_full_finetune:
        raise PeftkitError(f"{args.adapter} holds a fully fine-tuned model, not an adapter; serve the model folder itself")
    base_id = info.get("model") or model.peft_config["default"].to_dict().get("base_model_name_or_path")
    if args.to_lora:
        conversion = lora_from_adapter(model, "default", rank=args.rank)
        partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
        save_lora_conversion(conversion, partial, base_id)
        if output.exists():
            output.rmdir()
        os.replace(partial, output)
        print(f"LoRA r={conversion.config.r} on {len(conversion.relative_errors)} layers written to {output}; "
              f"largest relative error of a layer's update: {conversion.max_relative_error:.2e}")
        return 0
    problems = serving_problems(model)
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    model.save_pretrained(partial)
    if output.exists():
        output.rmdir()
    os.replace(partial, output)
    print(f"adapter written to {output} in the Hugging Face peft layout (peft.PeftModel.from_pretrained loads it)")
    if problems:
        print("serving engines (vLLM and the like) cannot load all of it:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        print(f"  convert it: peftkit export {args.adapter} --to-lora --output DIR", file=sys.stderr)
    return 0


def _human_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1024
    return f"{count} B"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftkit",
        description="Parameter-efficient fine-tuning: train, evaluate, inspect, merge, export adapters and generate with them.",
        epilog="Start with `peftkit train` (LoRA on minilm / sst2). `peftkit COMMAND --help` for details.",
    )
    from peftkit import __version__

    parser.add_argument("--version", action="version", version=f"peftkit {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_train_parser(commands)
    _add_eval_parser(commands)
    _add_predict_parser(commands)
    _add_inspect_parser(commands)
    _add_merge_parser(commands)
    _add_generate_parser(commands)
    _add_chat_parser(commands)
    _add_export_parser(commands)
    __import__("peftkit.serve.command").serve.command.add_serve_parser(commands, _DefaultsHelpFormatter)
    __import__("peftkit.merging").merging.add_combine_parser(commands)
    from peftkit.bench.compare import add_compare_parser

    add_compare_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except PeftkitError as error:
        print(f"peftkit: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("peftkit: interrupted; a training run resumes with --resume from its last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
