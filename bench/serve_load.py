"""``dlrm-bench --serve``: a bounded load generator against ``dlrm-serve`` on 127.0.0.1.

The server runs as users start it (the ``dlrm-serve`` command, in its own process group);
clients are threads, each with one keep-alive connection, sending Open Inference Protocol
requests with the binary tensor extension. Each level runs a fixed number of requests or a
fixed time, whichever ends first, at a fixed concurrency, and reports QPS and latency
percentiles beside the artifact's in-process ``predict`` at the batch size the server formed.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np

from ..frontend.ops import flat_layout
from ..runtime.serve.cli import free_port
from ..runtime.serve.protocol import ProtocolError, decode_response, encode_request


class Server:
    """``dlrm-serve`` started on 127.0.0.1 (a context manager; ``stop`` ends it, its Ray
    with it, within ``timeout`` seconds)."""

    def __init__(self, models: dict[str, str], args: tuple = (), timeout: float = 180):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "dlrmc.runtime.serve.cli",
               *(f"{n}={p}" for n, p in models.items()), "--port", str(self.port), *args]
        fd, self.log_path = tempfile.mkstemp(prefix="dlrm-serve-", suffix=".log")
        self.log = os.fdopen(fd, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dlrm-serve exited with {self.proc.returncode}; its output "
                                   f"is in {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"dlrm-serve was not ready within {timeout} s ({self.log_path})")

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def stop(self, timeout: float = 60) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:                    # whatever of its Ray is left
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class Client:
    """One keep-alive connection sending infer requests."""

    def __init__(self, url: str, timeout: float = 60):
        host, port = url.removeprefix("http://").rstrip("/").split(":")
        self._conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        self.last_response: dict = {}      # the last 200 response's JSON

    def infer(self, model: str, inputs: dict, binary: bool = True, outputs=None
              ) -> tuple[int, object]:
        """(HTTP status, the outputs by name, or the server's error message)."""
        body, headers = encode_request(inputs, binary=binary, outputs=outputs)
        return self.post(f"/v2/models/{model}/infer", body, headers)

    def post(self, path: str, body: bytes, headers: dict) -> tuple[int, object]:
        self._conn.request("POST", path, body=body, headers=headers)
        r = self._conn.getresponse()
        data = r.read()
        if r.status != 200:
            try:
                return r.status, json.loads(data)["error"]
            except (ValueError, KeyError):
                return r.status, data.decode(errors="replace")
        try:
            self.last_response, outputs = decode_response(
                data, r.getheader("Inference-Header-Content-Length"))
            return 200, outputs
        except ProtocolError as e:
            return 200, f"undecodable response: {e}"

    def close(self):
        self._conn.close()


def flat_request(batch) -> dict:
    """A reference-layout batch (dense_x, lS_o, lS_i) as the server's flat inputs."""
    dense, lS_o, lS_i = batch
    indices, offsets = flat_layout(lS_o, lS_i)
    return {"dense_x": dense, "indices": indices, "offsets": offsets}


@dataclass
class Level:
    concurrency: int
    rows: int
    requests: int
    seconds: float
    failed: int
    latencies_ms: list
    batch_rows: list            # each answered request's batch, as the server reported it

    def row(self) -> dict:
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        return {"concurrency": self.concurrency, "rows": self.rows, "requests": self.requests,
                "failed": self.failed, "qps": self.requests / self.seconds,
                "rows_per_s": self.requests * self.rows / self.seconds,
                "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                "p999_ms": float(np.percentile(lat, 99.9)),
                "mean_batch_rows": float(np.mean(self.batch_rows)) if self.batch_rows else 0.0}


def run_level(url: str, model: str, requests: list[dict], concurrency: int, count: int,
              seconds: float) -> Level:
    """``count`` requests (cycling through ``requests``) from ``concurrency`` clients, or
    until ``seconds`` pass; every request's latency."""
    lock, sent = threading.Lock(), [0]
    lat, failed, formed = [], [0], []
    deadline = time.perf_counter() + seconds
    bodies = [encode_request(r) for r in requests]

    def client():
        c = Client(url)
        while time.perf_counter() < deadline:
            with lock:
                if sent[0] >= count:
                    break
                k = sent[0]
                sent[0] += 1
            t0 = time.perf_counter()
            try:
                status, _ = c.post(f"/v2/models/{model}/infer", *bodies[k % len(bodies)])
            except OSError:
                status = 0
                c = Client(url)
            ms = (time.perf_counter() - t0) * 1e3
            with lock:
                if status == 200:
                    lat.append(ms)
                    formed.append(c.last_response.get("parameters", {}).get("batch_rows", 0))
                else:
                    failed[0] += 1
        c.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = requests[0]["dense_x"].shape[0]
    return Level(concurrency, rows, len(lat), time.perf_counter() - t0, failed[0], lat, formed)


def plot(rows: list[dict], path: str) -> None:
    """p50 and p99 latency against the number of concurrent clients, a line per request size,
    each point labelled with its throughput."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for size in sorted({r["rows"] for r in rows}):
        pts = sorted((r["concurrency"], r["p50_ms"], r["p99_ms"], r["rows_per_s"]) for r in rows
                     if r["rows"] == size)
        xs = [p[0] for p in pts]
        line, = ax.plot(xs, [p[1] for p in pts], "o-", label=f"p50, {size} row(s) a request")
        ax.plot(xs, [p[2] for p in pts], "x--", color=line.get_color(),
                label=f"p99, {size} row(s) a request")
        for x, y, _, tput in pts:
            ax.annotate(f"{tput:,.0f} rows/s", (x, y), fontsize=6, xytext=(3, -9),
                        textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("latency (ms)")
    ax.set_title("dlrm-serve: latency against load")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def benchmark(artifact: str, ours, args, batch_of) -> dict:
    """The ``--serve`` table: for each request size and concurrency, the server's QPS and
    latency percentiles, the mean batch its requests ran in (each response says its batch's
    rows), and in-process ``predict`` (same artifact,
    same machine, server idle) at that batch size and at the request's own size."""
    from ..runtime.model import time_calls
    levels = [int(c) for c in args.serve_concurrency.split(",")]
    sizes = [int(r) for r in args.serve_rows.split(",")]
    server_args = ("--replicas", str(args.serve_replicas), "--max-batch",
                   str(args.serve_max_batch), "--batch-wait-ms", str(args.serve_batch_wait_ms),
                   "--threads-per-replica", str(args.threads), "--log-format", "TEXT")

    def predict_us(rows: int) -> float:
        batch = batch_of(rows, 10_000 + rows)
        return float(np.median(time_calls(lambda: ours.predict(*batch), 3, 30)) * 1e6)

    rows_out = []
    with Server({"model": artifact}, server_args) as server:
        for size in sizes:
            requests = [flat_request(batch_of(size, 1000 * size + k)) for k in range(64)]
            for concurrency in levels:
                run_level(server.url, "model", requests, concurrency, 4 * concurrency, 10)
                level = run_level(server.url, "model", requests, concurrency,
                                  args.serve_requests, args.serve_seconds)
                row = level.row()
                formed = row["mean_batch_rows"]
                b = max(1, round(formed))
                row["predict_us_at_batch"] = predict_us(b)
                row["predict_rows_per_s_at_batch"] = b / row["predict_us_at_batch"] * 1e6
                row["share_of_predict"] = row["rows_per_s"] / row["predict_rows_per_s_at_batch"]
                row["predict_us_at_request"] = predict_us(size)
                rows_out.append(row)
                print(f"{size} row(s) x {concurrency} client(s): {row['qps']:,.0f} req/s, p50 "
                      f"{row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, batches of "
                      f"{formed:.1f} rows, {row['share_of_predict']:.0%} of predict's "
                      f"rows/s at that batch, {row['failed']} failed", flush=True)
    return {"levels": rows_out, "server_args": list(server_args)}


def markdown(rows: list[dict]) -> str:
    lines = ["| rows/request | clients | req/s | rows/s | p50 | p99 | p99.9 | mean batch | "
             "in-process `predict` at that batch | server / `predict` rows/s | `predict` "
             "at the request's rows | failed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['rows']} | {r['concurrency']} | {r['qps']:,.0f} | {r['rows_per_s']:,.0f} | "
            f"{r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | {r['p999_ms']:.2f} ms | "
            f"{r['mean_batch_rows']:.1f} | {r['predict_us_at_batch']:,.0f} us "
            f"({r['predict_rows_per_s_at_batch']:,.0f} rows/s) | {r['share_of_predict']:.0%} | "
            f"{r['predict_us_at_request'] / 1e3:.2f} ms | {r['failed']} |")
    return "\n".join(lines)
