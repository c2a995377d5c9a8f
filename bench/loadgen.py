"""MLPerf LoadGen driving an artifact: ``dlrm-bench --loadgen offline|server|singlestream``.

The query sample library is ``samples`` synthetic samples (the preset's multi-hot bag sizes:
MLPerf DLRM-v2's for ``dlrm-v2``), or the first rows of a file (``criteo_samples``: a processed
Criteo file's test split, ``dlrm-data criteo``'s output with one index a bag, or MLPerf's own
multi-hot Criteo day), held in memory.
The system under test answers each query with the artifact's click probability for its
sample (float32, 4 bytes):

- SingleStream: one sample a query, answered on LoadGen's thread;
- Offline: every sample in one query, run in batches of ``max_batch``;
- Server: queries arrive on LoadGen's schedule; a worker thread batches what is waiting (up
  to ``max_batch``) and answers it, so a burst is one batch, not many.

LoadGen writes its summary and detail logs under ``out_dir``; the summary's result lines are
printed. With ``accuracy`` LoadGen runs in accuracy mode (every sample once) and the logged
responses are compared with PyTorch eager on the same samples; with the file's labels,
both are scored by ROC AUC, MLPerf DLRM's accuracy metric.
"""

from __future__ import annotations

import array
import json
import os
import queue
import threading

import numpy as np
import torch

SCENARIOS = ("singlestream", "server", "offline")


def take_samples(batch, ids: np.ndarray):
    """Samples ``ids`` of a reference-layout batch, as a reference-layout batch."""
    dense, lS_o, lS_i = batch
    out_o, out_i = [], []
    for offsets, indices in zip(lS_o, lS_i):
        ends = np.append(offsets[1:], len(indices))
        starts, lengths = offsets[ids], ends[ids] - offsets[ids]
        # every index position of every chosen bag, in order
        pos = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + \
            np.arange(int(lengths.sum()))
        out_i.append(indices[pos])
        out_o.append(np.concatenate([[0], np.cumsum(lengths)[:-1]]))
    return dense[ids], np.stack(out_o).astype(np.int64), out_i


class _System:
    """The artifact as LoadGen's system under test."""

    def __init__(self, lg, model, samples, max_batch: int, scenario: str):
        self.lg, self.model, self.samples, self.max_batch = lg, model, samples, max_batch
        self.waiting: queue.Queue = queue.Queue()
        self.worker = None
        if scenario == "server":
            self.worker = threading.Thread(target=self._serve, daemon=True)
            self.worker.start()

    def _answer(self, queries, complete=None) -> None:
        complete = complete or self.lg.QuerySamplesComplete
        for start in range(0, len(queries), self.max_batch):
            chunk = queries[start:start + self.max_batch]
            ids = np.array([q.index for q in chunk])
            probs = self.model.predict(*take_samples(self.samples, ids))[:, 0]
            buf = array.array("f", probs.astype(np.float32).tobytes())
            address, _ = buf.buffer_info()
            complete([self.lg.QuerySampleResponse(q.id, address + 4 * k, 4)
                      for k, q in enumerate(chunk)])

    def seconds(self, count: int) -> float:
        """What answering ``count`` samples costs, everything but LoadGen's own work (the
        best of three): what LoadGen is told to expect."""
        import time

        fake = [self.lg.QuerySample() for _ in range(count)]
        for k, q in enumerate(fake):
            q.index, q.id = k % len(self.samples[0]), k
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            self._answer(fake, complete=lambda responses: None)
            times.append(time.perf_counter() - t0)
        return min(times)

    def issue(self, queries) -> None:
        if self.worker is None:
            self._answer(list(queries))
        else:
            for q in queries:
                self.waiting.put(q)

    def _serve(self) -> None:
        while True:
            first = self.waiting.get()
            if first is None:
                return
            group = [first]
            while len(group) < self.max_batch:
                try:
                    q = self.waiting.get_nowait()
                except queue.Empty:
                    break
                if q is None:
                    self._answer(group)
                    return
                group.append(q)
            self._answer(group)

    def flush(self) -> None:
        pass

    def stop(self) -> None:
        if self.worker is not None:
            self.waiting.put(None)
            self.worker.join()


def criteo_samples(path: str, arch: dict, count: int, max_ind_range: int | None = None):
    """The query sample library from a file and its click labels: the first ``count`` rows of
    a processed Criteo file's test split (``dlrm-data criteo``'s .npz, one index a bag), or,
    given a directory, of MLPerf DLRM-v2's multi-hot day in it (``multihot_criteo``). An index
    the model's tables cannot hold is an error naming the table and position."""
    from ..frontend.dataset import ProcessedData, multihot_criteo
    from ..runtime.validate import InputError, check_batch

    if os.path.isdir(path):
        (dense, lS_o, lS_i), labels = multihot_criteo(path, count, len(arch["embedding_sizes"]))
        if max_ind_range:
            lS_i = [i % max_ind_range for i in lS_i]
    else:
        data = ProcessedData.load(path, max_ind_range)
        dense, lS_o, lS_i, labels = next(data.batches("test", count))
    try:
        check_batch(arch, dense, lS_o, lS_i)
    except InputError as e:
        raise InputError(f"{path} does not fit the model ({e}; was it trained with "
                         "--max-ind-range?)") from None
    return (dense, lS_o, lS_i), labels


def run(model, torch_model, samples, scenario: str, out_dir: str, seconds: float = 10.0,
        target_qps: float | None = None, max_batch: int = 2048, accuracy: bool = False,
        labels: np.ndarray | None = None) -> dict:
    """Run LoadGen on ``model`` (a loaded artifact) over ``samples`` (a reference-layout
    batch, one row a sample); returns the summary's results (and the accuracy check, scored
    by ROC AUC against ``labels`` when given)."""
    import mlperf_loadgen as lg

    if scenario not in SCENARIOS:
        raise ValueError(f"LoadGen scenario must be one of {SCENARIOS}, got {scenario!r}")
    count = len(samples[0])
    settings = lg.TestSettings()
    settings.scenario = {"singlestream": lg.TestScenario.SingleStream,
                         "server": lg.TestScenario.Server,
                         "offline": lg.TestScenario.Offline}[scenario]
    settings.mode = lg.TestMode.AccuracyOnly if accuracy else lg.TestMode.PerformanceOnly
    settings.min_duration_ms = int(seconds * 1000)
    settings.max_duration_ms = int(seconds * 4000)
    settings.min_query_count = 1 if scenario == "offline" else 64
    if scenario == "server":
        settings.server_target_qps = float(target_qps or 100.0)
        settings.server_target_latency_ns = 30_000_000_000      # record, do not gate, latency
    system = _System(lg, model, samples, max_batch, scenario)
    # LoadGen schedules from what it expects: measure one sample and one full batch first.
    if scenario == "offline":
        # twice the measured rate: LoadGen then issues enough samples to fill the duration
        settings.offline_expected_qps = float(target_qps or
                                              2 * max_batch / system.seconds(max_batch))
    if scenario == "singlestream":
        # half the measured latency, as Offline asks for twice the rate: a probe taken at a
        # slow moment otherwise leaves LoadGen too few queries for the minimum duration
        # (seen in CI: "Min duration satisfied: NO")
        settings.single_stream_expected_latency_ns = max(int(system.seconds(1) * 1e9 / 2), 1000)
    sut = lg.ConstructSUT(system.issue, system.flush)
    qsl = lg.ConstructQSL(count, count, lambda ids: None, lambda ids: None)
    os.makedirs(out_dir, exist_ok=True)
    log = lg.LogSettings()
    log.log_output.outdir = out_dir
    log.log_output.copy_summary_to_stdout = False
    try:
        lg.StartTestWithLogSettings(sut, qsl, settings, log)
    finally:
        system.stop()
        lg.DestroyQSL(qsl)
        lg.DestroySUT(sut)
    result = {"scenario": scenario, "out_dir": out_dir}
    if accuracy:
        result["accuracy"] = _check_accuracy(out_dir, torch_model, samples, labels)
    else:
        result.update(_summary(os.path.join(out_dir, "mlperf_log_summary.txt")))
    return result


def _summary(path: str) -> dict:
    """The result lines of LoadGen's summary: validity, rates, latency percentiles."""
    wanted = ("Result is", "satisfied", "per second", "QPS w/o", "latency (ns)")
    # (keys as LoadGen prints them, e.g. "Completed samples per second", "Result is")
    out = {}
    with open(path) as f:
        for line in f:
            if line.startswith("Test Parameters Used"):
                break
            key, _, value = line.partition(":")
            key = key.strip()
            if value.strip() and any(w in key for w in wanted) and key not in out:
                out[key] = value.strip()
    return out


def _check_accuracy(out_dir: str, torch_model, samples, labels=None) -> dict:
    """LoadGen's logged responses against PyTorch eager's probabilities for those samples;
    with ``labels``, both scored by ROC AUC."""
    with open(os.path.join(out_dir, "mlperf_log_accuracy.json")) as f:
        logged = json.load(f)
    ids = np.array([r["qsl_idx"] for r in logged])
    ours = np.array([np.frombuffer(bytes.fromhex(r["data"]), np.float32)[0] for r in logged])
    dense, lS_o, lS_i = take_samples(samples, ids)
    with torch.no_grad():
        want = torch_model.probabilities(torch.from_numpy(dense), torch.from_numpy(lS_o),
                                         [torch.from_numpy(i) for i in lS_i]).numpy()[:, 0]
    out = {"samples": len(ids), "max_abs_diff": float(np.abs(ours - want).max())}
    if labels is not None and len(np.unique(labels[ids])) == 2:
        from sklearn.metrics import roc_auc_score
        out["auc"] = float(roc_auc_score(labels[ids], ours))
        out["auc_pytorch"] = float(roc_auc_score(labels[ids], want))
    return out


def report(result: dict) -> str:
    if "accuracy" in result:
        a = result["accuracy"]
        auc = (f", ROC AUC {a['auc']:.6f} (PyTorch {a['auc_pytorch']:.6f})"
               if "auc" in a else "")
        return (f"LoadGen {result['scenario']} accuracy mode: {a['samples']} samples, max "
                f"|dlrmc - PyTorch| {a['max_abs_diff']:.3g}{auc} (logs in {result['out_dir']})")
    lines = [f"LoadGen {result['scenario']} (logs in {result['out_dir']}):"]
    lines += [f"  {k}: {v}" for k, v in result.items() if k not in ("scenario", "out_dir")]
    return "\n".join(lines)
