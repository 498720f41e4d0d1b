"""`peftkit eval` (accuracy of an adapter on a task split; exact match for chat runs) and `peftkit predict`."""

from __future__ import annotations

import json
import sys

from peftkit.cli.options import DefaultsHelpFormatter
from peftkit.errors import PeftkitError


def add_parsers(commands) -> None:
    _add_eval_parser(commands)
    _add_predict_parser(commands)


def _add_eval_parser(commands) -> None:
    parser = commands.add_parser("eval", help="accuracy of a trained adapter on a task split (chat runs: exact match beside the untuned model)",
                                 formatter_class=DefaultsHelpFormatter)
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
    parser.set_defaults(handler=_eval, command_parser=parser)


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


def _eval(args) -> int:
    from peftkit.export import is_causal_run
    from peftkit.train.job import evaluate_run

    if is_causal_run(args.adapter):
        return _eval_causal(args)
    from peftkit.train.image_job import evaluate_image_run, is_image_run

    evaluate = evaluate_image_run if is_image_run(args.adapter) else evaluate_run
    result = evaluate(args.adapter, task=args.task, split=args.split or "validation", model=args.model, max_examples=args.max_examples)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['task']} / {result['split']}: accuracy {100 * result['accuracy']:.2f}% on {result['examples']} examples")
    return 0


def _add_predict_parser(commands) -> None:
    parser = commands.add_parser("predict", help="classify texts (or images, with an image model's adapter) with a trained adapter")
    parser.add_argument("adapter", help="adapter folder written by peftkit train")
    parser.add_argument("texts", nargs="*", help="texts to classify (or use --file); image files for an image run")
    parser.add_argument("--file", default=None, help="a text file, one text (or image path) per line ('-' for standard input)")
    parser.add_argument("--model", default=None, help="base model, if the folder does not name it")
    parser.add_argument("--json", action="store_true", help="print one JSON object per text")
    parser.set_defaults(handler=_predict, command_parser=parser)


def _predict(args) -> int:
    from peftkit.train.job import load_run, predict_texts

    texts = list(args.texts)
    if args.file:
        handle = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
        with handle:
            texts += [line.rstrip("\n") for line in handle if line.strip()]
    if not texts:
        raise PeftkitError("no text to classify: give texts as arguments or --file FILE")
    from peftkit.export import is_causal_run

    if is_causal_run(args.adapter):
        raise PeftkitError(f"{args.adapter} adapts a causal language model, which writes replies rather than labels: "
                           f"use peftkit generate {args.adapter} --prompt TEXT (or peftkit chat {args.adapter})")
    from peftkit.train.image_job import is_image_run, load_image_run, predict_images

    if is_image_run(args.adapter):
        model, preprocessor, info = load_image_run(args.adapter, model=args.model)
        probabilities = predict_images(model, preprocessor, texts)
    else:
        model, tokenizer, info = load_run(args.adapter, model=args.model)
        probabilities = predict_texts(model, tokenizer, texts, info.get("max_length", 128))
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    for text, row in zip(texts, probabilities):
        label = int(row.argmax())
        name = info.get("label_names", [None] * (label + 1))[label] if info.get("label_names") else id2label.get(label, str(label))
        if args.json:
            key = "image" if info.get("kind") == "image" else "text"
            print(json.dumps({key: text, "label": name, "label_id": label, "probability": round(float(row[label]), 4)}))
        else:
            print(f"{name}\t{float(row[label]):.3f}\t{text}")
    return 0
