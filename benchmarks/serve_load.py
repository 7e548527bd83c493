"""Load and fault test of the served MuMIC pyfunc (`mlflow models serve`): valid traffic mixed with bad requests.

The script builds a champion of its own (a tiny demo world, a zero-shot export of `mumic-tiny` with no training,
logged and registered in a throwaway SQLite MLflow store and promoted to `champion`), or serves an existing one
(`--model-uri models:/mumic@champion` with MLFLOW_TRACKING_URI set). It starts `mlflow models serve --env-manager
local` on a free port, then a few threads post to /invocations for a bounded time. About half the requests are
valid (base64 PNG/JPEG cells, `dataframe_split` or `dataframe_records`); the rest are faults a public endpoint
will see: random bytes, a truncated PNG, a PNG header declaring 12000x12000 pixels, bad base64, a number instead of
an image, a server path that does not exist, an 8 MB body, malformed JSON, a frame without the `image` column, and a
batch mixing a good and a bad image.

How a fault must be answered: the pyfunc reports an unreadable image in that row's `error` (HTTP 200, the other
rows of the batch still scored); a request MLflow itself cannot parse (malformed JSON, missing column) must get a
4xx with a message. Either way the server has to stay up. Every fault kind is sent at least once, then kinds are
drawn at random with fixed weights.

Reported: valid requests/s and images/s, p50/p99 latency of valid requests, status codes and handling per kind,
whether a response leaked a server stack trace, and whether /ping still answers at the end. The exit status is
non-zero when a valid request failed, a fault was not answered as above, or the server died.

    python benchmarks/serve_load.py --quick                  # ~5 s of load after setup
    python benchmarks/serve_load.py --workers 4 --duration 20
    MLFLOW_TRACKING_URI=sqlite:///mlflow.db python benchmarks/serve_load.py --model-uri models:/mumic@champion
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

VALID = "valid"
FAULT_KINDS = (
    "mixed_batch",
    "random_bytes",
    "truncated_png",
    "declared_12000px",
    "invalid_base64",
    "unsupported_cell",
    "missing_path",
    "oversized_body",
    "malformed_json",
    "missing_image_column",
)
# How the server should answer each fault: a per-row `error` in a 200, or a 4xx with a message.
HTTP_4XX_KINDS = ("malformed_json", "missing_image_column")
EXPECTED = {kind: "http_4xx" if kind in HTTP_4XX_KINDS else "row_error" for kind in FAULT_KINDS}
WEIGHTS = {VALID: 10} | dict.fromkeys(FAULT_KINDS, 1)
OVERSIZED_BYTES = 8 * 1024 * 1024
REQUEST_TIMEOUT_S = 60.0


# --- setup --------------------------------------------------------------------------------------------------------


def build_champion(workdir: Path, n_images: int) -> tuple[str, str, list[Path]]:
    """A servable champion in a private store: (model URI, tracking URI, demo image paths).

    A zero-shot export needs no training, so the setup costs seconds; serving does not care how good it is.
    """
    from mumic_ml.config import Params
    from mumic_ml.demo_world import generate_demo_world
    from mumic_ml.pipeline.registry import CHAMPION, MODEL_NAME, log_model, promote, register_model
    from mumic_ml.pipeline.tracking import start_run
    from mumic_ml.pretrain import export_zero_shot

    world = generate_demo_world(workdir / "world", n_images=n_images, image_size=64, seed=0)
    model_dir = export_zero_shot(
        Params(), taxonomy_path=world.taxonomy_path, backbone_weights=None, model_dir=workdir / "model"
    )
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    with start_run(
        experiment="mumic-serve-load",
        tracking_uri=tracking_uri,
        artifact_location=workdir / "mlartifacts",
        data_version="demo-world",
        run_name="serve-load",
        repo_dir=workdir,
    ) as run_id:
        pass
    logged_uri = log_model(run_id, model_dir, tracking_uri=tracking_uri)
    registered = register_model(
        run_id, logged_uri, tags={"purpose": "serve_load benchmark"}, gate_passed=True, tracking_uri=tracking_uri
    )
    # A reused --workdir may hold a champion: this benchmark serves whatever it just registered.
    promote(MODEL_NAME, version=registered.version, reason="serve_load benchmark", tracking_uri=tracking_uri)
    return f"models:/{MODEL_NAME}@{CHAMPION}", tracking_uri, sorted(world.images_dir.glob("*.png"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`mlflow models serve` in its own process group, so stopping it also stops the uvicorn it spawns."""

    def __init__(self, model_uri: str, tracking_uri: str | None, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # uvicorn, bash -c
        if tracking_uri:
            env["MLFLOW_TRACKING_URI"] = tracking_uri
        command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
        command += ["-h", "127.0.0.1", "-p", str(self.port), "-w", "1"]
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            command, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def ping(self, timeout: float = 5.0) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=timeout) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def alive(self) -> bool:
        return self.proc.poll() is None and self.ping()

    def wait_ready(self, timeout: float) -> float:
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before answering /ping\n{self.tail()}")
            if self.ping(timeout=2.0):
                return time.perf_counter() - start
            time.sleep(0.5)
        raise RuntimeError(f"server did not answer /ping within {timeout:.0f} s\n{self.tail()}")

    def tail(self, n_bytes: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_bytes()[-n_bytes:].decode("utf-8", errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
            except ProcessLookupError:
                pass
        self._log.close()


# --- payloads -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    kind: str
    body: bytes
    n_images: int  # valid images in the request
    bad_rows: tuple[int, ...]  # rows that must come back with an error


def _b64(data: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(data).decode("ascii")}


def _split(cells: list[Any], params: dict[str, Any] | None = None) -> bytes:
    body: dict[str, Any] = {"dataframe_split": {"columns": ["image"], "data": [[cell] for cell in cells]}}
    if params:
        body["params"] = params
    return json.dumps(body).encode()


def _records(cells: list[Any], params: dict[str, Any] | None = None) -> bytes:
    body: dict[str, Any] = {"dataframe_records": [{"image": cell} for cell in cells]}
    if params:
        body["params"] = params
    return json.dumps(body).encode()


def _declared_png(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims `width` x `height`: a few dozen bytes that would decode to gigabytes."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR data follows the signature, length and type
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _jpeg(png: bytes, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").resize(size).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_payloads(images: list[Path], seed: int) -> dict[str, list[Payload]]:
    """A small pool of request bodies per kind, built once so the clients measure the server, not the encoding."""
    rng = np.random.default_rng(seed)
    pngs = [p.read_bytes() for p in images[:8]]
    valid_cells = [_b64(png) for png in pngs] + [_b64(_jpeg(pngs[0], (640, 480)))]
    params = {"top_k": 3}
    pools: dict[str, list[Payload]] = {VALID: []}
    for i in range(8):
        cells = [valid_cells[(i + j) % len(valid_cells)] for j in range(1 + i % 3)]
        encode = _split if i % 2 == 0 else _records
        pools[VALID].append(Payload(VALID, encode(cells, params), len(cells), ()))
    random_bytes = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    pools["mixed_batch"] = [Payload("mixed_batch", _split([valid_cells[0], _b64(random_bytes)], params), 1, (1,))]
    pools["random_bytes"] = [Payload("random_bytes", _split([_b64(random_bytes)]), 0, (0,))]
    pools["truncated_png"] = [Payload("truncated_png", _split([_b64(pngs[1][: len(pngs[1]) // 2])]), 0, (0,))]
    pools["declared_12000px"] = [Payload("declared_12000px", _split([_b64(_declared_png(12000, 12000))]), 0, (0,))]
    pools["invalid_base64"] = [Payload("invalid_base64", _split([{"b64": "not*base64!"}]), 0, (0,))]
    big = rng.integers(0, 256, OVERSIZED_BYTES, dtype=np.uint8).tobytes()
    pools["oversized_body"] = [Payload("oversized_body", _split([_b64(big)]), 0, (0,))]
    pools["unsupported_cell"] = [Payload("unsupported_cell", _split([42]), 0, (0,))]
    pools["missing_path"] = [Payload("missing_path", _split(["/nonexistent/mumic-serve-load.png"]), 0, (0,))]
    truncated_json = b'{"dataframe_split": {"columns": ["image"], "data": [['
    pools["malformed_json"] = [Payload("malformed_json", truncated_json, 0, ())]
    missing = json.dumps({"dataframe_split": {"columns": ["picture"], "data": [[valid_cells[0]]]}}).encode()
    pools["missing_image_column"] = [Payload("missing_image_column", missing, 0, ())]
    return pools


def schedule(seed: int) -> Callable[[], str]:
    """Every fault kind once (shuffled), then kinds drawn by WEIGHTS; thread-safe."""
    rng = random.Random(seed)
    first = list(FAULT_KINDS) + [VALID] * 2
    rng.shuffle(first)
    kinds, weights = list(WEIGHTS), list(WEIGHTS.values())
    lock = threading.Lock()

    def next_kind() -> str:
        with lock:
            return first.pop() if first else rng.choices(kinds, weights)[0]

    return next_kind


# --- sending and judging ------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str
    status: int  # 0: no HTTP answer (connection refused or reset, timeout)
    latency_s: float
    started_s: float
    n_images: int
    handling: str  # ok, row_error, http_4xx, or what went wrong
    message: str
    stack_trace: bool


def post(url: str, body: bytes, timeout: float = REQUEST_TIMEOUT_S) -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, urllib.error.URLError) as exc:
        return 0, str(exc).encode()


def judge(payload: Payload, status: int, raw: bytes) -> tuple[str, str, bool]:
    """(handling, message, stack trace leaked) for one answer; handling is `ok`/`row_error`/`http_4xx` or a fault."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    leaked = isinstance(body, dict) and bool(body.get("stack_trace"))
    if status == 0:
        return "no_answer", raw.decode(errors="replace")[:200], False
    if status != 200:
        message = str(body.get("message", "")) if isinstance(body, dict) else raw.decode(errors="replace")
        handling = "http_4xx" if 400 <= status < 500 and message.strip() else f"http_{status}"
        return handling, message[:300], leaked
    rows = body.get("predictions") if isinstance(body, dict) else None
    if not isinstance(rows, list):
        return "bad_200_body", raw[:200].decode(errors="replace"), leaked
    errors = [row.get("error") if isinstance(row, dict) else "not a row" for row in rows]
    good_rows = [i for i in range(len(rows)) if i not in payload.bad_rows]
    if len(rows) != payload.n_images + len(payload.bad_rows):
        return "wrong_row_count", f"{len(rows)} rows", leaked
    if any(errors[i] is not None or not rows[i].get("labels") for i in good_rows):
        return "valid_row_failed", str([errors[i] for i in good_rows])[:300], leaked
    if not payload.bad_rows:
        return "ok", "", leaked
    bad_messages = [errors[i] for i in payload.bad_rows]
    if all(isinstance(m, str) and m.strip() for m in bad_messages):
        return "row_error", "; ".join(bad_messages)[:300], leaked
    return "bad_row_accepted", str(bad_messages)[:300], leaked


def run_load(
    url: str, pools: dict[str, list[Payload]], *, workers: int, duration_s: float, seed: int
) -> tuple[list[Outcome], float]:
    """Post from `workers` threads until `duration_s` has passed; returns the outcomes and the elapsed seconds."""
    next_kind = schedule(seed)
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + duration_s

    def worker(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        while time.perf_counter() < deadline:
            kind = next_kind()
            payload = rng.choice(pools[kind])
            sent = time.perf_counter()
            status, raw = post(url, payload.body)
            latency = time.perf_counter() - sent
            handling, message, leaked = judge(payload, status, raw)
            outcome = Outcome(kind, status, latency, sent - start, payload.n_images, handling, message, leaked)
            with lock:
                outcomes.append(outcome)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(worker, i) for i in range(workers)]:
            future.result()
    return outcomes, time.perf_counter() - start


# --- figures ------------------------------------------------------------------------------------------------------


def _ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


def summarise(outcomes: list[Outcome], elapsed_s: float, duration_s: float) -> dict[str, Any]:
    valid = [o for o in outcomes if o.kind == VALID]
    valid_ok = [o for o in valid if o.handling == "ok"]
    latencies = [o.latency_s for o in valid_ok]
    quarters = Counter(min(3, int(4 * o.started_s / duration_s)) for o in valid_ok)
    kinds: dict[str, Any] = {}
    for kind in (VALID, *FAULT_KINDS):
        mine = [o for o in outcomes if o.kind == kind]
        expected = "ok" if kind == VALID else EXPECTED[kind]
        wrong = [o for o in mine if o.handling != expected]
        kinds[kind] = {
            "sent": len(mine),
            "status_codes": dict(sorted(Counter(str(o.status) for o in mine).items())),
            "expected": expected,
            "as_expected": len(mine) - len(wrong),
            "unexpected": dict(Counter(o.handling for o in wrong)),
            "stack_trace_leaked": sum(o.stack_trace for o in mine),
            "latency_ms_p50": _ms([o.latency_s for o in mine], 50),
            "example_message": next((o.message for o in mine if o.message), ""),
        }
    return {
        "requests": len(outcomes),
        "elapsed_s": round(elapsed_s, 2),
        "valid": {
            "sent": len(valid),
            "ok": len(valid_ok),
            "failed": len(valid) - len(valid_ok),
            "requests_per_s": round(len(valid_ok) / elapsed_s, 2),
            "images_per_s": round(sum(o.n_images for o in valid_ok) / elapsed_s, 2),
            "latency_ms": {
                "p50": _ms(latencies, 50),
                "p99": _ms(latencies, 99),
                "max": _ms(latencies, 100),
            },
            "ok_by_quarter": [quarters.get(q, 0) for q in range(4)],
        },
        "all_requests_per_s": round(len(outcomes) / elapsed_s, 2),
        "kinds": kinds,
    }


def print_figures(figures: dict[str, Any]) -> None:
    valid = figures["valid"]
    lat = valid["latency_ms"]
    print(
        f"{figures['model_uri']}: {figures['workers']} workers, {figures['elapsed_s']} s, "
        f"{figures['requests']} requests ({figures['all_requests_per_s']}/s); "
        f"setup {figures['setup_s']} s, server ready in {figures['server_start_s']} s"
    )
    print(
        f"valid: {valid['ok']}/{valid['sent']} ok, {valid['requests_per_s']} req/s, {valid['images_per_s']} images/s, "
        f"p50 {lat['p50']} ms, p99 {lat['p99']} ms, max {lat['max']} ms, ok by quarter {valid['ok_by_quarter']}"
    )
    print(f"{'kind':22}{'sent':>6}{'codes':>22}{'expected':>11}{'as exp.':>9}{'traces':>8}{'p50 ms':>9}  message")
    for kind, row in figures["kinds"].items():
        codes = ",".join(f"{code}x{n}" for code, n in row["status_codes"].items())
        print(
            f"{kind:22}{row['sent']:>6}{codes:>22}{row['expected']:>11}{row['as_expected']:>9}"
            f"{row['stack_trace_leaked']:>8}{row['latency_ms_p50'] or 0:>9.1f}  {row['example_message'][:70]!r}"
        )
    checks = figures["checks"]
    print(
        f"checks: valid failures {checks['valid_failures']}, faults not answered as expected "
        f"{checks['faults_mishandled']}, fault kinds never sent {checks['fault_kinds_not_sent']}, "
        f"server alive at end {checks['server_alive']} -> {'OK' if figures['ok'] else 'FAILED'}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run: 5 s of load, 3 workers")
    parser.add_argument("--duration", type=float, help="seconds of load (default 20, quick 5)")
    parser.add_argument("--workers", type=int, help="client threads (default 4, quick 3)")
    parser.add_argument("--model-uri", help="serve this model instead of building one (uses MLFLOW_TRACKING_URI)")
    parser.add_argument("--workdir", type=Path, help="keep the demo world, store and server log here")
    parser.add_argument("--images", type=int, default=16, help="demo world size (the valid images come from it)")
    parser.add_argument("--ready-timeout", type=float, default=240.0, help="seconds to wait for /ping")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("reports/serve_load.json"))
    args = parser.parse_args(argv)
    args.duration = args.duration or (5.0 if args.quick else 20.0)
    args.workers = args.workers or (3 if args.quick else 4)
    return args


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    if args.model_uri:
        from mumic_ml.demo_world import generate_demo_world

        world = generate_demo_world(workdir / "world", n_images=args.images, image_size=64, seed=args.seed)
        model_uri, tracking_uri, images = args.model_uri, None, sorted(world.images_dir.glob("*.png"))
    else:
        model_uri, tracking_uri, images = build_champion(workdir, args.images)
    setup_s = time.perf_counter() - start
    pools = make_payloads(images, args.seed)
    server = Server(model_uri, tracking_uri, workdir / "server.log")
    try:
        server_start_s = server.wait_ready(args.ready_timeout)
        outcomes, elapsed_s = run_load(
            server.url, pools, workers=args.workers, duration_s=args.duration, seed=args.seed
        )
        alive = server.alive()
        if not alive:
            print(server.tail(), file=sys.stderr)
    finally:
        server.stop()
    figures = {
        "model_uri": model_uri,
        "built_champion": not args.model_uri,
        "workers": args.workers,
        "duration_s": args.duration,
        "setup_s": round(setup_s, 1),
        "server_start_s": round(server_start_s, 1),
        "cpu_count": os.cpu_count(),
        **summarise(outcomes, elapsed_s, args.duration),
    }
    faults = [row for kind, row in figures["kinds"].items() if kind != VALID]
    figures["checks"] = {
        "valid_failures": figures["valid"]["failed"],
        "faults_mishandled": sum(row["sent"] - row["as_expected"] for row in faults),
        "fault_kinds_not_sent": [kind for kind in FAULT_KINDS if figures["kinds"][kind]["sent"] == 0],
        "stack_traces_leaked": sum(row["stack_trace_leaked"] for row in figures["kinds"].values()),
        "server_alive": alive,
    }
    checks = figures["checks"]
    figures["ok"] = (
        checks["valid_failures"] == 0
        and figures["valid"]["ok"] > 0
        and checks["faults_mishandled"] == 0
        and not checks["fault_kinds_not_sent"]
        and alive
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        figures = run(args, args.workdir.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="mumic-serve-load-") as tmp:
            figures = run(args, Path(tmp))
    print_figures(figures)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
