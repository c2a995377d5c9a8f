"""dlrm-serve's Ray Serve application (``dlrmc``): the Open Inference Protocol in front, one
deployment per model behind it.

- ``Front`` (one replica, the application's ingress, at route ``/``) speaks the protocol:
  health, metadata, infer, ``/metrics``, and the model-repository extension's ``load`` for
  hot swaps. It decodes a request and hands the arrays to the model's replicas through a Ray
  Serve handle; a replica that dies under it is retried once on another, then answered 503
  with the reason. Embedded, it listens on the port itself (Ray Serve's direct ingress).
- ``DLRMModel`` (deployment ``model-NAME``, ``--replicas`` replicas) loads the artifact with
  mmap (replicas on one machine share the table pages), validates each request alone (a bad
  one is answered 400 and never joins a batch), then batches with ``serve.batch``, counting
  rows, not requests: requests wait up to ``--batch-wait-ms`` for others until
  ``--max-batch`` rows, the merged batch runs on the artifact's buckets
  (``dlrmc.runtime.plan``) and each request gets its own rows back.
- A hot swap redeploys the application with one model's artifact changed: Ray Serve rolls
  that deployment's replicas, starting the new ones before it drains the old, and leaves the
  rest (``Front`` included) running.
"""

import asyncio
import json
import logging
import os
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.util import metrics

from ...artifact import ArtifactError, read_manifest
from ..plan import merge_batches
from ..validate import InputError, check_named
from .protocol import ProtocolError, decode_request, encode_response

LOG = logging.getLogger("ray.serve")
APP = "dlrmc"
METRIC_PREFIXES = ("ray_dlrmc_", "ray_serve_")
_ROW_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
_SECONDS = [1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1, 2.5]


def deployment_name(model: str) -> str:
    return f"model-{model}"


@dataclass(frozen=True)
class Settings:
    """How each model is served (dlrm-serve's flags)."""
    replicas: int = 1
    max_batch: int = 256
    batch_wait_ms: float = 2.0
    threads: int = 1
    request_timeout_s: float = 30.0
    admin: bool = False
    log_format: str = "JSON"


def _rows(items) -> int:
    return sum(batch[0].shape[0] for batch, _ in items)


@serve.deployment(max_ongoing_requests=512, health_check_period_s=2,
                  health_check_timeout_s=10)
class DLRMModel:
    """One replica of one model."""

    def __init__(self, name: str, artifact: str, version: str, settings: dict):
        from .. import load
        self.settings = Settings(**settings)
        self.name, self.artifact, self.version = name, artifact, version
        self.model = load(artifact, mmap=True, threads=self.settings.threads)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dlrmc-batch")  # one batch at a time
        self._pending = 0       # requests past validation, queued or running
        self._batched.set_max_batch_size(self.settings.max_batch)
        self._batched.set_batch_wait_timeout_s(self.settings.batch_wait_ms / 1000)
        tags = ("model",)
        self._requests = metrics.Counter("dlrmc_requests", "inference requests answered, by "
                                         "status", tag_keys=("model", "status"))
        self._rows_in = metrics.Counter("dlrmc_rows", "rows predicted", tag_keys=tags)
        self._queue = metrics.Histogram("dlrmc_queue_seconds", "a request's wait for its batch",
                                        boundaries=_SECONDS, tag_keys=tags)
        self._batch_rows = metrics.Histogram("dlrmc_batch_rows", "rows in each batch run",
                                             boundaries=_ROW_BUCKETS, tag_keys=tags)
        self._model_time = metrics.Histogram("dlrmc_model_seconds", "time to run one batch",
                                             boundaries=_SECONDS, tag_keys=tags)
        for m in (self._requests, self._rows_in, self._queue, self._batch_rows, self._model_time):
            m.set_default_tags({"model": name})
        LOG.info("loaded model", extra={"model": name, "artifact": artifact, "version": version})

    def metadata(self) -> dict:
        """The protocol's model metadata, with the artifact's own facts as parameters."""
        arch, manifest = self.model.arch, self.model.manifest
        tables = len(arch["embedding_sizes"])
        output = "logits" if self.model.output_kind == "logit" else "probabilities"
        return {
            "name": self.name, "versions": [self.version], "platform": "dlrmc",
            "inputs": [{"name": "dense_x", "datatype": "FP32", "shape": [-1, arch["mlp_bot"][0]]},
                       {"name": "indices", "datatype": "INT64", "shape": [-1]},
                       {"name": "offsets", "datatype": "INT64", "shape": [-1]}],
            "outputs": [{"name": output, "datatype": "FP32", "shape": [-1, 1]}],
            "parameters": {
                "artifact": self.artifact, "tables": tables, "rows": arch["embedding_sizes"],
                "buckets": self.model.buckets, "target": manifest.target,
                "offsets_shape": f"[{tables} * batch + 1]",
                "alternative_inputs": "values INT64 [-1] + lengths INT64 "
                                      f"[{tables} * batch] (KeyedJaggedTensor) for indices + "
                                      "offsets",
                "outputs": ["probabilities", "logits"] if output == "logits"
                else ["probabilities"],
                "max_batch": self.settings.max_batch,
                "batch_wait_ms": self.settings.batch_wait_ms},
        }

    async def infer(self, inputs: dict, logits: bool, version: str = "") -> dict:
        """{"output": [B, 1] float32, "version", "batch_rows"} or {"error": message, "status":
        HTTP status}; ``version``, when given, must be this replica's."""
        if version and version != self.version:
            return {"error": f"model {self.name} is at version {self.version}, not {version}",
                    "status": 404}
        try:
            self.model.check_logits(logits)
            batch = check_named(self.model.arch, inputs)
        except InputError as e:
            self._requests.inc(tags={"status": "400"})
            return {"error": str(e), "status": 400}
        # A request that finds the replica idle (nothing queued or running) runs at once: at
        # low load no one would join it. The others wait in serve.batch for company.
        alone = self._pending == 0 or batch[0].shape[0] >= self.settings.max_batch
        self._pending += 1
        try:
            if alone:
                out = (await self._run([(batch, time.perf_counter())]))[0]
            else:
                out = await self._batched((batch, time.perf_counter()))
        except Exception as e:  # noqa: BLE001 - the request gets the reason, the replica lives
            LOG.exception("batch failed", extra={"model": self.name})
            self._requests.inc(tags={"status": "500"})
            return {"error": f"model {self.name} failed to run the batch: {e}", "status": 500}
        finally:
            self._pending -= 1
        self._requests.inc(tags={"status": "200"})
        out, rows = out
        return {"output": self.model.as_requested(out, logits),
                "batch_rows": rows, "version": self.version}

    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.002, batch_size_fn=_rows)
    async def _batched(self, items: list) -> list:
        return await self._run(items)

    async def _run(self, items: list) -> list:
        """Run the requests' batches as one; each its rows of the raw model output, and the
        rows of the batch it ran in."""
        start = time.perf_counter()
        for _, queued in items:
            self._queue.observe(start - queued)
        batches = [batch for batch, _ in items]
        merged = merge_batches(batches)
        rows = merged[0].shape[0]
        raw = self.model.output_kind == "logit"
        out = await asyncio.get_running_loop().run_in_executor(
            self._pool, self.model.predict_batch, merged, raw)
        self._model_time.observe(time.perf_counter() - start)
        self._batch_rows.observe(rows)
        self._rows_in.inc(rows)
        return [(piece, rows) for piece in
                np.split(out, np.cumsum([b[0].shape[0] for b in batches])[:-1])]


def application(models: dict, settings: Settings):
    """The application: ``Front`` over one deployment per model, ``models`` mapping each name
    to (artifact, version)."""
    # Each deployment's version says when it must roll: serve.run otherwise gives every
    # deployment a fresh random one and restarts them all, Front with them. (Ray 2.60 keeps
    # the option for its own callers, hence _internal; the ray pin makes this safe.)
    bound = {name: DLRMModel.options(
        name=deployment_name(name), num_replicas=settings.replicas,
        ray_actor_options={"num_cpus": settings.threads}, _internal=True,
        version=f"{os.path.abspath(artifact)}@{version}",
    ).bind(name, os.path.abspath(artifact), version, asdict(settings))
        for name, (artifact, version) in models.items()}
    return Front.options(_internal=True, version=json.dumps(asdict(settings))).bind(
        bound, asdict(settings))


def deploy(models: dict, settings: Settings) -> None:
    """Deploy (or roll to) ``models``; Ray Serve restarts only what changed."""
    serve.run(application(models, settings), name=APP, route_prefix="/",
              logging_config={"encoding": settings.log_format})


def gather_metrics() -> str:
    """Every live node's dlrmc and Ray Serve metrics (Ray's metrics agents export each
    process's), merged into one Prometheus text exposition."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    families = {}
    for node in ray.nodes():
        if not node.get("Alive") or not node.get("MetricsExportPort"):
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                text = r.read().decode()
        except OSError as e:
            LOG.warning("metrics unreachable", extra={"url": url, "error": str(e)})
            continue
        for family in text_string_to_metric_families(text):
            if family.name.startswith(METRIC_PREFIXES):
                if family.name in families:
                    families[family.name].samples.extend(family.samples)
                else:
                    families[family.name] = family

    class _Collected:
        def collect(self):
            return list(families.values())

    return generate_latest(_Collected()).decode()


class Unavailable(Exception):
    """The model cannot answer now (503)."""


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


api = FastAPI(title="dlrm-serve", docs_url=None, redoc_url=None)


@serve.deployment(name="Front", num_replicas=1, max_ongoing_requests=4096,
                  ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Front:
    """The protocol's routes. It keeps no model state: versions and artifacts are the
    replicas' own (``DLRMModel.metadata``), so a restarted ``Front`` is the same ``Front``."""

    def __init__(self, handles: dict, settings: dict):
        self.settings = Settings(**settings)
        self.handles = handles              # model name -> its deployment's handle
        self._swap_lock = asyncio.Lock()
        self._unavailable = metrics.Counter(
            "dlrmc_unavailable", "requests answered 503: no replica of the model answered",
            tag_keys=("model",))

    async def _call(self, name: str, method: str, *args):
        """A model replica's answer; a dead replica retried once, then ``Unavailable``."""
        if name not in self.handles:
            raise KeyError(name)
        reason = ""
        for _ in range(2):
            try:
                return await asyncio.wait_for(
                    getattr(self.handles[name], method).remote(*args),
                    self.settings.request_timeout_s)
            except RayActorError as e:   # died, or unreachable: another replica may answer
                reason = f"a replica of model {name} failed: {type(e).__name__}"
            except BackPressureError:
                raise Unavailable(f"model {name} is overloaded (its replicas' queues are "
                                  "full); retry later") from None
            except asyncio.TimeoutError:
                raise Unavailable(f"model {name} did not answer within "
                                  f"{self.settings.request_timeout_s} s") from None
        raise Unavailable(reason)

    async def _answer(self, name: str, method: str, *args):
        try:
            return await self._call(name, method, *args), None
        except KeyError:
            return None, _error(404, f"no model named {name!r}; models: "
                                     f"{', '.join(sorted(self.handles))}")
        except Unavailable as e:
            self._unavailable.inc(tags={"model": name})
            return None, _error(503, str(e))

    @api.get("/v2/health/live")
    async def live(self):
        return {"live": True}

    @api.get("/v2/health/ready")
    async def ready(self):
        for name in self.handles:
            _, err = await self._answer(name, "metadata")
            if err is not None:
                return _error(503, f"model {name} is not ready")
        return {"ready": True}

    @api.get("/v2")
    async def server_metadata(self):
        from importlib.metadata import version
        return {"name": "dlrmc", "version": version("dlrmc"),
                "extensions": ["binary_tensor_data", "model_repository"]}

    @api.get("/v2/models/{name}")
    @api.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(self, name: str, version: str = ""):
        meta, err = await self._answer(name, "metadata")
        if err is None and version and version not in meta["versions"]:
            return _error(404, f"model {name} is at version {meta['versions'][0]}, not {version}")
        return err or meta

    @api.get("/v2/models/{name}/ready")
    @api.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(self, name: str, version: str = ""):
        meta = await self.model_metadata(name, version)
        return meta if isinstance(meta, Response) else {"name": name, "ready": True}

    @api.post("/v2/models/{name}/infer")
    @api.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(self, name: str, request: Request, version: str = ""):
        if name not in self.handles:
            return _error(404, f"no model named {name!r}; models: {', '.join(sorted(self.handles))}")
        try:
            req, inputs = decode_request(await request.body(),
                                         request.headers.get("Inference-Header-Content-Length"))
            wanted = [o.get("name") for o in req.get("outputs") or [] if isinstance(o, dict)]
            unknown = set(wanted) - {"probabilities", "logits"}
            if unknown or len(wanted) > 1:
                raise ProtocolError(f"outputs: ask for one of probabilities or logits, got "
                                    f"{wanted}")
        except ProtocolError as e:
            return _error(400, str(e))
        out_name = wanted[0] if wanted else "probabilities"
        result, err = await self._answer(name, "infer", inputs, out_name == "logits", version)
        if err is not None:
            return err
        if "error" in result:
            return _error(result["status"], result["error"])
        body, headers = encode_response(req, name, result["version"],
                                        {out_name: result["output"]},
                                        {"batch_rows": result["batch_rows"]})
        media = "application/octet-stream" if headers else "application/json"
        return Response(body, headers=headers, media_type=media)

    @api.get("/metrics")
    async def prometheus(self):
        text = await asyncio.to_thread(gather_metrics)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.post("/v2/repository/index")
    @api.get("/v2/repository/index")
    async def repository_index(self):
        index = []
        for name in sorted(self.handles):
            meta, err = await self._answer(name, "metadata")
            index.append({"name": name, "version": meta["versions"][0], "state": "READY"}
                         if err is None else {"name": name, "state": "UNAVAILABLE"})
        return index

    @api.post("/v2/repository/models/{name}/load")
    async def load_model(self, name: str, request: Request):
        """Hot swap: ``{"parameters": {"artifact": PATH}}`` (or tritonclient's ``load_model(name,
        config=json.dumps({"artifact": PATH}))``) rolls model ``name`` to that artifact."""
        if not self.settings.admin:
            return _error(403, "hot swap is off: start dlrm-serve with --admin to allow "
                               "/v2/repository/models/NAME/load (it loads native code from a "
                               "path the caller names)")
        if name not in self.handles:
            return _error(404, f"no model named {name!r}; models: {', '.join(sorted(self.handles))}")
        try:
            params = (await request.json()).get("parameters") or {}
            if "config" in params:
                params = json.loads(params["config"])
            artifact = params["artifact"]
            if not isinstance(artifact, str):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return _error(400, 'the body must be {"parameters": {"artifact": PATH}} or '
                               '{"parameters": {"config": "{\\"artifact\\": PATH}"}}')
        try:       # a bad artifact is refused here, before any replica rolls
            manifest = await asyncio.to_thread(read_manifest, artifact, True)
        except (ArtifactError, OSError) as e:
            return _error(400, f"cannot swap model {name} to {artifact}: {e}")
        if manifest.arch is None:
            return _error(400, f"{artifact} is a generic (non-DLRM) artifact")
        async with self._swap_lock:
            models = {}
            for other in self.handles:       # every model as its replicas serve it now
                meta, err = await self._answer(other, "metadata")
                if err is not None:
                    return _error(503, f"cannot swap model {name} while model {other} does not "
                                       f"answer: {json.loads(err.body)['error']}")
                models[other] = (meta["parameters"]["artifact"], meta["versions"][0])
            version = str(int(models[name][1]) + 1)
            models[name] = (artifact, version)
            await asyncio.to_thread(deploy, models, self.settings)
        LOG.info("swapped model", extra={"model": name, "artifact": artifact, "version": version})
        return {"name": name, "version": version, "artifact": os.path.abspath(artifact)}
