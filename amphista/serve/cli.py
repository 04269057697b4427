"""`amphista generate` and `amphista serve`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from ..cli import (
    HelpFormatter,
    add_drafter_dtype,
    add_placement,
    add_tree_shape,
    float_range,
    int_range,
    positive_int,
)
from ..errors import InputError

API_KEY_ENV = "AMPHISTA_API_KEY"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        metavar="MODEL",
        help="Hugging Face model folder, .gguf file or smollm2-135m-instruct (default: the bundled stories260K)",
    )
    p.add_argument(
        "--drafter",
        metavar="DIR",
        help="drafter folder, 'amphista' / 'medusa' (bundled), or 'none' for vanilla decoding "
        "(default: the Amphista drafter shipped for the target -- the bundled model, "
        "smollm2-135m-instruct -- else none)",
    )
    p.add_argument(
        "--tree",
        default=None,
        help="token tree: 'auto' (the default where the drafter has head_accuracy.json): at each step the tree, or "
        "none, with the most expected tokens/s for the live rows, from the head accuracies and this machine's measured "
        "step costs (docs/cost-model.md); else a name (mc_sim_7b_63, chain) or a JSON file",
    )
    p.add_argument(
        "--tree-nodes",
        type=int_range(2, what="an integer of at least 2"),
        metavar="N",
        help="with --tree auto: verify the best N-token tree (root included) for the head accuracies at every step, "
        "instead of the cost model's choice",
    )
    add_tree_shape(p)
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads for torch (default: the count measured fastest for the model on this machine, "
        "among 1, 2, 4, ... up to the usable cores; measured once, then cached)",
    )
    add_drafter_dtype(p)
    add_placement(p)


def _set_threads(args) -> None:
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)


def add_parser(subparsers) -> None:
    g = subparsers.add_parser(
        "generate",
        help="generate text in the terminal, streamed as tokens commit",
        description="Complete a prompt (--prompt, or stdin), chat (--chat: a message per line, from the "
        "terminal or stdin), or answer one message (--chat --prompt TEXT). A prompt read from stdin loses "
        "one trailing newline (the one `echo` adds); text must be UTF-8.",
        formatter_class=HelpFormatter,
    )
    _model_args(g)
    g.add_argument(
        "--prompt", help="text to continue (default: read from stdin); with --chat, the one message to answer"
    )
    g.add_argument(
        "--chat",
        action="store_true",
        help="multi-turn chat using the chat template, a message per line; a conversation that outgrows "
        "the context window continues as a new one (said on stderr). With --prompt: answer that message, "
        "then exit",
    )
    g.add_argument("--system", help="system prompt; only with --chat (a plain completion has none)")
    g.add_argument("--temperature", type=float_range(0.0), default=0.0, help="0 = greedy; sampling above 0")
    g.add_argument(
        "--top-p", type=float_range(0.0, 1.0, low_open=True), default=1.0, help="nucleus sampling, in (0, 1]"
    )
    g.add_argument("--top-k", type=int_range(0, what="an integer >= 0"), default=0, help="0 = off")
    g.add_argument(
        "--seed",
        type=int_range(0, 2**64 - 1, what="an integer from 0 to 2**64-1"),
        default=None,
        help="random seed for sampling (default: a fresh one each run)",
    )
    g.add_argument("--max-new-tokens", type=positive_int, default=128, help="most tokens to generate")
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    g.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="print text as tokens are committed, or all at the end (default: --stream)",
    )
    g.add_argument("--stats", action="store_true", help="print tokens, tokens/s and tau to stderr at the end")
    g.set_defaults(func=run_generate)

    s = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)",
        description="Serve one model over HTTP; see docs/serving.md.",
        formatter_class=HelpFormatter,
    )
    _model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    s.add_argument(
        "--port",
        type=int_range(1, 65535, what="a port number from 1 to 65535"),
        default=8000,
        help="TCP port",
    )
    s.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on every endpoint but /health (default: ${API_KEY_ENV})",
    )
    s.add_argument(
        "--model-name", default=None, help="the model id clients send (default: the target folder name)"
    )
    s.add_argument(
        "--max-tokens-limit",
        type=positive_int,
        default=None,
        help="largest max_tokens a request may ask for (default: the context window)",
    )
    s.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=1 << 20,
        help="largest request body; larger get HTTP 413",
    )
    s.add_argument(
        "--max-queue", type=positive_int, default=256, help="requests waiting beyond this get HTTP 503"
    )
    s.add_argument(
        "--max-batch-size",
        type=positive_int,
        default=8,
        help="most requests decoded together (continuous batching); 1 decodes one request at a time",
    )
    s.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="uvicorn's log level")
    s.set_defaults(func=run_serve)


def _check_generate_args(args) -> None:
    from .terminal import check_text_arg

    if args.system is not None and not args.chat:
        raise InputError(
            "--system needs --chat: a plain completion has no system prompt; add --chat, or put the text "
            "at the start of --prompt"
        )
    for flag in ("--prompt", "--system"):
        check_text_arg(flag, getattr(args, flag[2:]))
    if args.chat and args.prompt is not None and not args.prompt.strip():
        raise InputError(
            "--prompt is empty: with --chat it is the message to answer; write one, or drop --prompt"
        )
    for stop in args.stop or []:
        check_text_arg("--stop", stop)
    if not args.chat and args.prompt is None and sys.stdin.isatty():
        raise InputError("nothing to complete: pass --prompt TEXT, pipe text on stdin, or use --chat")


def run_generate(args) -> int:
    from .terminal import chat, complete, read_stdin_prompt

    _check_generate_args(args)
    prompt = None
    if not args.chat:  # read (and check) the prompt before spending time on loading
        prompt = args.prompt if args.prompt is not None else read_stdin_prompt()
    from .loading import load_decoder

    _set_threads(args)
    decoder = load_decoder(
        args.target, args.drafter, args.tree, args.tree_nodes, args.threads, args.drafter_dtype, args.tree_shape,
        args.device, args.dtype,
    )  # fmt: skip
    return chat(decoder, args) if args.chat else complete(decoder, args, prompt)


def run_serve(args) -> int:
    try:
        import uvicorn

        from .app import create_app
    except ModuleNotFoundError as e:
        raise InputError(f"serving needs {e.name}: pip install 'amphista[serve]'") from None
    from .loading import load_decoder

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.host not in LOOPBACK and not api_key:
        print(
            f"amphista serve: warning: listening on {args.host} without an API key; anyone who can reach "
            f"this port can use the model (set --api-key or ${API_KEY_ENV})",
            file=sys.stderr,
        )
    _set_threads(args)
    decoder = load_decoder(
        args.target, args.drafter, args.tree, args.tree_nodes, args.threads, args.drafter_dtype, args.tree_shape,
        args.device, args.dtype,
    )  # fmt: skip
    app = create_app(
        decoder,
        model_name=args.model_name,
        api_key=api_key,
        max_body_bytes=args.max_body_bytes,
        max_tokens_limit=args.max_tokens_limit,
        max_queue=args.max_queue,
        max_batch_size=args.max_batch_size,
    )
    print(
        f"amphista serve: model {app.state.server.name!r} with {type(decoder).__name__}, up to "
        f"{app.state.server.worker.max_batch_size} requests at once, on http://{args.host}:{args.port}/v1",
        file=sys.stderr,
    )
    return serve_on_main_thread(
        app, uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
    )


def serve_on_main_thread(app, server) -> int:
    """HTTP on a thread, decoding on this one (the main thread: see Worker.run). SIGINT or SIGTERM shuts down
    gracefully (answers in progress finish, then the worker's rows); a second SIGINT stops at once. 0 after a
    shutdown, 1 when the server did not start (a port in use: uvicorn has said why)."""
    worker = app.state.server.worker
    worker.on_caller = True  # before the app's lifespan runs: it must not start a decoding thread

    def http() -> None:
        try:
            server.run()
        finally:  # whatever ended it (a shutdown, a failed start), decoding ends too
            worker.stop()

    def shut_down(signum, frame) -> None:
        if server.should_exit and signum == signal.SIGINT:
            raise KeyboardInterrupt
        server.should_exit = True

    handlers = {sig: signal.signal(sig, shut_down) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=http, name="amphista-http", daemon=True)
    thread.start()
    try:
        worker.run()
    finally:
        server.should_exit = True
        thread.join(30)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return 0 if server.started else 1
