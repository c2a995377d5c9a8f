"""``dlrm-bench``: our artifact beside PyTorch eager, torch.compile, AOTInductor and ONNX Runtime.

Everything runs in one process, one system at a time per batch size, on the same batch, each
through its public call (ours: ``predict``, validation and input copies included, with the
bound compiled call alone beside it): median and p99 time per batch, samples/s, each peer's
time over ours, and a lower bound (the larger of two: the MLP's FLOPs at the FMA peak
measured on this CPU, or at torch.mm's rate for an artifact built for another device, and
the gathered table bytes at this machine's sequential read bandwidth). With
``--tuning-log`` the artifact is compiled from that log and the default-schedule artifact
runs beside it; each tuning task's trials, best latency and achieved rate, and each
kernel's default latency and gain, are printed, and the tuning curve (sum of the tasks' best
latencies against trials) is drawn as a PNG. With ``--precision bf16|fp16`` or
``--mlp-quant int8`` the artifact is built so (int8 calibrated on the benchmark's own random
batches) and the fp32 artifact runs beside it as ``dlrmc-fp32``. Tables too large to hold in memory (full-size
DLRM-v2) are drawn only as the artifact is written; then only ``--peers none`` runs, and each
batch is checked against PyTorch on the rows it reads. Output: a terminal table, and
optionally JSON and Markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

from ..artifact.staging import check_output_file
from ..compiler.build import compile_model
from ..compiler.numerics import MLP_QUANTS, PRECISIONS
from ..frontend.source import add_model_args, model_from_args, tables_too_big
from ..runtime import load, set_threads
from ..runtime.batch import add_random_batch_args, bag_sizes_of, batch_from_args
from ..runtime.devices import is_host
from ..runtime.model import time_calls
from ..schedules.embedding_bag import fused_width
from ..schedules.tuning.log import read_manifest as read_log_manifest
from ..schedules.tuning.log import task_table
from ..targets import parse_target
from . import loadgen, probe, serve_load
from .tuning_report import plot_curve, tuning_curve
from .peers import PEERS, PeerUnavailable, build_peer, gemm_rate, graphs_compiled, read_bandwidth


def mlp_flops(arch) -> int:
    """Multiply-adds x 2 of both MLPs, and of the DCN cross layers' two GEMMs, for one sample."""
    cross = arch.dcn_layers * 2 * arch.top_input_width * arch.dcn_low_rank
    return 2 * (cross + sum(a * b for widths in (arch.mlp_bot, arch.ln_top)
                            for a, b in zip(widths[:-1], widths[1:])))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dlrm-bench", description=__doc__)
    add_model_args(p)
    p.add_argument("--target", default="host")
    p.add_argument("--artifact", help="benchmark this artifact (compiled from the same model "
                                      "flags and seed) instead of compiling one")
    p.add_argument("--batches", default="1,64,512,2048")
    add_random_batch_args(p)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--peers", default="eager,compile,aoti,ort",
                   help=f"comma-separated subset of {','.join(PEERS)}, or none")
    p.add_argument("--tuning-log", metavar="LOG_DIR",
                   help="also compile from this dlrm-tune log, report its tasks, draw its curve")
    p.add_argument("--curve", default="tuning_curve.png",
                   help="PNG of the tuning curve (with --tuning-log; default %(default)s)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="build our artifact in this precision (fp32 runs beside it)")
    p.add_argument("--mlp-quant", choices=MLP_QUANTS, help="int8 MLPs (fp32 runs beside it)")
    lgen = p.add_argument_group("MLPerf LoadGen (instead of the peer table)")
    lgen.add_argument("--loadgen", choices=loadgen.SCENARIOS,
                      help="run the artifact as a LoadGen system under test in this scenario")
    lgen.add_argument("--accuracy", action="store_true",
                      help="LoadGen's accuracy mode, its responses checked against PyTorch")
    lgen.add_argument("--samples", type=int, default=4096,
                      help="query sample library size (synthetic samples; default 4096)")
    lgen.add_argument("--seconds", type=float, default=10.0, help="minimum test duration")
    lgen.add_argument("--target-qps", type=float,
                      help="Server: the scheduled rate; Offline: the expected rate")
    lgen.add_argument("--max-batch", type=int, default=2048,
                      help="largest batch the system under test forms (default 2048)")
    lgen.add_argument("--loadgen-out", default="loadgen_logs", help="LoadGen's log directory")
    lgen.add_argument("--loadgen-data", metavar="NPZ|DIR",
                      help="the query sample library: the first --samples rows of this "
                           "processed Criteo file's test split (dlrm-data criteo), or of the "
                           "MLPerf multi-hot Criteo day (day_23_dense.npy, "
                           "day_23_sparse_multi_hot.npz, day_23_labels.npy) in this directory; "
                           "scored by ROC AUC with --accuracy (default: synthetic samples)")
    lgen.add_argument("--loadgen-max-ind-range", type=int, metavar="N",
                      help="hash --loadgen-data's categories modulo N, as the model was trained")
    srv = p.add_argument_group("dlrm-serve under load (instead of the peer table)")
    srv.add_argument("--serve", action="store_true",
                     help="start dlrm-serve on 127.0.0.1 with the artifact and load it: QPS and "
                          "p50/p99/p99.9 per level beside in-process predict, and a plot")
    srv.add_argument("--serve-concurrency", default="1,4,16,32,64", help="clients per level")
    srv.add_argument("--serve-rows", default="1,64", help="rows a request, one set of levels each")
    srv.add_argument("--serve-requests", type=int, default=2000, help="requests a level at most")
    srv.add_argument("--serve-seconds", type=float, default=15.0, help="seconds a level at most")
    srv.add_argument("--serve-replicas", type=int, default=1)
    srv.add_argument("--serve-max-batch", type=int, default=256)
    srv.add_argument("--serve-batch-wait-ms", type=float, default=2.0)
    srv.add_argument("--serve-plot", default="serve_latency.png", help="latency-load plot")
    p.add_argument("--layers", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the FMA peak and each dense layer's share of it at the "
                        "largest batch (default on)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--markdown", help="write the Markdown table here")
    args = p.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        p.error(f"--batches wants batch sizes separated by commas, got {args.batches!r}")
    if min(batches) < 1:
        p.error(f"--batches must be positive, got {min(batches)}")
    if args.threads < 1:
        p.error(f"--threads must be positive, got {args.threads}")
    for flag in ("json", "markdown", "serve_plot", "curve"):     # before the run, not after it
        path = getattr(args, flag, None)
        try:
            if path:
                check_output_file(path)
        except ValueError:
            p.error(f"--{flag.replace('_', '-')} {path}: not a file in an existing directory")
    peers = [n for n in args.peers.split(",") if n and n != "none"]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        p.error(f"unknown peer {', '.join(unknown)}; the peers are {', '.join(PEERS)} (or none)")
    try:
        return _bench(args, batches, peers)
    except (ValueError, OSError) as e:     # our errors name the problem: no traceback
        print(f"dlrm-bench: error: {e}", file=sys.stderr)
        return 2


def _bench(args, batches: list[int], peers: list[str]) -> int:
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    torch.set_num_threads(args.threads)
    set_threads(args.threads)
    # tables larger than memory are drawn only as the artifact is written, and then no peer
    # can hold them; PyTorch checks each batch on the rows it reads (DLRM.with_rows)
    model, arch = model_from_args(args, lazy_tables="too-big")
    unheld = model.table_sources and tables_too_big(arch)
    if unheld and (args.accuracy or args.mlp_quant or peers):
        raise SystemExit(f"dlrm-bench: error: {unheld}: the peers, --accuracy and --mlp-quant "
                         f"cannot hold them; use --peers none")
    tmp = tempfile.TemporaryDirectory(prefix="dlrmc-bench-")
    log_manifest = read_log_manifest(args.tuning_log) if args.tuning_log else None
    buckets = log_manifest["buckets"] if log_manifest else None
    numerics = {"precision": args.precision, "mlp_quant": args.mlp_quant}
    if args.mlp_quant:
        numerics["calibration"] = [batch_from_args(arch.to_dict(), 1024, args, seed=1)]
    reduced = args.precision != "fp32" or args.mlp_quant is not None
    if args.artifact:
        artifact = args.artifact
    else:
        artifact = f"{tmp.name}/model"
        compile_model(model, arch, args.target, artifact, buckets=buckets, **numerics)
    # Weights mapped from the file, not copied: the peers hold their own copies (multi-hot
    # tables are 8.6 GB). Warm-up runs fault in the rows a batch touches.
    ours = load(artifact, threads=args.threads, mmap=True)
    if args.serve:
        result = serve_load.benchmark(
            artifact, ours, args, lambda rows, seed: batch_from_args(arch.to_dict(), rows, args,
                                                                     seed))
        table = serve_load.markdown(result["levels"])
        serve_load.plot(result["levels"], args.serve_plot)
        print("\n" + table + f"\n\nplot: {args.serve_plot}")
        for path, text in ((args.json, json.dumps(result, indent=1)), (args.markdown, table)):
            if path:
                with open(path, "w") as f:
                    f.write(text + "\n")
        return 0
    if args.loadgen:
        labels = None
        if args.loadgen_data:
            samples, labels = loadgen.criteo_samples(args.loadgen_data, arch.to_dict(),
                                                     args.samples, args.loadgen_max_ind_range)
        else:
            samples = batch_from_args(arch.to_dict(), args.samples, args, seed=0)
        result = loadgen.run(ours, model, samples, args.loadgen, args.loadgen_out, args.seconds,
                             args.target_qps, args.max_batch, args.accuracy, labels)
        print(loadgen.report(result))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return 0
    systems: dict[str, object] = {}
    if reduced and not args.artifact:
        compile_model(model, arch, args.target, f"{tmp.name}/fp32", buckets=buckets)
        systems["dlrmc-fp32"] = load(f"{tmp.name}/fp32", threads=args.threads, mmap=True).predict
    tuning = None
    if args.tuning_log:
        compile_model(model, arch, args.target, f"{tmp.name}/tuned", tuning_log=args.tuning_log)
        systems["dlrmc-default"] = ours.predict
        ours = load(f"{tmp.name}/tuned", threads=args.threads, mmap=True)
        print(task_table(log_manifest))
        xs, ys = tuning_curve(args.tuning_log, log_manifest)
        plot_curve(xs, ys, args.curve)
        print(f"tuning curve: {args.curve}")
        tuning = {"log": args.tuning_log, "tasks": log_manifest["tasks"],
                  "curve": {"trials": xs, "sum_best_s": ys}}
    for name in peers:
        t0 = time.perf_counter()
        try:
            if name == "ort" and not args.fixed_bags:
                raise PeerUnavailable("our ONNX export of the bags needs fixed bag sizes")
            systems[name] = build_peer(name, model, arch, bag_sizes_of(args), args.threads)
            print(f"prepared {PEERS[name]} in {time.perf_counter() - t0:.1f} s", flush=True)
        except Exception as e:  # noqa: BLE001 - a peer that fails to build is reported, not fatal
            reason = str(e) if isinstance(e, PeerUnavailable) else f"{type(e).__name__}: {e}"
            systems[name] = reason.splitlines()[0][:300]
            print(f"skipping {PEERS[name]}: {systems[name]}", flush=True)
    quant = ours.manifest.emb_quant           # a table row as the artifact stores it
    row_bytes = (fused_width(arch.sparse_feature_size, quant) if quant
                 else 4 * arch.sparse_feature_size)
    # The bound's FLOP rate: this CPU's FMA peak when the artifact runs here (no kernel can
    # beat it), else torch.mm's rate
    tgt, host = parse_target(args.target), is_host(ours.device)

    def machine_rates() -> tuple[float, float]:
        return (probe.fma_peak(tgt, args.threads) if host else gemm_rate()), read_bandwidth()

    # Measured before and after every batch size, the highest taken: a shared host that
    # gives the bench's threads one core's worth for a while halves a single probe, and a
    # "bound" from it would sit above the systems' times.
    rates = [machine_rates()]
    results = []
    for batch in batches:
        dense, offsets, indices = batch_from_args(ours.arch, batch, args, seed=batch)
        tb = (torch.from_numpy(dense), torch.from_numpy(offsets),
              [torch.from_numpy(i) for i in indices])
        row = {"batch": batch, "systems": {}}
        with torch.no_grad():
            run = ours.bind(dense, offsets, indices)
            oracle, oracle_in = model, tb
            if model.table_sources:
                oracle, rows = model.with_rows(indices)
                oracle_in = (tb[0], tb[1], [torch.from_numpy(i) for i in rows])
            diff = float(np.abs(ours.predict(dense, offsets, indices)
                                - oracle.probabilities(*oracle_in).numpy()).max())
            # dlrmc as users call it (predict: validation and input copies included), and the
            # bound compiled call alone beside it
            ours_calls = [("dlrmc", lambda: ours.predict(dense, offsets, indices)),
                          ("dlrmc-call", run)]
            for name, fn in ours_calls + list(systems.items()):
                if isinstance(fn, str):
                    row["systems"][name] = {"unavailable": fn}
                    continue
                time.sleep(0.2)  # let the other runtime's spinning threads go to sleep
                if name in ("dlrmc-default", "dlrmc-fp32"):
                    call = (lambda f=fn: f(dense, offsets, indices))
                elif name.startswith("dlrmc"):
                    call = fn
                else:    # a peer's own input (TorchRec's KeyedJaggedTensor) made untimed
                    args_ = fn.inputs(*tb) if hasattr(fn, "inputs") else tb
                    call = (lambda f=fn, a=args_: f(*a))
                for _ in range(3):          # warm-up: compiles, first touches
                    call()
                graphs = graphs_compiled()
                t = np.array(time_calls(call, 0, args.repeat))
                row["systems"][name] = {"median_us": float(np.median(t) * 1e6),
                                        "p99_us": float(np.percentile(t, 99) * 1e6),
                                        "samples_per_s": float(batch / np.median(t))}
                if graphs_compiled() != graphs:
                    row["systems"][name]["recompiled_while_timed"] = True
        row["gathered_rows"] = sum(len(i) for i in indices)
        row["max_abs_diff_vs_eager"] = diff
        results.append(row)
        rates.append(machine_rates())
        print(f"B={batch}: " + ", ".join(
            f"{k} {v['median_us']:,.0f} us" for k, v in row["systems"].items() if "median_us" in v)
            + f"; max |dlrmc - eager| {diff:.2g}", flush=True)
    rate_flops, rate_bytes = (max(r) for r in zip(*rates))
    peak = rate_flops if host else None
    print(f"measured (the highest of {len(rates)}, before and after each batch size): "
          f"{'FMA peak (probe)' if host else 'GEMM (torch.mm 1024^3)'} "
          f"{rate_flops / 1e9:.0f} GFLOP/s, sequential read {rate_bytes / 1e9:.1f} GB/s",
          flush=True)
    for row in results:
        row["bound_us"] = 1e6 * max(mlp_flops(arch) * row["batch"] / rate_flops,
                                    row["gathered_rows"] * row_bytes / rate_bytes)
    table = markdown(results, ours.manifest.mlp_quant or ours.manifest.precision)
    print("\n" + table)
    layers = None
    if args.layers and host:
        top = max(batches)
        layers = {"fma_peak_flops": peak, "batch": top,
                  "table": probe.layer_table(arch, tgt, top, peak)}
        print(f"\nFMA peak (built-in probe: independent vector FMA chains, {args.threads} "
              f"threads): {peak / 1e9:,.1f} GFLOP/s\n" + layers["table"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": arch.to_dict(), "threads": args.threads, "bag_size": bag_sizes_of(args),
                       "target": ours.manifest.target, "bound_flops": rate_flops,
                       "bound_flops_source": "fma_peak" if peak else "torch.mm",
                       "read_bytes_per_s": rate_bytes, "results": results,
                       "tuning": tuning, "layers": layers}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    tmp.cleanup()
    return 0


def _numpy(out):
    return out.numpy() if hasattr(out, "numpy") else out


def markdown(results: list[dict], precision: str = "fp32") -> str:
    """The table of ``results``; ``precision``: what the artifact's MLPs compute in (the
    bound counts float32 FMAs)."""
    names = list(results[0]["systems"])
    head = "| system (median, p99; peer time / dlrmc time) | " + " | ".join(f"B={r['batch']}" for r in results) + " |"
    lines = [head, "|---" * (len(results) + 1) + "|"]
    for name in names:
        cells = []
        for r in results:
            s = r["systems"][name]
            if "median_us" not in s:
                cells.append("n/a")
                continue
            ratio = s["median_us"] / r["systems"]["dlrmc"]["median_us"]
            extra = "" if name == "dlrmc" else f", {ratio:.2f}x"
            flag = " **recompiled while timed: not trusted**" if s.get(
                "recompiled_while_timed") else ""
            cells.append(f"{s['median_us']:,.0f} us ({s['p99_us']:,.0f}{extra}){flag}")
        label = {"dlrmc": "dlrmc (this artifact)",
                 "dlrmc-call": "dlrmc, compiled call only",
                 "dlrmc-default": "dlrmc, default schedules",
                 "dlrmc-fp32": "dlrmc, fp32"}.get(name) or PEERS[name]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| lower bound | " + " | ".join(f"{r['bound_us']:,.0f} us" for r in results) + " |")
    lines.append("\nLower bound: the larger of the MLPs' FLOPs at the FMA peak measured here "
                 "(torch.mm's rate when the artifact is for another device) and the gathered "
                 "table rows' bytes at this machine's sequential read bandwidth (no gather "
                 "beats it); at best a system overlaps the two."
                 + ("" if precision == "fp32" else f" A float32 bound: this artifact's MLPs "
                    f"compute in {precision}, whose dot-product instructions do two or four "
                    "multiply-adds a lane, so it may run under it."))
    lines.append("Every system through its public call: dlrmc's rows time `predict` (input "
                 "validation and copies included); \"compiled call only\" times the bound "
                 "compiled entry alone, to show what `predict` adds. Each system is called "
                 "3 times untimed first (torch.compile: mode \"default\", static shapes, so "
                 "each batch size compiles there); a time during which TorchDynamo compiled "
                 "a graph is marked not trusted.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
