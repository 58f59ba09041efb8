"""Measure the throughput and latency of the Quiver server's continuous batching under concurrent clients.

Starts the real server application in this process (uvicorn on 127.0.0.1, a free port) with the
embedded SmolLM2-135M-Instruct and a fresh library in a temporary folder. It uploads random LoRA
experts through ``POST /experts``, then runs each number of concurrent clients twice: once with
the server's routing over every expert, and once with routing off (``"routing": {"experts": []}``,
the base model alone). Every client sends its requests to ``/generate_stream`` back to back,
greedy, with ``ignore_eos_token`` so that each request generates exactly ``--tokens`` tokens.

For each run it reports:

- tokens/s: the tokens of all successful requests over the wall time from the first request
  sent to the last response read;
- p50 and p95 request latency, from the request sent to its last server-sent event read;
- p50 and p95 time to first token (TTFT), from the request sent to its first ``data:`` event read;
- failed requests (any status other than 200, a stream that ends in an error event, or fewer
  tokens than ``--tokens``), with the 503 responses also counted on their own;
- the mean batch size of the server's decode steps, from its Prometheus metrics.

Then it checks the two targets: tokens/s at 16 clients over tokens/s at 1 client (at least 5×),
and routed tokens/s over base-model tokens/s at 16 clients (at least 0.7×), both with 64 tokens.

The tables are printed in Markdown and written into the serving section of docs/benchmarks.md. Run it from the repository root::

    .venv/bin/python bench/serving.py                       # 1, 4 and 16 clients, 64 tokens each
    .venv/bin/python bench/serving.py --quick               # smoke run: 16 tokens, 1 request per client
    .venv/bin/python bench/serving.py --json serving.json   # also save every request's numbers

The default run should take about 4 minutes on a 2-core CPU (an estimate from shorter runs of
its parts), and ``--quick`` under a minute. The converted embedded model is read from the cache
folder (``$QUIVER_CACHE_DIR`` or ``~/.cache/quiver``) and converted there on first use. The
experts and the library are written to a temporary folder and deleted at the end.

Client and server share this process, so the clients' parsing of the server-sent events
competes with the server for the CPU and the GIL. The server picks its device as ``quiver
serve`` does ('auto': CUDA when available), but only the CPU has been run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import peft
import torch
import transformers
import uvicorn
from peft import LoraConfig, get_peft_model
from report_file import available_cores, cpu_model, exact_command, write_section

from quiver.client import Client
from quiver.library import load_base_model
from quiver.library.base_model import default_cache_dir
from quiver.library.routing import ROUTING_METHODS
from quiver.server.app import create_app
from quiver.server.settings import Settings

REPOSITORY = Path(__file__).resolve().parent.parent

RANK = 8
ALPHA = 16
TARGET_MODULES = ("q_proj", "v_proj", "down_proj")
SEED = 0

PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator keeps food cold, step by step.",
    "List some tips for learning to play the guitar as an adult.",
    "Describe the water cycle to a ten-year-old.",
    "What are the main differences between a city and a village?",
    "Write a polite email asking a colleague to review a report.",
    "Summarize the rules of chess for a complete beginner.",
    "Give three reasons why people enjoy walking in the mountains.",
)
"""Prompts of 11 to 16 tokens for the embedded model's tokenizer. Client c sends PROMPTS[(c + r) % 8] as its request r."""

TARGET_SCALING = 5.0
"""Smallest accepted tokens/s at 16 clients over tokens/s at 1 client, with routing."""
TARGET_ROUTED_OVER_BASE = 0.7
"""Smallest accepted routed tokens/s over base-model tokens/s at 16 clients."""

FAILURES_SHOWN = 5
"""Failed requests printed per run. The JSON file keeps them all."""

SERVER_START_TIMEOUT_S = 600.0
CLIENT_TIMEOUT_S = 900.0
"""Longer than the server's request timeout (300 s by default), so the server's own timeout error arrives first."""

logger = logging.getLogger("bench.serving")


# --------------------------------------------------------------------------------------------
# Machine and run description


def quiver_revision() -> str:
    """Return the checked-out commit, and whether the server or library code differs from it."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPOSITORY), "log", "-1", "--format=%h %s"], capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(REPOSITORY), "status", "--porcelain", "--", "server", "library"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (git is not available)"
    return head + (" (server/ or library/ has uncommitted changes)" if changed else "")


@dataclass
class Machine:
    cpu: str
    cores: int
    torch_threads: int
    date: str
    command: str
    revision: str
    versions: dict[str, str]
    device: str = ""
    """The served model's device type and dtype, from the server's ``/info``."""


def describe_machine() -> Machine:
    return Machine(
        cpu=cpu_model(),
        cores=available_cores(),
        torch_threads=torch.get_num_threads(),
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command=exact_command(),
        revision=quiver_revision(),
        versions={
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "httpx": httpx.__version__,
            "uvicorn": uvicorn.__version__,
        },
    )


# --------------------------------------------------------------------------------------------
# Experts and server


def build_adapters(count: int, root: Path, cache_dir: Path) -> list[Path]:
    """Save ``count`` PEFT LoRA adapters with random, nonzero A and B factors under ``root`` and return their folders.

    PEFT's ``init_lora_weights=False`` keeps the default initialisation of both factors (B is
    zero otherwise), so every expert changes the model's output. The generated text is then
    meaningless, but the work per token is the same as with trained experts of this shape.
    """
    model, _ = load_base_model(device="cpu", dtype="float32", cache_dir=cache_dir)
    folders = []
    for index in range(count):
        torch.manual_seed(SEED + index)
        config = LoraConfig(
            r=RANK, lora_alpha=ALPHA, target_modules=list(TARGET_MODULES), init_lora_weights=False, task_type="CAUSAL_LM"
        )
        peft_model = get_peft_model(model, config)
        folder = root / f"expert-{index:02d}"
        # With the default "auto", PEFT looks the model name up on the Hugging Face Hub.
        peft_model.save_pretrained(str(folder), save_embedding_layers=False)
        folders.append(folder)
        model = peft_model.unload()  # the base model again, without the LoRA layers
    return folders


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_server(settings: Settings) -> Iterator[tuple[str, object]]:
    """Serve the Quiver app on 127.0.0.1 in a background thread and yield its base URL and the app."""
    app = create_app(settings)
    port = free_port()
    # log_config=None keeps uvicorn's loggers propagating to the root logger, where
    # ServerLog counts their warnings and errors along with the server's.
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="bench-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the Quiver server failed to start; see the log above")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the Quiver server did not start within {SERVER_START_TIMEOUT_S:.0f} s")
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        if thread.is_alive():
            logger.warning("the server thread did not stop within 60 s")


class ServerLog(logging.Handler):
    """Logging handler that stores every warning and error logged in this process while the benchmark runs."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.records: list[dict[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            message += f" ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
        self.records.append({"level": record.levelname, "logger": record.name, "message": message})


# --------------------------------------------------------------------------------------------
# Clients


@dataclass
class RequestRecord:
    client: int
    index: int
    status: int | None
    """HTTP status, or None when no response arrived."""
    latency_s: float
    ttft_s: float | None
    """Time until the first ``data:`` event, or None when none arrived."""
    tokens: int
    """Generated tokens, from the last event's ``details.generated_tokens``."""
    experts_used: int
    """Experts with a nonzero mean routing weight, from the last event's ``details.routing``."""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def parse_sse_line(line: str) -> dict | None:
    """Return the JSON payload of a ``data:`` line of a server-sent event stream, or None for other lines."""
    if not line.startswith("data:"):
        return None
    return json.loads(line[len("data:") :].strip())


def error_detail(content: bytes) -> str:
    """Return the ``detail`` of a Quiver error body, or the start of any other body."""
    try:
        return str(json.loads(content)["detail"])
    except (ValueError, KeyError, TypeError):
        return content.decode(errors="replace")[:300]


async def stream_request(http: httpx.AsyncClient, body: dict, client: int, index: int, tokens: int) -> RequestRecord:
    """Send one ``/generate_stream`` request and time its first and last server-sent events."""
    started = time.perf_counter()
    ttft = None
    final = None
    error = None
    status = None
    try:
        async with http.stream("POST", "/generate_stream", json=body) as response:
            status = response.status_code
            if status != 200:
                error = f"HTTP {status}: {error_detail(await response.aread())}"
            else:
                async for line in response.aiter_lines():
                    payload = parse_sse_line(line)
                    if payload is None:
                        continue
                    if ttft is None:
                        ttft = time.perf_counter() - started
                    if "error" in payload:
                        error = f"stream error event: {payload.get('error')}"
                        break
                    if payload.get("details") is not None:
                        final = payload
    except httpx.HTTPError as exception:
        error = f"{type(exception).__name__}: {exception}"
    latency = time.perf_counter() - started

    generated, experts_used = 0, 0
    if final is not None:
        generated = int(final["details"]["generated_tokens"])
        experts_used = sum(1 for weight in (final["details"].get("routing") or {}).values() if weight > 0)
    if error is None and final is None:
        error = "the stream ended without the final event that carries the details"
    elif error is None and generated != tokens:
        reason = final["details"].get("finish_reason")
        error = f"generated {generated} tokens, expected {tokens} (finish_reason {reason}) although ignore_eos_token was sent"
    return RequestRecord(client, index, status, latency, ttft, generated, experts_used, error)


def request_body(prompt: str, tokens: int, routing: dict) -> dict:
    parameters = {"max_new_tokens": tokens, "do_sample": False, "ignore_eos_token": True, "routing": routing}
    return {"inputs": prompt, "parameters": parameters}


async def run_clients(base_url: str, clients: int, requests_per_client: int, tokens: int, routing: dict) -> tuple[float, list[RequestRecord]]:
    """Run ``clients`` concurrent clients that each send ``requests_per_client`` requests back to back.

    Returns the wall time from the first request sent to the last response read, and every request's record.
    """
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, timeout=CLIENT_TIMEOUT_S, limits=limits) as http:

        async def one_client(client: int) -> list[RequestRecord]:
            records = []
            for index in range(requests_per_client):
                prompt = PROMPTS[(client + index) % len(PROMPTS)]
                records.append(await stream_request(http, request_body(prompt, tokens, routing), client, index, tokens))
            return records

        started = time.perf_counter()
        results = await asyncio.gather(*(one_client(client) for client in range(clients)))
        wall = time.perf_counter() - started
    return wall, [record for records in results for record in records]


# --------------------------------------------------------------------------------------------
# Measurement


def percentile(values: list[float], q: float) -> float | None:
    """Return the q-th percentile (0-100) of ``values`` by linear interpolation between ranks, or None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class ServerCounters:
    """Sums and counts of the server's Prometheus histograms, read before and after a run."""

    batch_sum: float
    batch_count: float
    ttft_sum: float
    ttft_count: float

    @classmethod
    def read(cls, app) -> ServerCounters:
        registry = app.state.engine.metrics.registry

        def sample(name: str) -> float:
            return registry.get_sample_value(name) or 0.0

        return cls(
            sample("quiver_batch_size_sum"),
            sample("quiver_batch_size_count"),
            sample("quiver_time_to_first_token_seconds_sum"),
            sample("quiver_time_to_first_token_seconds_count"),
        )


@dataclass
class Run:
    """Measurements of one number of clients in one routing mode."""

    mode: str
    """'routed' or 'base'."""
    clients: int
    requests_per_client: int
    tokens: int
    wall_s: float
    records: list[RequestRecord]
    mean_batch_size: float | None
    """Mean number of requests in the batch over the server's decode steps of this run."""
    server_ttft_mean_s: float | None
    """Mean time from a request's arrival to its first token, as the server measures it."""
    failed: int = field(init=False)
    status_503: int = field(init=False)
    generated_tokens: int = field(init=False)
    tokens_per_s: float = field(init=False)
    latency_p50_s: float | None = field(init=False)
    latency_p95_s: float | None = field(init=False)
    ttft_p50_s: float | None = field(init=False)
    ttft_p95_s: float | None = field(init=False)

    def __post_init__(self) -> None:
        succeeded = [record for record in self.records if record.ok]
        self.failed = len(self.records) - len(succeeded)
        self.status_503 = sum(1 for record in self.records if record.status == 503)
        self.generated_tokens = sum(record.tokens for record in succeeded)
        self.tokens_per_s = self.generated_tokens / self.wall_s
        latencies = [record.latency_s for record in succeeded]
        ttfts = [record.ttft_s for record in succeeded if record.ttft_s is not None]
        self.latency_p50_s, self.latency_p95_s = percentile(latencies, 50), percentile(latencies, 95)
        self.ttft_p50_s, self.ttft_p95_s = percentile(ttfts, 50), percentile(ttfts, 95)


ROUTING_OFF = {"experts": []}
"""Routing parameters with no expert in scope, so the server runs the base model alone."""


def routed_parameters(method: str | None) -> dict:
    return {"method": method} if method else {}


def measure(app, base_url: str, mode: str, clients: int, requests_per_client: int, tokens: int, routing: dict) -> Run:
    """Run the clients once, reading the server's batch size and TTFT histograms before and after."""
    before = ServerCounters.read(app)
    wall, records = asyncio.run(run_clients(base_url, clients, requests_per_client, tokens, routing))
    after = ServerCounters.read(app)
    steps = after.batch_count - before.batch_count
    firsts = after.ttft_count - before.ttft_count
    return Run(
        mode=mode,
        clients=clients,
        requests_per_client=requests_per_client,
        tokens=tokens,
        wall_s=wall,
        records=records,
        mean_batch_size=(after.batch_sum - before.batch_sum) / steps if steps else None,
        server_ttft_mean_s=(after.ttft_sum - before.ttft_sum) / firsts if firsts else None,
    )


def warm_up(base_url: str, tokens: int, routing: dict) -> RequestRecord:
    """Send one uncounted request, which also makes the server load the uploaded experts."""
    _, records = asyncio.run(run_clients(base_url, 1, 1, tokens, routing))
    return records[0]


# --------------------------------------------------------------------------------------------
# Report


@dataclass
class Check:
    name: str
    target: str
    value: float | None
    passed: bool | None
    """None when the run cannot check the target (other client counts, or a smoke run)."""

    @property
    def verdict(self) -> str:
        if self.passed is None:
            return "not checked"
        return "pass" if self.passed else "FAIL"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def find_run(runs: list[Run], mode: str, clients: int) -> Run | None:
    return next((run for run in runs if run.mode == mode and run.clients == clients), None)


def ratio(numerator: Run | None, denominator: Run | None) -> float | None:
    if numerator is None or denominator is None or denominator.tokens_per_s == 0:
        return None
    return numerator.tokens_per_s / denominator.tokens_per_s


def check_targets(runs: list[Run], client_counts: list[int], quick: bool) -> list[Check]:
    """Compare the measured ratios with the targets, which hold for 1 and 16 clients of a full run."""
    smallest, largest = client_counts[0], client_counts[-1]
    checkable = not quick and smallest == 1 and largest == 16
    scaling, base_scaling = None, None
    if smallest < largest:
        scaling = ratio(find_run(runs, "routed", largest), find_run(runs, "routed", smallest))
        base_scaling = ratio(find_run(runs, "base", largest), find_run(runs, "base", smallest))
    routed_over_base = ratio(find_run(runs, "routed", largest), find_run(runs, "base", largest))

    def passed(value: float | None, target: float) -> bool | None:
        return None if value is None or not checkable else value >= target

    return [
        Check(f"routed tokens/s, {plural(largest, 'client')} / {plural(smallest, 'client')}", f"≥ {TARGET_SCALING:g}×", scaling, passed(scaling, TARGET_SCALING)),
        Check(
            f"routed tokens/s / base tokens/s, {plural(largest, 'client')}",
            f"≥ {TARGET_ROUTED_OVER_BASE:g}×",
            routed_over_base,
            passed(routed_over_base, TARGET_ROUTED_OVER_BASE),
        ),
        Check(f"base tokens/s, {plural(largest, 'client')} / {plural(smallest, 'client')}", "none (for comparison)", base_scaling, None),
    ]


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown_table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    """Return a Markdown table with ``align`` giving one letter per column, l or r."""
    separator = ["---:" if letter == "r" else "---" for letter in align]
    return ["| " + " | ".join(line) + " |" for line in [header, separator, *rows]]


def result_rows(runs: list[Run], routed_label: str) -> tuple[list[str], list[list[str]]]:
    header = [
        "clients",
        "routing",
        "requests",
        "failed",
        "503",
        "tokens/s",
        "latency p50 s",
        "latency p95 s",
        "TTFT p50 s",
        "TTFT p95 s",
        "mean batch",
    ]
    rows = []
    for run in sorted(runs, key=lambda item: (item.clients, item.mode != "routed")):
        rows.append(
            [
                str(run.clients),
                routed_label if run.mode == "routed" else "off (base model)",
                f"{run.clients} × {run.requests_per_client}",
                str(run.failed),
                str(run.status_503),
                f"{run.tokens_per_s:.1f}",
                seconds(run.latency_p50_s),
                seconds(run.latency_p95_s),
                seconds(run.ttft_p50_s),
                seconds(run.ttft_p95_s),
                "-" if run.mean_batch_size is None else f"{run.mean_batch_size:.1f}",
            ]
        )
    return header, rows


def check_rows(checks: list[Check]) -> tuple[list[str], list[list[str]]]:
    rows = [[check.name, check.target, "-" if check.value is None else f"{check.value:.2f}×", check.verdict] for check in checks]
    return ["ratio", "target", "measured", "verdict"], rows


@dataclass
class Report:
    machine: Machine
    arguments: dict
    settings: dict
    routing: dict
    """The server's default routing (method, pooling, top_k, temperature) and the method sent, if any."""
    startup_s: dict[str, float]
    runs: list[Run]
    checks: list[Check]
    server_log: list[dict[str, str]]
    runtime_s: float = 0.0


def report_lines(report: Report) -> list[str]:
    """Return the Markdown report: the run's description, the results table and the target checks."""
    machine, arguments = report.machine, report.arguments
    routed_label = f"{plural(arguments['experts'], 'expert')}, {arguments['method'] or 'server default'}"
    versions = ", ".join(f"{name} {value}" for name, value in machine.versions.items())
    smoke = " Smoke run (--quick): the figures are not comparable with the targets." if arguments["quick"] else ""
    lines = [
        "## Serving: continuous batching",
        "",
        f"- Command: `{machine.command}`.{smoke}",
        f"- Date: {machine.date}; total run time {report.runtime_s:.0f} s",
        f"- Machine: {machine.cpu}, {machine.cores} cores, torch using {machine.torch_threads} threads; model on {machine.device}",
        f"- Versions: {versions}",
        f"- Quiver: {machine.revision}",
        f"- Server: in this process under uvicorn, max_batch_size {report.settings['max_batch_size']}, "
        f"max_queue {report.settings['max_queue']}; default routing {report.routing['server_default']}",
        f"- Model and experts: the embedded SmolLM2-135M-Instruct with {plural(arguments['experts'], 'random expert')}: rank-{RANK} LoRA "
        f"(lora_alpha {ALPHA}, PEFT's init_lora_weights=False) on {', '.join(TARGET_MODULES)}, uploaded through POST /experts",
        f"- Requests: /generate_stream, greedy, max_new_tokens {arguments['tokens']} with ignore_eos_token, prompts of 11 to 16 "
        "tokens; each client sends its requests back to back after one uncounted warm-up request per routing mode",
        "",
        *markdown_table(*result_rows(report.runs, routed_label), align="rlrrrrrrrrr"),
        "",
        "tokens/s: the generated tokens of all successful requests over the wall time of the run. Latency: request sent "
        "to last event read. TTFT: request sent to the first `data:` event read, queueing and the prefill pass "
        "included. Failed: any status other than 200, an error event, or fewer "
        "tokens than requested. Mean batch: the running requests per decode step, from the server's metrics.",
        "",
        *markdown_table(*check_rows(report.checks), align="llrl"),
        "",
    ]
    return lines


def print_server_log(records: list[dict[str, str]]) -> None:
    if not records:
        print("Server log: no warnings or errors.")
        return
    counts: dict[tuple[str, str], int] = {}
    for record in records:
        key = (record["level"], record["logger"])
        counts[key] = counts.get(key, 0) + 1
    sources = ", ".join(f"{count} {level} from {name}" for (level, name), count in counts.items())
    print(f"Server log: {len(records)} warnings or errors ({sources}).")
    for record in records[:10]:
        print(f"  {record['level']} {record['logger']}: {record['message'][:300]}")


def write_json(report: Report, path: Path) -> None:
    data = {
        "machine": asdict(report.machine),
        "arguments": report.arguments,
        "settings": report.settings,
        "routing": report.routing,
        "startup_s": report.startup_s,
        "runtime_s": report.runtime_s,
        "runs": [asdict(run) for run in report.runs],
        "checks": [{**asdict(check), "verdict": check.verdict} for check in report.checks],
        "server_log": report.server_log,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------------------------


def default_requests_per_client(clients: int, quick: bool) -> int:
    """Return the number of requests each client sends, more for few clients so that every run has several requests."""
    if quick:
        return 1
    return 3 if clients < 4 else 2


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="numbers of concurrent clients to run (default: 1 4 16)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens generated per request (default: 64, or 16 with --quick)")
    parser.add_argument("--experts", type=int, default=8, help="random LoRA experts in the library (default: 8)")
    parser.add_argument(
        "--requests-per-client",
        type=int,
        default=None,
        help="requests each client sends back to back, for every number of clients "
        "(default: 3 below 4 clients, 2 from 4 clients on, 1 with --quick)",
    )
    parser.add_argument(
        "--method",
        choices=ROUTING_METHODS,
        default=None,
        help="routing method sent with the routed requests (default: none, so the server's default applies)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="the server's max_batch_size, in requests (default: 16)")
    parser.add_argument("--queue", type=int, default=64, help="the server's max_queue, in requests (default: 64)")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="folder of the converted embedded model (default: $QUIVER_CACHE_DIR or ~/.cache/quiver)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 16 tokens and 1 request per client unless --tokens or --requests-per-client is given")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the settings and every request's numbers to this JSON file")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        metavar="PATH",
        help="Markdown page whose serving section is rewritten (default: docs/benchmarks.md, except with --quick, which writes none)",
    )
    arguments = parser.parse_args()

    arguments.clients = sorted(set(arguments.clients))
    if arguments.clients[0] < 1:
        parser.error(f"--clients must be at least 1, got {arguments.clients[0]}")
    if arguments.tokens is None:
        arguments.tokens = 16 if arguments.quick else 64
    if arguments.tokens < 1:
        parser.error(f"--tokens must be at least 1, got {arguments.tokens}")
    if arguments.experts < 1:
        parser.error(f"--experts must be at least 1, got {arguments.experts}; routing off is measured in every run anyway")
    if arguments.requests_per_client is not None and arguments.requests_per_client < 1:
        parser.error(f"--requests-per-client must be at least 1, got {arguments.requests_per_client}")
    if arguments.batch_size < 1 or arguments.queue < 0:
        parser.error(f"--batch-size must be at least 1 and --queue at least 0, got {arguments.batch_size} and {arguments.queue}")
    arguments.cache_dir = (arguments.cache_dir or default_cache_dir()).expanduser()
    return arguments


@dataclass
class Session:
    """Measurements of one server session, with the server facts that the report states."""

    runs: list[Run] = field(default_factory=list)
    startup_s: dict[str, float] = field(default_factory=dict)
    device: str = ""
    server_routing: str = ""


def run_session(arguments: argparse.Namespace, settings: Settings, adapters: list[Path], progress) -> Session:
    """Start the server, upload the experts, warm up, then measure every number of clients with and without routing."""
    session = Session()
    routed = routed_parameters(arguments.method)
    modes = (("routed", routed), ("base", ROUTING_OFF))
    progress("starting the server")
    step = time.perf_counter()
    with running_server(settings) as (base_url, app):
        session.startup_s["server_start"] = time.perf_counter() - step
        step = time.perf_counter()
        with Client(base_url=base_url) as client:
            for adapter in adapters:
                client.upload_expert(adapter, adapter.name)
        session.startup_s["upload_experts"] = time.perf_counter() - step

        for mode, routing in modes:
            record = warm_up(base_url, arguments.tokens, routing)
            if not record.ok:
                raise RuntimeError(f"the {mode} warm-up request failed: {record.error}")
            progress(f"warm-up with routing {mode}: {record.latency_s:.1f} s, {plural(record.experts_used, 'expert')} used")
        info = httpx.get(f"{base_url}/info", timeout=30).json()
        if len(info["experts"]) != len(adapters):
            raise RuntimeError(
                f"the server routes over {len(info['experts'])} experts after the warm-up, expected {len(adapters)}. "
                "Check the server log above for experts that failed to load"
            )
        session.device = f"{info['model_device_type']} in {info['model_dtype']}"
        session.server_routing = ", ".join(f"{key} {value}" for key, value in info["routing"].items())

        for clients in arguments.clients:
            requests_per_client = arguments.requests_per_client or default_requests_per_client(clients, arguments.quick)
            # Routed and base runs alternate per client count, so that slow drifts in the
            # machine's speed affect both sides of the routed/base ratio alike.
            for mode, routing in modes:
                progress(f"{plural(clients, 'client')} × {plural(requests_per_client, 'request')}, routing {mode}")
                run = measure(app, base_url, mode, clients, requests_per_client, arguments.tokens, routing)
                session.runs.append(run)
                print_run(run, progress)
    return session


def print_run(run: Run, progress) -> None:
    batch = "-" if run.mean_batch_size is None else f"{run.mean_batch_size:.1f}"
    progress(
        f"  {run.tokens_per_s:.1f} tokens/s, latency p50 {seconds(run.latency_p50_s)} s, "
        f"TTFT p50 {seconds(run.ttft_p50_s)} s, {run.failed} failed, mean batch {batch}"
    )
    failures = [record for record in run.records if not record.ok]
    for record in failures[:FAILURES_SHOWN]:
        progress(f"  client {record.client} request {record.index} failed: {record.error}")
    if len(failures) > FAILURES_SHOWN:
        progress(f"  and {len(failures) - FAILURES_SHOWN} more failed requests; --json saves every error")
    if run.mode == "routed":
        unrouted = sum(1 for record in run.records if record.ok and record.experts_used == 0)
        if unrouted:
            logger.warning("%d routed requests report no expert with a nonzero weight in details.routing", unrouted)


def main() -> int:
    arguments = parse_arguments()
    started = time.perf_counter()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server_log = ServerLog()
    logging.getLogger().addHandler(server_log)
    transformers.utils.logging.disable_progress_bar()
    # transformers and PEFT warn about their own deprecated internals on every model load.
    warnings.filterwarnings("ignore", category=FutureWarning)
    machine = describe_machine()
    print(f"{machine.cpu}, {machine.cores} cores, {machine.torch_threads} torch threads", flush=True)

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    with tempfile.TemporaryDirectory(prefix="quiver-bench-serving-") as folder:
        root = Path(folder)
        progress(f"building {arguments.experts} random rank-{RANK} experts")
        step = time.perf_counter()
        adapters = build_adapters(arguments.experts, root / "adapters", arguments.cache_dir)
        build_seconds = time.perf_counter() - step
        settings = Settings(
            cache_dir=arguments.cache_dir,
            library_dir=root / "library",
            max_batch_size=arguments.batch_size,
            max_queue=arguments.queue,
            max_new_tokens=max(arguments.tokens, Settings.max_new_tokens),
        )
        settings.check()
        try:
            session = run_session(arguments, settings, adapters, progress)
        except RuntimeError as error:
            print_server_log(server_log.records)
            print(f"serving.py: error: {error}", file=sys.stderr)
            return 1

    machine.device = session.device
    report = Report(
        machine=machine,
        arguments={key: str(value) if isinstance(value, Path) else value for key, value in vars(arguments).items()},
        settings={"max_batch_size": settings.max_batch_size, "max_queue": settings.max_queue, "request_timeout": settings.request_timeout},
        routing={"sent": routed_parameters(arguments.method), "server_default": session.server_routing},
        startup_s={"build_experts": build_seconds, **session.startup_s},
        runs=session.runs,
        checks=check_targets(session.runs, arguments.clients, arguments.quick),
        server_log=server_log.records,
    )
    report.runtime_s = time.perf_counter() - started
    print()
    print("\n".join(report_lines(report)))
    print_server_log(report.server_log)
    if arguments.json is not None:
        write_json(report, arguments.json)
        print(f"wrote {arguments.json}")
    output = arguments.output or (None if arguments.quick else REPOSITORY / "docs" / "benchmarks.md")
    if output is not None:
        write_section(output, "serving", report_lines(report))
        print(f"wrote the serving section of {output}")
    return 1 if any(run.failed for run in session.runs) else 0


if __name__ == "__main__":
    sys.exit(main())
