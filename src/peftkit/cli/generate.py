"""`peftkit generate` (one reply) and `peftkit chat` (a conversation in the terminal), streaming."""

from __future__ import annotations

import sys

from peftkit.cli.options import DefaultsHelpFormatter
from peftkit.errors import PeftkitError


def add_parsers(commands) -> None:
    _add_generate_parser(commands)
    _add_chat_parser(commands)


def _add_generate_parser(commands) -> None:
    parser = commands.add_parser("generate", help="generate a reply with a causal LM and (optionally) an adapter",
                                 formatter_class=DefaultsHelpFormatter)
    parser.add_argument("adapter", nargs="?", default=None, help="adapter folder written by peftkit train (omit for the base model)")
    parser.add_argument("--prompt", required=True, help="the user message ('-' reads standard input)")
    parser.add_argument("--system", default=None, help="a system message")
    _add_generation_options(parser)
    parser.set_defaults(handler=_generate, command_parser=parser)


def _add_chat_parser(commands) -> None:
    parser = commands.add_parser("chat", help="chat in the terminal with a causal LM and (optionally) an adapter",
                                 formatter_class=DefaultsHelpFormatter)
    parser.add_argument("adapter", nargs="?", default=None, help="adapter folder written by peftkit train (omit for the base model)")
    parser.add_argument("--system", default=None, help="a system message")
    _add_generation_options(parser)
    parser.set_defaults(handler=_chat, command_parser=parser)


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
