"""The ``quiver`` command line: ``serve``, ``experts``, ``sync``, ``generate``, ``train``, ``demo`` and ``eval``.

Heavy imports (torch, transformers) happen inside the commands that need them, so ``--help``
stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

from .settings import Settings


def _add_settings_flags(parser: argparse.ArgumentParser, *, library: bool = True) -> None:
    group = parser.add_argument_group("server settings (each also read from the QUIVER_<NAME> environment variable)")
    if library:
        group.add_argument("--library-dir", type=Path, help="expert library folder (default: <cache-dir>/library)")
    group.add_argument("--base-model", help="transformers causal LM id or local path (default: the embedded SmolLM2-135M-Instruct)")
    group.add_argument("--cache-dir", type=Path, help="cache folder for the converted embedded model and demo experts (default: ~/.cache/quiver)")
    group.add_argument("--device", help="'auto', 'cpu', 'cuda' or 'cuda:N' (default: auto)")
    group.add_argument("--dtype", help="'auto', 'float32', 'bfloat16' or 'float16' (default: auto)")
    group.add_argument("--routing-method", help="routing of requests that name no method: arrow, centered, normalized, sequence or hybrid (default: sequence)")
    group.add_argument("--routing-pooling", help="pooling of the sequence and hybrid methods for requests that set none: module or vote (default: vote)")
    group.add_argument("--routing-top-k", type=int, help="experts mixed per token and module for requests that set none (default: 1)")
    group.add_argument("--routing-temperature", type=float, help="routing temperature for requests that set none (default: 1.0)")
    group.add_argument("--max-new-tokens", type=int, help="largest max_new_tokens a request may ask for, in tokens (default: 512)")
    group.add_argument("--max-input-tokens", type=int, help="maximum prompt length accepted, in tokens (default: 4096)")
    group.add_argument("--max-batch-size", type=int, help="maximum number of requests generated together in one batch (default: 16)")
    group.add_argument("--max-queue", type=int, help="maximum number of requests waiting for the batch; beyond it requests get 503 (default: 64)")
    group.add_argument("--max-batch-prefill-tokens", type=int, help="maximum number of prompt tokens, padded, run in one prefill pass (default: 4096)")
    group.add_argument("--request-timeout", type=float, help="seconds a request may take from arrival to last token, queueing included (default: 300)")
    if library:
        group.add_argument("--hub-repo", help="Hub model repo id to keep the library in sync with (default: none; token from HF_TOKEN)")
        group.add_argument("--hub-revision", help="branch of --hub-repo to pull from and push to (default: main)")
        group.add_argument("--sync-interval", type=float, help="seconds between polls of --hub-repo; 0 turns polling off (default: 60)")
    group.add_argument("--max-upload-mb", type=int, help="largest upload accepted (weights, config and form fields together), in MiB (default: 512)")


def _settings_from(args: argparse.Namespace) -> Settings:
    return Settings.from_env(
        library_dir=getattr(args, "library_dir", None),
        base_model=args.base_model,
        cache_dir=args.cache_dir,
        device=args.device,
        dtype=args.dtype,
        routing_method=args.routing_method,
        routing_pooling=args.routing_pooling,
        routing_top_k=args.routing_top_k,
        routing_temperature=args.routing_temperature,
        max_new_tokens=args.max_new_tokens,
        max_input_tokens=args.max_input_tokens,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        max_batch_prefill_tokens=args.max_batch_prefill_tokens,
        request_timeout=args.request_timeout,
        max_upload_mb=args.max_upload_mb,
        hub_repo=getattr(args, "hub_repo", None),
        hub_revision=getattr(args, "hub_revision", None),
        sync_interval=getattr(args, "sync_interval", None),
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
    )


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app

    settings = _settings_from(args)
    _check_port_free(settings.host, settings.port)
    # With --json, uvicorn keeps the root logger's JSON handler instead of installing its own.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info", log_config=None if args.json else uvicorn.config.LOGGING_CONFIG)
    return 0


def _check_port_free(host: str, port: int) -> None:
    """Raise before the model loads when the address is taken, rather than after a minute of loading."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise OSError(f"cannot listen on {host}:{port} ({error.strerror}); choose another --port (QUIVER_PORT) or stop the process using it") from None


def _train(args: argparse.Namespace) -> int:
    from .demo import train_command

    return train_command(args)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if not args.verbose:
        # The demo narrates what it does; the server's INFO lines and the weight-loading bar would
        # interleave with that narration (-v brings them back).
        logging.getLogger("quiver").setLevel(logging.WARNING)
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()

    if not args.json:
        return run_demo(_settings_from(args), port=args.port, serve=args.serve, retrain=args.retrain)
    results: list[dict] = []
    # The demo's running commentary goes to stderr, so that stdout holds only the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        status = run_demo(_settings_from(args), port=args.port, serve=args.serve, retrain=args.retrain, results=results)
    print(json.dumps({"answers": results, "correct": sum(result["correct"] for result in results)}, indent=2))
    return status


class _JsonLogFormatter(logging.Formatter):
    """One JSON object per log line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quiver", description="Serve a library of LoRA experts with per-token Arrow routing.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the HTTP server",
        description="Run the Quiver HTTP server.",
        epilog="Secrets have no flag, so that they stay out of the process list; set them in the environment: "
        "QUIVER_API_TOKEN (bearer token for writes, at least 16 characters), QUIVER_API_TOKEN_READS=1 (reads need it too), "
        "QUIVER_WEBHOOK_SECRET (for POST /hub/webhook) and HF_TOKEN (for the Hub).",
    )
    serve.add_argument("--host", help="address to listen on (default: 127.0.0.1; QUIVER_HOST)")
    serve.add_argument("--port", type=int, help="TCP port to listen on (default: 8000; QUIVER_PORT)")
    serve.add_argument("--json", action="store_true", help="write the log as one JSON object per line")
    _add_settings_flags(serve)
    serve.set_defaults(handler=_serve)

    train = commands.add_parser("train", help="train a demo skill expert with PEFT", description="Train a LoRA expert on one of the built-in demo skills.")
    train.add_argument("skill", help="the skill to train (see --list)", nargs="?")
    train.add_argument("--list", action="store_true", help="list the built-in skills and exit")
    train.add_argument("--output", type=Path, help="folder to write the PEFT adapter to (default: ./adapters/<skill>)")
    train.add_argument("--steps", type=int, help="optimizer steps (default: the demo's setting)")
    train.add_argument("--rank", type=int, help="LoRA rank (default: the demo's setting)")
    train.add_argument("--learning-rate", type=float, help="AdamW learning rate (default: the demo's setting)")
    train.add_argument("--seed", type=int, default=0, help="random seed for data and initialization (default: 0)")
    train.add_argument("--base-model", help="transformers causal LM id or local path (default: the embedded model)")
    train.add_argument("--cache-dir", type=Path, help="cache folder for the converted embedded model (default: ~/.cache/quiver)")
    train.add_argument("--json", action="store_true", help="print the result as JSON (the progress bar stays on stderr)")
    train.set_defaults(handler=_train)

    demo = commands.add_parser(
        "demo",
        help="train the demo experts, start a server and route one prompt per skill",
        description="Train (or reuse) the demo skill experts, start a server on 127.0.0.1, upload the experts "
        "through the client and print each skill's routed answer. The demo uses its own library, "
        "<cache-dir>/demo-library, recreated on every run.",
    )
    demo.add_argument("--port", type=int, default=0, help="TCP port for the demo server (default: a free port)")
    demo.add_argument("--serve", action="store_true", help="keep serving the demo library after the demo, until Ctrl-C")
    demo.add_argument("--retrain", action="store_true", help="train the demo experts again even if cached")
    demo.add_argument("--json", action="store_true", help="print the generated texts as JSON on stdout, and the progress messages on stderr")
    _add_settings_flags(demo, library=False)
    demo.set_defaults(handler=_demo)

    from .evaluate import add_eval_parser
    from .experts_cli import add_experts_parser, add_generate_parser, add_sync_parser

    add_experts_parser(commands)
    add_sync_parser(commands)
    add_generate_parser(commands)
    add_eval_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve" and args.json:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(_JsonLogFormatter())
    if not args.verbose:
        # httpx logs every request at INFO, and the client each retry, which would bury the
        # commands' own output. The error line reports what finally failed.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("quiver.client").setLevel(logging.WARNING)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`quiver experts list | head -1`); point stdout at nothing so that
        # Python's final flush does not fail too.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as error:  # noqa: BLE001 - the CLI prints one line instead of a traceback.
        from quiver.client import QuiverClientError

        # Every error of the library subclasses a builtin such as ValueError or KeyError; checking
        # the module avoids importing the library (and torch) for commands that never load it.
        ours = type(error).__module__.startswith("quiver.")
        if ours or isinstance(error, (QuiverClientError, ValueError, OSError)):
            # Some messages list problems on separate lines; the CLI keeps its error to one line.
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            lines = [line[2:] if line.startswith(("- ", "• ")) else line for line in lines]
            print(f"quiver: error: {'; '.join(lines)}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
