"""`peftkit train`: a classification run, an instruction-tuning run, or several tasks co-trained."""

from __future__ import annotations

import json
import os
from pathlib import Path

from peftkit.bench.report import human_bytes
from peftkit.cli.options import DefaultsHelpFormatter, int_list, print_rows, target_modules
from peftkit.errors import PeftkitError


def add_parsers(commands) -> None:
    from peftkit import zoo
    from peftkit.registry import list_methods

    parser = commands.add_parser(
        "train", help="train a method on a task and save the adapter",
        description="Train a PEFT method on a text-classification task, or instruction-tune a causal LM on a "
                    "chat / instruction task (e.g. --model smollm2 --task trec-instruct). With no arguments: LoRA on "
                    "minilm / sst2, then print validation accuracy, trainable share, adapter size, "
                    "wall time and peak memory.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--model", default="minilm", help=f"built-in model ({', '.join(zoo.list_models())}) or a local Hugging Face model folder")
    from peftkit.train.chat import list_instruct_tasks
    from peftkit.vision.data import list_image_tasks

    parser.add_argument("--task", default=None, help=f"(default: sst2; mnist-5k for an image model) built-in task "
                        f"({', '.join(zoo.list_tasks())}; chat: "
                        f"{', '.join(list_instruct_tasks())}), a folder, or a .jsonl/.csv file (chat files: "
                        "'messages' or 'instruction'/'input'/'output' per line); several, comma-separated (sst2,trec,cr,mr), "
                        "co-train a LoRA adapter per task in one run with mixed batches; image models (efficientnet-lite0): "
                        f"{', '.join(list_image_tasks())}, a folder of class subfolders, or a .csv/.jsonl of image paths")
    parser.add_argument("--method", default="lora", choices=list_methods(), help="how to adapt the model")
    parser.add_argument("--output-dir", default=None, help="run folder (default: runs/<model>-<task>-<method>)")
    parser.add_argument("--config", default=None, help="a JSON file with the method's config (an adapter_config.json works)")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--quantize", default=None, choices=["nf4", "int8"], help="store the frozen base's linear weights "
                        "as 4-bit NF4 (QLoRA-style, double-quantized scales) or int8, dequantized on the fly")

    _add_method_options(parser)
    _add_training_options(parser)
    _add_image_options(parser)
    parser.set_defaults(handler=run, command_parser=parser)


def _add_method_options(parser) -> None:
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
    common.add_argument("--layers", type=int_list, default=None, help="freeze: block indices to train, e.g. 4,5")
    common.add_argument("--last-k", type=int, default=None, help="freeze: train the last k blocks (default 2)")
    common.add_argument("--train-layernorm", action="store_true", default=None, help="freeze: also train every LayerNorm")
    common.add_argument("--set", dest="settings", action="append", default=[], metavar="FIELD=VALUE",
                        help="any field of the method's config, e.g. --set num_virtual_tokens=30 or "
                             "--set budget=0.01; VALUE is read as JSON when it parses (numbers, true, [1,2]), else as text")


def _add_training_options(parser) -> None:
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
    loop.add_argument("--eval-steps", type=int, default=None, help="also evaluate every N optimizer steps (besides each epoch's end)")
    loop.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    loop.add_argument("--max-length", type=int, default=None, help="tokens per text (default: 128; 256 for chat tasks, "
                      "longer conversations are cut and counted)")
    loop.add_argument("--packing", action="store_true", help="chat tasks: pack conversations into blocks of --max-length")
    loop.add_argument("--max-train-examples", type=int, default=None, help="use only the first N training examples")
    loop.add_argument("--max-eval-examples", type=int, default=None)
    loop.add_argument("--validation-fraction", type=float, default=None,
                      help="a task without a validation split (a single .csv / .jsonl file): hold out this share of its "
                           "training examples, stratified by label with a fixed seed, to evaluate on (default: 0.1; 0: none)")
    loop.add_argument("--seed", type=int, default=0)
    loop.add_argument("--patience", type=int, default=None, help="co-training (several tasks): a task stops after N evaluations without gain")
    loop.add_argument("--evals-per-epoch", type=int, default=None, help="co-training (several tasks): evaluations per epoch (default 1)")
    loop.add_argument("--no-progress", action="store_true", help="no progress bar")
    loop.add_argument("--skip-memory-check", action="store_true", help="start even when `peftkit estimate` predicts "
                      "that the run needs more memory than is available (set PEFTKIT_AVAILABLE_MEMORY to change that figure)")
    loop.add_argument("--report-to", default="none", help="log loss, learning rate, eval metrics, examples/s and memory "
                      "to tensorboard, mlflow or wandb (several: tensorboard,mlflow), under --output-dir; see docs/tracking.md")


def _add_image_options(parser) -> None:
    images = parser.add_argument_group("image models (efficientnet-lite0, Hugging Face image classifiers)")
    images.add_argument("--image-column", default="image", help="the column of image paths in .csv/.jsonl task files")
    images.add_argument("--image-size", type=int, default=None, help="input size in pixels (default: 64 for mnist-5k, "
                        "else the model's own, 224 for efficientnet-lite0); smaller is faster")
    images.add_argument("--augment", default=None, help="training-time augmentation, comma-separated: crop (a random crop "
                        "position), flip (random left-right flip); default none")


# flag -> the config fields it may set, first match wins (method configs name the same idea differently).
_FLAG_FIELDS = {
    "--r": ("r",), "--alpha": ("lora_alpha", "alpha"), "--dropout": ("lora_dropout", "vera_dropout", "dropout"),
    "--target-modules": ("target_modules",), "--use-rslora": ("use_rslora",), "--init": ("init_lora_weights",),
    "--bias": ("bias",), "--layers": ("layers_to_train",), "--last-k": ("last_k",), "--train-layernorm": ("train_layernorm",),
}


def _method_options(args) -> dict:
    """The config fields the command line sets for args.method; a flag the method lacks is an error."""
    import dataclasses

    from peftkit.registry import METHODS

    fields = {f.name for f in dataclasses.fields(METHODS[args.method].config)}
    values = {"--r": args.r, "--alpha": args.alpha, "--dropout": args.dropout, "--target-modules": args.target_modules,
              "--use-rslora": args.use_rslora, "--init": args.init, "--bias": args.bias, "--layers": args.layers,
              "--last-k": args.last_k, "--train-layernorm": args.train_layernorm}
    if args.target_modules:
        values["--target-modules"] = target_modules(args.target_modules)
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


def run(args) -> int:
    from peftkit import zoo
    from peftkit.config import load_config

    image = zoo.model_kind(args.model) == "image"
    args.task = args.task or ("mnist-5k" if image else "sst2")
    if not image and (args.image_size is not None or args.augment is not None or args.image_column != "image"):
        raise PeftkitError("--image-size, --augment and --image-column apply to image models (e.g. --model efficientnet-lite0)")
    if "," in args.task:  # several tasks: one co-training run, a LoRA adapter per task (peftkit.train.cotrain)
        return _cotrain(args, _method_options(args))
    causal = not image and _is_causal_job(args.model, args.task)
    options = _method_options(args)
    config = load_config(args.config) if args.config else None
    model_label = Path(args.model).name if os.sep in args.model else args.model
    task_label = Path(args.task).stem if os.sep in args.task or "." in args.task else args.task
    output_dir = args.output_dir or os.path.join("runs", f"{model_label}-{task_label}-{args.method}")
    training = dict(
        epochs=args.epochs if args.epochs is not None else (1 if causal else None),  # None: the method's default
        max_steps=args.max_steps, max_time_s=None if args.max_minutes is None else 60 * args.max_minutes,
        batch_size=args.batch_size or (8 if causal else 32), weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio, lr_scheduler=args.scheduler, gradient_accumulation_steps=args.grad_accum,
        max_grad_norm=args.max_grad_norm or None, mixed_precision=args.mixed_precision, save_steps=args.save_steps,
        resume=args.resume, seed=args.seed, progress=not args.no_progress,
        gradient_checkpointing=args.gradient_checkpointing, report_to=args.report_to, eval_steps=args.eval_steps,
    )
    if args.lr is not None:
        training["learning_rate"] = args.lr
    if not args.skip_memory_check:
        check_memory(args, config, options, max_length=args.max_length or (256 if causal else 128),
                     batch_size=training["batch_size"])
    main_process = int(os.environ.get("RANK", "0")) == 0  # under `accelerate launch`, one report
    if main_process:
        print(f"peftkit train: {args.method} on {args.model} / {args.task} -> {output_dir}", flush=True)
    if causal:
        return _train_causal(args, config, options, training, output_dir)
    if image:
        return _train_image(args, config, options, training, output_dir, main_process)
    if args.packing:
        raise PeftkitError("--packing applies to chat / instruction tasks, not to classification")
    from peftkit.train.job import train_classifier

    result = train_classifier(
        args.model, args.task, args.method, output_dir, config=config, method_options=options,
        training=training, max_length=args.max_length or 128, max_train_examples=args.max_train_examples,
        max_eval_examples=args.max_eval_examples, text_column=args.text_column, label_column=args.label_column,
        seed=args.seed, quantize=args.quantize, log=print if main_process else None,
        **({} if args.validation_fraction is None else {"validation_fraction": args.validation_fraction}),
    )
    return _report(result, main_process)


def _report(result, main_process: bool) -> int:
    if not main_process:
        return 0
    accuracy = "n/a (no validation split)" if result.validation_accuracy is None else f"{100 * result.validation_accuracy:.2f}%"
    rows = [
        ("validation accuracy", accuracy),
        ("trainable parameters", f"{result.trainable_parameters:,d} of {result.total_parameters:,d} ({100 * result.trainable_share:.4f}%)"),
        ("adapter file size", human_bytes(result.adapter_bytes)),
        ("wall time", f"{result.wall_time_s:.1f} s (training {result.train_time_s:.1f} s, {result.examples_per_second:.1f} examples/s)"),
        ("peak memory (RSS)", f"{result.peak_rss_mb:,.0f} MiB"),
        ("adapter", result.adapter_dir),
    ]
    print_rows(rows)
    return 0


def _augmentation(text: str | None):
    from peftkit.vision.images import Augmentation

    parts = [part.strip() for part in (text or "").split(",") if part.strip()]
    unknown = [part for part in parts if part not in ("crop", "flip")]
    if unknown:
        raise PeftkitError(f"--augment {text!r}: unknown {', '.join(unknown)}; use crop, flip or crop,flip")
    return Augmentation(random_crop="crop" in parts, flip="flip" in parts)


def _train_image(args, config, options, training, output_dir, main_process: bool) -> int:
    from peftkit.train.image_job import train_image_classifier

    if args.quantize is not None:
        raise PeftkitError("--quantize stores linear weights in 4 or 8 bits; it is for text models, not image models")
    if args.max_length is not None or args.text_column != "text":
        raise PeftkitError("--max-length and --text-column are for text tasks; image tasks use --image-size and --image-column")
    result = train_image_classifier(
        args.model, args.task, args.method, output_dir, config=config, method_options=options, training=training,
        image_size=args.image_size, augmentation=_augmentation(args.augment), max_train_examples=args.max_train_examples,
        max_eval_examples=args.max_eval_examples, image_column=args.image_column, label_column=args.label_column,
        seed=args.seed, log=print if main_process else None,
        **({} if args.validation_fraction is None else {"validation_fraction": args.validation_fraction}),
    )
    return _report(result, main_process)


def check_memory(args, config, options: dict, *, max_length: int, batch_size: int) -> None:
    """Refuse, before loading anything, a run that `peftkit estimate` predicts will not fit in the memory available.

    The estimate is a guard, not a gate: where it cannot be made (a model or method it does not know how to
    build on the meta device), the run goes ahead and reports its own errors.
    """
    from peftkit.estimate import cheaper_setting, estimate_training_memory, gib

    try:
        estimate = estimate_training_memory(args.model, args.method, quantize=args.quantize, batch_size=batch_size,
                                            max_length=max_length, gradient_checkpointing=args.gradient_checkpointing,
                                            method_options=options, config=config)
    except Exception:  # noqa: BLE001 - any failure to estimate leaves the decision to the run itself
        return
    if estimate.fits is not False:
        return
    cheaper = cheaper_setting(estimate)
    way_out = (f"a cheaper setting that fits: {cheaper.setting()} (about {gib(cheaper.peak_bytes)})" if cheaper
               else "no cheaper setting fits either (try a smaller model, --batch-size or --max-length)")
    raise PeftkitError(f"this run will not fit: `peftkit estimate` predicts a peak of {gib(estimate.peak_bytes)} for "
                       f"{estimate.setting()} on {args.model}, and {gib(estimate.available_bytes)} is available; "
                       f"{way_out}; --skip-memory-check starts it anyway")


def _train_causal(args, config, options, training, output_dir) -> int:
    from peftkit.train.instruct import train_causal_lm

    if args.validation_fraction is not None:
        raise PeftkitError("--validation-fraction applies to classification tasks; a chat / instruction file without a "
                           "validation split is scored on its test split by peftkit eval")
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
        ("adapter file size", human_bytes(result.adapter_bytes)),
        ("wall time", f"{result.wall_time_s:.1f} s (training {result.train_time_s:.1f} s, {result.examples_per_second:.1f} examples/s)"),
        ("peak memory (RSS)", f"{result.peak_rss_mb:,.0f} MiB"),
        ("adapter", result.adapter_dir),
        ("next", f"peftkit eval {result.adapter_dir}   (exact match, beside the untuned model)"),
    ]
    print_rows(rows)
    return 0


def _cotrain(args, method_options: dict) -> int:
    """`peftkit train --task a,b,...`: one co-training run, a LoRA adapter per task in mixed batches."""
    from peftkit import zoo
    from peftkit.config import load_config
    from peftkit.train.cotrain import cotrain_classifiers, describe, task_name

    specs = [part.strip() for part in args.task.split(",") if part.strip()]
    if args.method != "lora":
        raise PeftkitError(f"co-training (several tasks in --task) trains LoRA adapters only, got --method {args.method}: "
                           f"use --method lora, or train each task on its own (peftkit train --task {specs[0]} ...)")
    refused = {"--max-steps": args.max_steps is not None, "--max-minutes": getattr(args, "max_minutes", None) is not None,
               "--grad-accum": args.grad_accum != 1, "--mixed-precision": args.mixed_precision != "no",
               "--gradient-checkpointing": args.gradient_checkpointing, "--packing": args.packing,
               "--quantize": getattr(args, "quantize", None) not in (None, "none")}
    refused = [flag for flag, given in refused.items() if given]
    if refused:
        raise PeftkitError(f"{', '.join(refused)} {'does' if len(refused) == 1 else 'do'} not apply to co-training (several tasks "
                           "in --task); its length is set with --epochs")
    if zoo.model_kind(args.model) != "encoder":
        raise PeftkitError(f"co-training trains classifiers on an encoder model; {args.model} is a causal LM")
    config = load_config(args.config) if args.config else None
    model_label = Path(args.model).name if os.sep in args.model else args.model
    output_dir = args.output_dir or os.path.join("runs", f"{model_label}-{'+'.join(task_name(s) for s in specs)}-lora")
    training = dict(epochs=args.epochs if args.epochs is not None else 2, batch_size=args.batch_size or 32,
                    weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, lr_scheduler=args.scheduler,
                    max_grad_norm=args.max_grad_norm or None, resume=args.resume, seed=args.seed,
                    progress=not args.no_progress, patience=getattr(args, "patience", None),
                    evals_per_epoch=getattr(args, "evals_per_epoch", None) or 1, report_to=args.report_to)
    if args.lr is not None:
        training["learning_rate"] = args.lr
    if args.save_steps is not None:
        training["save_steps"] = args.save_steps
    print(f"peftkit train: co-training lora on {args.model} / {', '.join(specs)} -> {output_dir}", flush=True)
    result = cotrain_classifiers(args.model, specs, output_dir, config=config, method_options=method_options,
                                 training=training, max_length=args.max_length or 128,
                                 max_train_examples=args.max_train_examples, max_eval_examples=args.max_eval_examples,
                                 text_column=args.text_column, label_column=args.label_column, seed=args.seed, log=print,
                                 **({} if args.validation_fraction is None else {"validation_fraction": args.validation_fraction}))
    print_rows(describe(result))
    return 0
