"""``dlrm-serve``: serve artifacts over the Open Inference Protocol (REST "v2") on Ray Serve.

    dlrm-serve kaggle=kaggle.dlrmc                      # Ray started in this process
    dlrm-serve kaggle=kaggle.dlrmc --address auto       # onto a running Ray cluster
    dlrm-serve --swap kaggle=new.dlrmc                  # hot swap on a server started --admin
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.request

from ...artifact import ArtifactError, read_manifest

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _model(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not _NAME.match(name) or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=ARTIFACT_DIR with NAME of letters, "
                                         f"digits, '_', '.', '-', got {text!r}")
    return name, path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlrm-serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", type=_model, metavar="NAME=ARTIFACT",
                   help="the models to serve, each an artifact directory under a name")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1, help="replicas of each model")
    p.add_argument("--max-batch", type=int, default=256,
                   help="rows a dynamic batch holds at most (default 256)")
    p.add_argument("--batch-wait-ms", type=float, default=2.0,
                   help="how long a request waits for others to batch with (default 2 ms)")
    p.add_argument("--threads-per-replica", type=int,
                   help="TVM threads (and Ray CPUs) of each replica (default: the machine's "
                        "CPUs over the replicas of all models, at least 1)")
    p.add_argument("--address",
                   help="a Ray cluster to deploy onto (auto, ray://HOST:10001, HOST:6379); the "
                        "artifacts' paths must be readable on its nodes. Default: start Ray "
                        "in this process")
    p.add_argument("--request-timeout-s", type=float, default=30.0,
                   help="a request not answered within this gets 503 (default 30)")
    p.add_argument("--admin", action="store_true",
                   help="allow hot swaps over HTTP (POST /v2/repository/models/NAME/load); "
                        "off by default, since a swap loads native code from the path it names")
    p.add_argument("--log-format", choices=("JSON", "TEXT"), default="JSON",
                   help="Ray Serve's log encoding (default JSON: structured logs)")
    p.add_argument("--swap", type=_model, metavar="NAME=ARTIFACT",
                   help="do not serve: ask the server at --url to roll model NAME to ARTIFACT")
    p.add_argument("--url", default="http://127.0.0.1:8000",
                   help="the server --swap talks to (default http://127.0.0.1:8000)")
    return p


def swap(url: str, name: str, artifact: str, timeout: float = 600) -> dict:
    """Roll model ``name`` of the server at ``url`` to ``artifact`` (its hot-swap route)."""
    body = json.dumps({"parameters": {"artifact": os.path.abspath(artifact)}}).encode()
    req = urllib.request.Request(f"{url.rstrip('/')}/v2/repository/models/{name}/load",
                                 data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        try:
            body = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            pass
        raise SystemExit(f"dlrm-serve: the server refused the swap ({e.code}): {body}") \
            from None
    except urllib.error.URLError as e:
        raise SystemExit(f"dlrm-serve: cannot reach {url}: {e.reason}") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now."""
    import socket
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _check_port(host: str, port: int) -> None:
    """Refuse a port another process listens on (Ray's proxy would retry it forever)."""
    import socket
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise SystemExit(f"dlrm-serve: cannot listen on {host}:{port}: {e.strerror}") \
                from None


def _start_ray(args, cpus: int) -> None:
    import ray
    if args.address:
        try:
            ray.init(address=args.address, log_to_driver=False)
        except ConnectionError as e:
            hint = ("; a cluster that `ray start` made uses token authentication: run with "
                    "RAY_AUTH_MODE=token (the token is read from ~/.ray/auth_token, or "
                    "RAY_AUTH_TOKEN)" if os.environ.get("RAY_AUTH_MODE") != "token" else "")
            raise SystemExit(f"dlrm-serve: cannot join the Ray cluster at {args.address}: "
                             f"{e}{hint}") from None
        return
    metrics_port = free_port()      # this Ray's metrics agent (/metrics reads it)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 << 20, _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 2000})


def serve_models(args) -> int:
    proxy_port = args.port
    if not args.address:
        # Ray Serve's throughput-optimized mode with direct ingress: the Front replica listens
        # on --port itself (its own uvicorn), and Ray's HTTP proxy, a hop that cost about
        # 5 ms of CPU a request here, is left on an internal port. On a cluster
        # (--address) the cluster's own settings apply: requests go through its proxy.
        proxy_port = free_port(args.host)
        for key, value in (("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1"),
                           ("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1"),
                           ("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", str(args.port)),
                           # (the range's end is exclusive)
                           ("RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", str(args.port + 1)),
                           # (a drain period for external load balancers; there are none)
                           ("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")):
            os.environ[key] = value
    try:
        from ray import serve
    except ImportError:
        raise SystemExit("dlrm-serve needs Ray Serve: pip install 'dlrmc[serve]' "
                         "(or pip install 'ray[serve]')") from None
    from .app import APP, Settings, deploy

    names = [n for n, _ in args.models]
    if len(set(names)) != len(names):
        raise SystemExit(f"dlrm-serve: a model name is given twice: {names}")
    for name, path in args.models:       # refuse a bad artifact before anything starts
        try:
            manifest = read_manifest(path, verify=True)
        except (ArtifactError, OSError) as e:
            raise SystemExit(f"dlrm-serve: model {name}: {e}") from None
        if manifest.arch is None:
            raise SystemExit(f"dlrm-serve: model {name}: {path} is a generic (non-DLRM) artifact")
    if not args.address:
        _check_port(args.host, args.port)
    cpus = len(os.sched_getaffinity(0))
    threads = args.threads_per_replica or max(1, cpus // (args.replicas * len(args.models)))
    settings = Settings(replicas=args.replicas, max_batch=args.max_batch,
                        batch_wait_ms=args.batch_wait_ms, threads=threads,
                        request_timeout_s=args.request_timeout_s, admin=args.admin,
                        log_format=args.log_format)
    t0 = time.perf_counter()
    _start_ray(args, max(cpus, threads * args.replicas * len(args.models)))
    # From here a Ctrl-C (or SIGTERM) lets the deploy finish and then takes the application
    # down: on a cluster, nothing of it is left behind.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    serve.start(http_options={"host": args.host, "port": proxy_port},
                logging_config={"encoding": args.log_format})
    deploy({name: (path, "1") for name, path in args.models}, settings)
    url = f"http://{args.host}:{args.port}"
    print(f"dlrm-serve: {', '.join(names)} at {url}/v2/models/NAME/infer "
          f"({args.replicas} replica(s) each, {threads} thread(s) a replica, max batch "
          f"{args.max_batch} rows, wait {args.batch_wait_ms} ms; ready in "
          f"{time.perf_counter() - t0:.1f} s). Ctrl-C stops.", flush=True)
    stop.wait()
    print("dlrm-serve: stopping", flush=True)
    if args.address:
        serve.delete(APP)
    else:
        serve.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.swap:
        name, path = args.swap
        print(json.dumps(swap(args.url, name, path)))
        return 0
    if not args.models:
        parser().error("give at least one NAME=ARTIFACT (or --swap NAME=ARTIFACT)")
    for flag in ("replicas", "max_batch", "port"):
        if getattr(args, flag) < 1:
            parser().error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.threads_per_replica is not None and args.threads_per_replica < 1:
        parser().error("--threads-per-replica must be at least 1")
    if args.port > 65535:
        parser().error(f"--port must be at most 65535, got {args.port}")
    if not (0 <= args.batch_wait_ms < math.inf and 0 < args.request_timeout_s < math.inf):
        parser().error("--batch-wait-ms must be >= 0 and --request-timeout-s > 0 (finite)")
    return serve_models(args)


if __name__ == "__main__":
    sys.exit(main())
