"""``quiver experts``, ``quiver sync`` and ``quiver generate``: talk to a running server through the client.

Every subcommand prints a human-readable line or table, or JSON with ``--json``. They import the
client only (never torch), except ``quiver sync --library-dir``, which loads the base model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _add_client_options(parser: argparse.ArgumentParser, *, timeout: float) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("QUIVER_URL", "http://127.0.0.1:8000"),
        help="the server's address (default: $QUIVER_URL or http://127.0.0.1:8000)",
    )
    parser.add_argument("--timeout", type=float, default=timeout, help=f"seconds to wait for each response (default: {timeout:g})")
    parser.add_argument(
        "--token",
        default=None,
        help="the server's QUIVER_API_TOKEN, sent as a bearer token; needed for writes when the server sets one (default: $QUIVER_API_TOKEN)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def add_experts_parser(commands: argparse._SubParsersAction) -> None:
    experts = commands.add_parser(
        "experts",
        help="list, show, add, import, rm (remove) and export the experts of a running server",
        description="Manage the experts of a running Quiver server.",
    )
    actions = experts.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help: str, handler) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
        _add_client_options(parser, timeout=300.0)
        parser.set_defaults(handler=handler)
        return parser

    action("list", "list the experts", _list)
    show = action("show", "show one expert's metadata", _show)
    show.add_argument("name", help="the expert's name")

    add = action("add", "upload a PEFT LoRA adapter folder, or an MTTL checkpoint file with --mttl", _add)
    add.add_argument("path", type=Path, help="the adapter folder (adapter_config.json and its weights), or the checkpoint file with --mttl")
    add.add_argument("--name", required=True, help="the expert's name: 1-64 ASCII letters, digits, '_' or '-'")
    add.add_argument("--task", help="the task the expert was trained for")
    add.add_argument("--description", help="a free-text description")
    add.add_argument("--mttl", action="store_true", help="PATH is an MTTL expert checkpoint to convert")
    add.add_argument("--replace", action="store_true", help="swap an existing expert of that name for this one")

    hub_import = action("import", "import a PEFT LoRA adapter from a Hugging Face Hub repo (the server downloads it)", _import)
    hub_import.add_argument("repo_id", help="the Hub model repo, namespace/name")
    hub_import.add_argument("--name", required=True, help="the expert's name: 1-64 ASCII letters, digits, '_' or '-'")
    hub_import.add_argument("--subfolder", help="the adapter's folder inside the repo (default: the repo root)")
    hub_import.add_argument("--revision", help="a branch, tag or commit sha; a branch is followed by every sync (default: main)")
    hub_import.add_argument("--replace", action="store_true", help="swap an existing expert of that name for this one")

    remove = action("rm", "remove an expert", _remove)
    remove.add_argument("name", help="the expert's name")

    export = action("export", "save an expert as a PEFT adapter folder", _export)
    export.add_argument("name", help="the expert's name")
    export.add_argument("directory", type=Path, help="the folder to write (created if needed)")
    export.add_argument("--overwrite", action="store_true", help="replace an adapter already in the folder")


def _client(args: argparse.Namespace):
    from quiver.client import Client

    return Client(base_url=args.url, timeout=args.timeout, token=args.token)


def _upload_bar(args: argparse.Namespace, label: str):
    """Return a progress callback that draws a bar on stderr and the bar, or None twice with --json or no terminal."""
    if args.json or not sys.stderr.isatty():
        return None, None
    from tqdm import tqdm

    bar = tqdm(desc=label, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False)

    def update(sent: int, total: int) -> None:
        bar.total = total
        bar.update(sent - bar.n)

    return update, bar


def _print_expert(expert, as_json: bool) -> None:
    if as_json:
        print(json.dumps(expert.model_dump(), indent=2))
        return
    for key, value in expert.model_dump().items():
        if value is not None:
            print(f"{key:>18}: {', '.join(value) if isinstance(value, list) else value}")


def _list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        experts = client.list_experts()
    if args.json:
        print(json.dumps([expert.model_dump() for expert in experts], indent=2))
    elif not experts:
        print("no experts")
    else:
        width = max(len(expert.name) for expert in experts)
        for expert in experts:
            print(f"{expert.name:<{width}}  rank {expert.rank:<3} {expert.module_count:>4} modules  {expert.task or ''}".rstrip())
    return 0


def _show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_expert(client.get_expert(args.name), args.json)
    return 0


def _add(args: argparse.Namespace) -> int:
    with _client(args) as client:
        existed = args.replace and args.name in {expert.name for expert in client.list_experts()}
        if args.mttl:
            expert = client.import_mttl(args.path, args.name, args.task, args.description, replace=args.replace)
        else:
            progress, bar = _upload_bar(args, f"uploading {args.name}")
            try:
                expert = client.upload_expert(args.path, args.name, args.task, args.description, replace=args.replace, progress=progress)
            finally:
                if bar is not None:
                    bar.close()
    if args.json:
        _print_expert(expert, True)
    else:
        print(f"{'replaced' if existed else 'added'} expert {expert.name} ({expert.module_count} modules, rank {expert.rank})")
    return 0


def _import(args: argparse.Namespace) -> int:
    with _client(args) as client:
        expert = client.import_from_hub(args.repo_id, args.name, subfolder=args.subfolder, revision=args.revision, replace=args.replace)
    if args.json:
        _print_expert(expert, True)
    else:
        print(f"imported expert {expert.name} from {expert.source_repo}@{str(expert.source_revision)[:12]} ({expert.module_count} modules, rank {expert.rank})")
    return 0


def _remove(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete_expert(args.name)
    print(json.dumps({"removed": args.name}) if args.json else f"removed expert {args.name}")
    return 0


def _export(args: argparse.Namespace) -> int:
    with _client(args) as client:
        folder = client.export_expert(args.name, args.directory, overwrite=args.overwrite)
    print(json.dumps({"exported": args.name, "directory": str(folder)}) if args.json else f"exported expert {args.name} to {folder}")
    return 0


def add_sync_parser(commands: argparse._SubParsersAction) -> None:
    sync = commands.add_parser(
        "sync",
        help="sync a running server's library with its Hub repo, or show the sync status",
        description="Sync the library of a running Quiver server with its Hub repo (QUIVER_HUB_REPO).",
    )
    actions = sync.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help_text in (
        ("pull", "pull the Hub repo's changes into the server's library (and push queued changes)"),
        ("push", "push the server's queued changes to the Hub repo (after pulling what others pushed)"),
        ("status", "show the local revision, the remote commit, the last sync and queued pushes"),
    ):
        parser = actions.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        _add_client_options(parser, timeout=600.0)
        local = parser.add_argument_group(
            "local sync (instead of a server; shows a progress bar per file transferred)",
        )
        local.add_argument("--library-dir", type=Path, help="sync this library folder directly instead of asking a server")
        local.add_argument("--hub-repo", default=os.environ.get("QUIVER_HUB_REPO"), help="Hub repo of the library (default: $QUIVER_HUB_REPO)")
        local.add_argument("--hub-revision", default=os.environ.get("QUIVER_HUB_REVISION", "main"), help="branch (default: $QUIVER_HUB_REVISION or main)")
        local.add_argument("--base-model", default=os.environ.get("QUIVER_BASE_MODEL"), help="base model that experts are checked against (default: the embedded model)")
        parser.set_defaults(handler=_sync_status if name == "status" else _sync_run)


def _local_hub(args: argparse.Namespace):
    """Open ``--library-dir`` with the base model and connect it to ``--hub-repo``."""
    if not args.hub_repo:
        raise ValueError("--library-dir needs --hub-repo (or QUIVER_HUB_REPO): the Hub repo to sync with")
    from quiver.library import ExpertLibrary, load_base_model
    from quiver.library.hub import HubSync

    model, _ = load_base_model(args.base_model)
    library = ExpertLibrary(args.library_dir, model)
    return HubSync(library, args.hub_repo, revision=args.hub_revision)


def _sync_run(args: argparse.Namespace) -> int:
    if args.library_dir is not None:
        hub = _local_hub(args)
        hub.ensure_repo()
        report = hub.sync().to_json()
    else:
        with _client(args) as client:
            report = client.sync()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"{args.action}: {len(report['added'])} added, {len(report['updated'])} updated, {len(report['deleted'])} deleted, "
        f"{report['unchanged']} unchanged, {len(report['pushed'])} pushed, {report['bytes_transferred']} bytes, "
        f"remote {str(report['remote_sha'])[:12]}"
    )
    for name, error in report["failed"].items():
        print(f"  failed {name}: {error}")
    return 1 if report["failed"] else 0


def _sync_status(args: argparse.Namespace) -> int:
    if args.library_dir is not None:
        hub = _local_hub(args)
        status = {"revision": hub.library.revision, "experts": hub.library.names(), "hub": hub.status()}
    else:
        with _client(args) as client:
            status = client.library_status()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    hub = status["hub"]
    print(f"local revision {status['revision']}, {len(status['experts'])} experts")
    if hub is None:
        print("no Hub repo (set QUIVER_HUB_REPO on the server)")
        return 0
    print(f"hub {hub['repo_id']}@{hub['revision']}: remote {str(hub['remote_sha'])[:12]}, last sync {hub['last_sync']} ({hub['last_result']})")
    if hub["stale"]:
        print(f"stale since {hub['stale_since']}: {hub['last_error']}")
    for item in hub["queued"]:
        print(f"queued: {item}")
    return 0


def add_generate_parser(commands: argparse._SubParsersAction) -> None:
    generate = commands.add_parser(
        "generate",
        help="generate text on a running server, streaming tokens to the terminal",
        description="Generate a continuation of PROMPT on a running Quiver server. Tokens are printed as they "
        "arrive; the routing weights follow on stderr. With --json, one JSON object with the text and details.",
    )
    generate.add_argument("prompt", help="the prompt text; '-' reads it from stdin")
    _add_client_options(generate, timeout=600.0)
    generate.add_argument("--max-new-tokens", type=int, default=64, help="maximum number of tokens to generate (default: 64)")
    generate.add_argument("--temperature", type=float, help="sampling temperature, at least 0.01; setting it turns sampling on (default: greedy decoding)")
    generate.add_argument("--top-p", type=float, help="nucleus sampling mass, in (0, 1] (default: off)")
    generate.add_argument("--top-k", type=int, help="sample from the k most likely tokens (default: off)")
    generate.add_argument("--seed", type=int, help="sampling seed; the same seed gives the same text (default: random)")
    generate.add_argument("--stop", action="append", help="stop when the text contains this string; repeat for several")
    mode = generate.add_mutually_exclusive_group()
    mode.add_argument("--adapter", help="serve this one expert alone, without routing")
    mode.add_argument("--experts", help="route only across these experts, comma-separated; '' for the base model alone (default: all)")
    generate.add_argument("--routing-top-k", type=int, help="experts mixed per token and module (default: the server's)")
    generate.add_argument("--routing-method", help="arrow, centered, normalized, sequence or hybrid (default: the server's)")
    generate.set_defaults(handler=_generate)


def _generate_parameters(args: argparse.Namespace) -> dict:
    parameters: dict = {"max_new_tokens": args.max_new_tokens}
    for option in ("temperature", "top_p", "top_k", "seed", "stop"):
        if getattr(args, option) is not None:
            parameters[option] = getattr(args, option)
    if args.adapter:
        parameters["adapter_id"] = args.adapter
    routing: dict = {}
    if args.experts is not None:
        routing["experts"] = [name.strip() for name in args.experts.split(",") if name.strip()]
    if args.routing_top_k is not None:
        routing["top_k"] = args.routing_top_k
    if args.routing_method is not None:
        routing["method"] = args.routing_method
    if routing:
        parameters["routing"] = routing
    return parameters


def _generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    parameters = _generate_parameters(args)
    with _client(args) as client:
        if args.json:
            print(json.dumps(client.generate(prompt, **parameters).model_dump(), indent=2))
            return 0
        last = None
        for event in client.generate_stream(prompt, **parameters):
            if not event.token.special:
                sys.stdout.write(event.token.text)
                sys.stdout.flush()
            last = event
    print()
    if last is not None and last.details is not None:
        details = last.details
        ranked = sorted(details.routing.items(), key=lambda item: -item[1])
        weights = ", ".join(f"{name} {weight:.2f}" for name, weight in ranked if weight >= 0.005) or "none (base model)"
        tokens = f"{details.generated_tokens} token{'' if details.generated_tokens == 1 else 's'}"
        print(f"[{tokens}, {details.finish_reason}; experts: {weights}]", file=sys.stderr)
    return 0
