"""dlrm-serve: the Open Inference Protocol codec, request merging, and one server (started as a
user starts it, on 127.0.0.1, stopped at the end) driven by tritonclient and by concurrent
clients: predictions against PyTorch, dynamic batching, a bad request among good ones, a hot
swap under load, a replica killed under load."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from conftest import TINY, make_batch, run, torch_predict
from dlrmc.frontend.arch import Arch
from dlrmc.frontend.ops import flat_layout
from dlrmc.runtime.plan import merge_batches, slice_batch
from dlrmc.runtime.serve.protocol import (ProtocolError, decode_request, decode_response,
                                          encode_request, encode_response)
from dlrmc.runtime.validate import check_batch

ray = pytest.importorskip("ray")
from ray.serve.exceptions import BackPressureError  # noqa: E402

from dlrmc.bench.serve_load import Client, Server, flat_request  # noqa: E402

# A second architecture for the hot swap (other widths, other tables: a different model).
SWAP = Arch(4, (12, 9, 6), (6, 8, 4), (6, 1))


# ---- the codec and the merge, no server ----------------------------------------------------

@pytest.mark.parametrize("binary", [True, False])
def test_protocol_round_trip(binary):
    rng = np.random.default_rng(0)
    inputs = {"dense_x": rng.standard_normal((3, 5)).astype(np.float32),
              "indices": rng.integers(0, 9, 7), "offsets": np.arange(4, dtype=np.int32)}
    body, headers = encode_request(inputs, binary=binary, request_id="r1")
    request, got = decode_request(body, headers.get("Inference-Header-Content-Length"))
    assert request["id"] == "r1" and list(got) == list(inputs)
    for k in inputs:
        assert got[k].dtype == inputs[k].dtype and np.array_equal(got[k], inputs[k])
    out = {"probabilities": rng.random((3, 1), dtype=np.float32)}
    body, headers = encode_response(request, "m", "1", out)
    assert bool(headers) == binary
    response, back = decode_response(body, headers.get("Inference-Header-Content-Length"))
    assert response["id"] == "r1" and response["model_version"] == "1"
    assert np.array_equal(back["probabilities"], out["probabilities"])


def test_protocol_takes_nested_json_data():
    body = json.dumps({"inputs": [{"name": "x", "datatype": "INT64", "shape": [2, 2],
                                   "data": [[1, 2], [3, 4]]}]}).encode()
    assert decode_request(body)[1]["x"].tolist() == [[1, 2], [3, 4]]


def _spec(**kw):
    spec = {"name": "x", "datatype": "INT64", "shape": [2], "data": [1, 2]}
    spec.update(kw)
    return spec


def _binary(declared: int, sent: int) -> tuple[bytes, int]:
    """An INT64 [2] input declaring ``declared`` binary bytes, followed by ``sent`` bytes."""
    header = json.dumps({"inputs": [{"name": "x", "datatype": "INT64", "shape": [2],
                                     "parameters": {"binary_data_size": declared}}]}).encode()
    return header + b"\0" * sent, len(header)


@pytest.mark.parametrize("body, header, match", [
    (b"{not json", None, "not valid JSON"),
    (b"[]", None, '"inputs" list'),
    (json.dumps({"inputs": [_spec(datatype="BYTES")]}).encode(), None, "datatype 'BYTES'"),
    (json.dumps({"inputs": [_spec(shape=[-1])]}).encode(), None, "non-negative"),
    (json.dumps({"inputs": [_spec(shape=[3])]}).encode(), None, "needs 3"),
    (json.dumps({"inputs": [_spec(data=[1.5, "a"])]}).encode(), None, "not INT64"),
    (json.dumps({"inputs": [_spec(data=[1.5, 2])]}).encode(), None, "not INT64"),
    (json.dumps({"inputs": [_spec(data=[[1], [2, 3]])]}).encode(), None, "not a list"),
    (json.dumps({"inputs": [_spec(datatype="UINT8", data=[1, 300])]}).encode(), None,
     "out of UINT8's range"),
    (json.dumps({"inputs": [_spec(data=[2 ** 64, 1])]}).encode(), None, "not INT64"),
    (json.dumps({"inputs": [_spec(), _spec()]}).encode(), None, "given twice"),
    (json.dumps({"inputs": [_spec(shape=[1 << 27], data=None)]}).encode(), None, "more than"),
    (json.dumps({"inputs": [{"name": "x", "datatype": "INT64", "shape": [2]}]}).encode(), None,
     "neither data"),
    (*_binary(16, 8), "short"),
    (*_binary(15, 15), "does not hold"),
    (b'{"inputs": []}' + b"\0" * 3, 14, "3 bytes after"),
    (b'{"inputs": []}', 99, "holds 14 bytes"),
    (b'{"inputs": []}', "x", "not a byte count"),
    (b'{"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": ' + b"[" * 100000
     + b"]" * 100000 + b"}]}", None, "nests too deeply"),      # was a RecursionError (500)
])
def test_protocol_refuses_malformed_requests(body, header, match):
    with pytest.raises(ProtocolError, match=match):
        decode_request(body, header)


def test_merge_batches_is_split_back_by_slicing():
    """Merged batches, sliced at their row counts, give each batch back exactly."""
    rng = np.random.default_rng(1)
    arch = TINY.to_dict()
    for _ in range(30):
        parts = [check_batch(arch, *make_batch(TINY, int(rng.integers(1, 7)), rng, max_bag=4))
                 for _ in range(int(rng.integers(1, 6)))]
        merged = merge_batches(parts)
        start = 0
        for part in parts:
            rows = part[0].shape[0]
            for a, b in zip(slice_batch(*merged, start, rows, rows), part):
                assert np.array_equal(a, b)
            start += rows


class _FakeMethod:
    """A handle method whose calls give ``outcomes`` in turn (the last one repeats): a value,
    an exception to raise, or "hang"."""

    def __init__(self, *outcomes):
        self.outcomes, self.calls = outcomes, 0

    def remote(self, *args):
        outcome = self.outcomes[min(self.calls, len(self.outcomes) - 1)]
        self.calls += 1

        async def answer():
            if outcome == "hang":
                await asyncio.sleep(60)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome
        return answer()


def _front(method: _FakeMethod):
    """The protocol front's own class over one fake model, without Ray."""
    from types import SimpleNamespace

    from dlrmc.runtime.serve.app import Front, Settings
    cls = Front.func_or_class.__mro__[1]       # ours, under Ray Serve's ASGI wrapper
    front = cls.__new__(cls)
    cls.__init__(front, {"m": SimpleNamespace(infer=method)},
                 vars(Settings(request_timeout_s=0.2)))
    return front


@pytest.mark.parametrize("outcomes, calls, status, match", [
    ((ray.exceptions.ActorDiedError(), {"ok": 1}), 2, None, None),     # retried on another
    ((ray.exceptions.ActorDiedError(),), 2, 503, "a replica of model m failed: ActorDiedError"),
    ((ray.exceptions.ActorUnavailableError("gone", None),), 2, 503, "ActorUnavailableError"),
    (("hang",), 1, 503, "did not answer within 0.2 s"),
    ((BackPressureError(num_queued_requests=9, max_queued_requests=9),), 1, 503, "overloaded"),
])
def test_front_answers_503_with_the_reason(outcomes, calls, status, match):
    method = _FakeMethod(*outcomes)
    result, err = asyncio.run(_front(method)._answer("m", "infer", {}, False))
    assert method.calls == calls
    if status is None:
        assert err is None and result == {"ok": 1}
    else:
        assert err.status_code == status and match in json.loads(err.body)["error"]


def test_front_names_an_unknown_model():
    _, err = asyncio.run(_front(_FakeMethod({}))._answer("nope", "infer"))
    assert err.status_code == 404 and "no model named 'nope'; models: m" in json.loads(err.body)["error"]


# ---- one server for the rest ---------------------------------------------------------------

@pytest.fixture(scope="module")
def server(compiled):
    tiny, swap = compiled(TINY), compiled(SWAP)
    with Server({"tiny": str(tiny.path), "other": str(swap.path)},
                ("--replicas", "2", "--admin", "--max-batch", "64", "--batch-wait-ms", "5",
                 "--log-format", "TEXT")) as s:
        s.models = {"tiny": tiny, "swap": swap}
        yield s


def _expected(model, batch) -> np.ndarray:
    return torch_predict(model.model, *batch)


def test_tritonclient_routes_and_inference(server):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and not client.is_model_ready("nope")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    assert [m["name"] for m in client.get_model_repository_index()] == ["other", "tiny"]
    assert client.get_model_metadata("other")["inputs"][0]["shape"] == [-1, SWAP.num_dense]
    meta = client.get_model_metadata("tiny")
    assert [i["name"] for i in meta["inputs"]] == ["dense_x", "indices", "offsets"]
    assert meta["inputs"][0]["shape"] == [-1, TINY.num_dense]
    assert meta["parameters"]["buckets"] == [4, 16]
    rng = np.random.default_rng(2)
    tiny = server.models["tiny"]
    for rows, binary in ((1, True), (5, False), (16, True), (40, False)):
        batch = make_batch(TINY, rows, rng)
        inputs = []
        for name, array in flat_request(batch).items():
            inp = triton.InferInput(name, list(array.shape),
                                    "FP32" if array.dtype == np.float32 else "INT64")
            inp.set_data_from_numpy(array, binary_data=binary)
            inputs.append(inp)
        out = client.infer("tiny", inputs, outputs=[
            triton.InferRequestedOutput("probabilities", binary_data=binary)])
        np.testing.assert_allclose(out.as_numpy("probabilities"), _expected(tiny, batch),
                                   rtol=1e-5, atol=1e-6)
        assert out.get_response()["model_version"] == "1"
    one_each = (np.zeros((2, TINY.num_dense), np.float32), np.tile([0, 1], (3, 1)),
                [np.array([1, 2])] * 3)
    bad = flat_request(one_each)
    bad["indices"][3] = 99                  # table 1's second index; table 1 has 7 rows
    with pytest.raises(Exception, match=r"\(table 1, position 1\) is out of range for table 1"):
        inputs = [triton.InferInput(n, list(a.shape), "FP32" if a.dtype == np.float32
                                    else "INT64") for n, a in bad.items()]
        for inp, a in zip(inputs, bad.values()):
            inp.set_data_from_numpy(a)
        client.infer("tiny", inputs)


def test_keyed_jagged_inputs_and_errors(server):
    rng = np.random.default_rng(3)
    batch = make_batch(TINY, 6, rng)
    indices, offsets = flat_layout(batch[1], batch[2])
    c = Client(server.url)
    status, out = c.infer("tiny", {"dense_x": batch[0], "values": indices.astype(np.int32),
                                   "lengths": np.diff(offsets)})
    assert status == 200
    np.testing.assert_allclose(out["probabilities"], _expected(server.models["tiny"], batch),
                               rtol=1e-5, atol=1e-6)
    ok = flat_request(batch)
    cases = [
        ("tiny", {**ok, "dense_x": ok["dense_x"].astype(np.float64)}, 400, "must be float32"),
        ("tiny", {"dense_x": ok["dense_x"], "indices": ok["indices"]}, 400, "values + lengths"),
        ("tiny", {**ok, "offsets": ok["offsets"][:-1]}, 400, "offsets must have shape"),
        ("nope", ok, 404, "no model named 'nope'"),
    ]
    for model, inputs, status, match in cases:
        got, message = c.infer(model, inputs)
        assert got == status and match in message, (got, message)
    status, message = c.infer("tiny", ok, outputs=["logits"])
    assert status == 400 and "not logits" in message
    status, message = c.post("/v2/models/tiny/infer", b"{bad", {})
    assert status == 400 and "not valid JSON" in message


def _send_all(url, requests, threads=8):
    """Each (model, inputs) request by one of ``threads`` clients at once; [(status, outputs
    or message, the rows of the batch it ran in)]."""
    results = [None] * len(requests)
    todo = iter(range(len(requests)))
    lock = threading.Lock()

    def work():
        c = Client(url)
        while True:
            with lock:
                k = next(todo, None)
            if k is None:
                break
            status, out = c.infer(*requests[k])
            results[k] = (status, out, c.last_response.get("parameters", {}).get("batch_rows"))
        c.close()

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(120)
    return results


def _batches_run(server) -> tuple[float, float]:
    """(sum, count) of the rows of every batch model tiny ran, from ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families
    _, text = server.get("/metrics")
    total = count = 0.0
    for family in text_string_to_metric_families(text.decode()):
        if family.name == "ray_dlrmc_batch_rows":
            for sample in family.samples:
                if sample.labels.get("model") == "tiny":
                    if sample.name.endswith("_sum"):
                        total += sample.value
                    elif sample.name.endswith("_count"):
                        count += sample.value
    return total, count


def test_concurrent_mixed_requests_batch_and_match_predict(server):
    """Interleaved requests of 1..20 rows from 12 clients: each gets its own rows, as the
    unbatched PyTorch model and the artifact's own predict give them, and /metrics counted
    every row."""
    from dlrmc.runtime import load
    rng = np.random.default_rng(4)
    tiny = server.models["tiny"]
    ours = load(str(tiny.path))
    batches = [make_batch(TINY, int(rng.integers(1, 21)), rng) for _ in range(120)]
    others = [make_batch(SWAP, int(rng.integers(1, 21)), rng) for _ in range(40)]
    requests = [("tiny", flat_request(b)) for b in batches] + \
        [("other", flat_request(b)) for b in others]
    order = rng.permutation(len(requests))          # both models' requests interleaved
    shuffled = _send_all(server.url, [requests[k] for k in order], threads=12)
    results = [None] * len(requests)
    for k, result in zip(order, shuffled):
        results[k] = result
    for batch, (status, out, _) in zip(others, results[len(batches):]):
        assert status == 200, out
        np.testing.assert_allclose(out["probabilities"], _expected(server.models["swap"], batch),
                                   rtol=1e-5, atol=1e-6)
    for batch, (status, out, formed) in zip(batches, results[:len(batches)]):
        assert status == 200, out
        assert batch[0].shape[0] <= formed <= 64       # --max-batch 64
        np.testing.assert_allclose(out["probabilities"], _expected(tiny, batch), rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(out["probabilities"], ours.predict(*batch), rtol=1e-5,
                                   atol=1e-6)
    deadline = time.monotonic() + 30          # Ray's metrics agents export every 2 s
    while time.monotonic() < deadline:
        total, count = _batches_run(server)
        if total >= sum(b[0].shape[0] for b in batches):
            break
        time.sleep(1)
    # (cumulative over the module. Whether requests shared batches depends on how they
    # arrived: a request that finds its replica idle runs alone, and under a loaded CI
    # machine they all may)
    assert total >= sum(b[0].shape[0] for b in batches) and count > 0, (total, count)


def test_bad_request_among_good_ones_fails_alone(server):
    rng = np.random.default_rng(5)
    batches = [make_batch(TINY, int(rng.integers(1, 9)), rng) for _ in range(40)]
    requests = [flat_request(b) for b in batches]
    bad = 17
    requests[bad]["indices"][0] = -3
    results = _send_all(server.url, [("tiny", r) for r in requests], threads=10)
    for k, (batch, (status, out, _)) in enumerate(zip(batches, results)):
        if k == bad:
            assert status == 400 and "indices[0] = -3 (table" in out, out
        else:
            assert status == 200, out
            np.testing.assert_allclose(out["probabilities"],
                                       _expected(server.models["tiny"], batch),
                                       rtol=1e-5, atol=1e-6)


def test_metrics_are_prometheus_text(server):
    from prometheus_client.parser import text_string_to_metric_families
    status, text = server.get("/metrics")
    assert status == 200
    names = {f.name for f in text_string_to_metric_families(text.decode())}
    for want in ("ray_dlrmc_requests", "ray_dlrmc_rows", "ray_dlrmc_batch_rows",
                 "ray_dlrmc_queue_seconds", "ray_dlrmc_model_seconds"):
        assert want in names, sorted(names)[:20]


class _Load:
    """Clients sending requests until stopped; every answer counted."""

    def __init__(self, url, model, threads=6):
        self.stop, self.results = threading.Event(), []
        rng = np.random.default_rng(6)
        self.batches = [make_batch(model.arch, int(rng.integers(1, 9)), rng) for _ in range(16)]
        self.threads = [threading.Thread(target=self._run, args=(url, k), daemon=True)
                        for k in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self, url, k):
        c = Client(url, timeout=60)
        i = k
        while not self.stop.is_set():
            batch = self.batches[i % len(self.batches)]
            i += 1
            try:
                status, out = c.infer("tiny", flat_request(batch))
            except OSError as e:
                status, out = 0, repr(e)
                c = Client(url, timeout=60)
            self.results.append((status, out, batch))

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(90)
        return self.results


def test_hot_swap_under_load_fails_no_request(server):
    swap = server.models["swap"]
    front, other = _replica_pids("Front"), _replica_pids("model-other")
    assert len(front) == 1 and len(other) == 2, (front, other)
    load = _Load(server.url, server.models["tiny"])
    time.sleep(1)
    # a bad artifact is refused before anything rolls
    res = run("dlrm-serve", "--swap", f"tiny={server.models['tiny'].path}.missing", "--url",
              server.url, check=False)
    assert res.returncode != 0 and "refused the swap (400)" in res.stderr
    res = run("dlrm-serve", "--swap", f"tiny={swap.path}", "--url", server.url, timeout=300)
    assert json.loads(res.stdout)["version"] == "2"
    time.sleep(1)
    results = load.finish()
    failed = [(s, o) for s, o, _ in results if s != 200]
    assert not failed and len(results) > 50, (failed[:3], len(results))
    # answers are the old model's, then the new one's (old replicas drain as new ones start)
    rng = np.random.default_rng(7)
    batch = make_batch(SWAP, 5, rng)
    status, out = Client(server.url).infer("tiny", flat_request(batch))
    assert status == 200
    np.testing.assert_allclose(out["probabilities"], _expected(swap, batch), rtol=1e-5, atol=1e-6)
    # only the swapped model's replicas rolled
    assert _replica_pids("Front") == front and _replica_pids("model-other") == other
    status, body = server.get("/v2/models/tiny")
    assert json.loads(body)["versions"] == ["2"]
    assert json.loads(body)["inputs"][0]["shape"] == [-1, SWAP.num_dense]


def _replica_pids(deployment: str) -> list[int]:
    """The pids of a deployment's replicas (Ray titles them ray::ServeReplica:APP:NAME)."""
    import psutil
    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith(f"ray::ServeReplica:dlrmc:{deployment}"):
            pids.append(p.info["pid"])
    return pids


def test_killed_replica_is_restarted_and_requests_get_answers(server):
    """A replica killed under load: every request is answered (200, or 503 with a reason,
    never a hang), Ray starts a new replica, and the server keeps answering."""
    before = _replica_pids("model-tiny")
    assert len(before) == 2, before
    model = server.models["swap"]                        # (tiny serves SWAP since the swap)
    load = _Load(server.url, model)
    time.sleep(1)
    os.kill(before[0], signal.SIGKILL)
    time.sleep(3)
    results = load.finish()
    statuses = {s for s, _, _ in results}
    assert statuses <= {200, 503}, [(s, o) for s, o, _ in results if s not in (200, 503)][:3]
    for status, out, batch in results:
        if status == 503:
            assert "replica of model tiny failed" in out, out
        else:
            np.testing.assert_allclose(out["probabilities"], _expected(model, batch),
                                       rtol=1e-5, atol=1e-6)
    print(f"killed a replica under load: {sum(s != 200 for s, _, _ in results)} of "
          f"{len(results)} requests got 503")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        now = _replica_pids("model-tiny")
        if len(now) == 2 and before[0] not in now:
            break
        time.sleep(1)
    assert len(now) == 2 and before[0] not in now, now
    batch = make_batch(SWAP, 3, np.random.default_rng(8))
    assert Client(server.url).infer("tiny", flat_request(batch))[0] == 200


def test_dlrm_serve_refuses_bad_arguments(tmp_path, capsys):
    res = run("dlrm-serve", "x", check=False)
    assert res.returncode == 2 and "NAME=ARTIFACT" in res.stderr
    res = run("dlrm-serve", f"m={tmp_path}", check=False)
    assert res.returncode != 0 and "model m" in res.stderr
    from dlrmc.runtime.serve.cli import main       # the flags' checks, in process
    for flags, message in [(["--port", "99999"], "at most 65535"), (["--port", "0"], "at least 1"),
                           (["--batch-wait-ms", "nan"], "finite"),
                           (["--request-timeout-s", "inf"], "finite"),
                           (["--threads-per-replica", "0"], "at least 1")]:
        with pytest.raises(SystemExit) as stop:
            main([f"m={tmp_path}", *flags])
        assert stop.value.code == 2 and message in capsys.readouterr().err, flags


@pytest.mark.slow   # (a Ray cluster of its own and a deploy onto it, ~30 s)
def test_serving_onto_a_running_ray_cluster(compiled, monkeypatch):
    """--address: the application is deployed onto a cluster that `ray start` made (no
    embedded Ray) and answered through the cluster's proxy on --port; stopping dlrm-serve
    deletes the application and leaves the cluster running."""
    import subprocess

    from dlrmc.runtime.serve.cli import free_port

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")      # this test's cluster: no token
    gcs = free_port()
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--num-cpus", "2", "--port", str(gcs),
         "--node-ip-address", "127.0.0.1", "--include-dashboard", "false",
         "--disable-usage-stats", "--ray-client-server-port", str(free_port())],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        tiny = compiled(TINY)
        batch = make_batch(TINY, 5, np.random.default_rng(6))
        with Server({"m": str(tiny.path)}, ("--address", f"127.0.0.1:{gcs}")) as s:
            status, out = Client(s.url).infer("m", flat_request(batch))
            assert status == 200, out
            np.testing.assert_allclose(out["probabilities"], _expected(tiny, batch),
                                       rtol=1e-5, atol=1e-6)
        assert head.poll() is None              # the cluster outlives the server
        assert s.get("/v2/health/live")[0] == 404  # its proxy is up, the application gone
    finally:
        os.killpg(head.pid, signal.SIGTERM)      # `ray start --block` stops what it started
        head.wait(60)


@pytest.mark.slow   # (a compile and a server of its own, ~30 s; the server is tested above)
def test_dlrm_bench_serve_command(tmp_path):
    """dlrm-bench --serve, bounded: two levels on the tiny preset, the JSON, table and plot."""
    out = tmp_path / "serve.json"
    res = run("dlrm-bench", "--preset", "tiny", "--serve", "--serve-concurrency", "1,3",
              "--serve-rows", "2", "--serve-requests", "30", "--serve-seconds", "5",
              "--no-layers", "--peers", "none", "--json", out, "--serve-plot",
              tmp_path / "plot.png", timeout=300)
    levels = json.loads(out.read_text())["levels"]
    assert [(lv["concurrency"], lv["rows"]) for lv in levels] == [(1, 2), (3, 2)]
    for lv in levels:
        assert lv["failed"] == 0 and 0 < lv["requests"] <= 30 and lv["qps"] > 0
        assert lv["mean_batch_rows"] >= 2 and lv["p50_ms"] <= lv["p99_ms"]
    assert "| rows/request | clients |" in res.stdout and (tmp_path / "plot.png").stat().st_size
