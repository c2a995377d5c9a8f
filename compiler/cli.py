"""``dlrm-compile``: compile a DLRM into a deployable artifact directory."""

from __future__ import annotations

import argparse
import sys
import warnings

import numpy as np
import torch

from ..artifact import ArtifactError, check_replaceable
from ..frontend.checkpoint import CheckpointError
from ..frontend.source import add_model_args, model_from_args
from ..targets import TargetError, backend_for, parse_target
from ..schedules.tuning.log import read_manifest as read_log_manifest
from ..schedules.embedding_bag import QUANTS
from .buckets import DEFAULT_BUCKETS, parse_buckets
from .build import BuildError, compile_model
from .lower import LoweringError
from .numerics import CALIBRATION_ROWS, MLP_QUANTS, PRECISIONS
from ..frontend.onnx_import import NotADlrm

USER_ERRORS = (ArtifactError, CheckpointError, TargetError, LoweringError, BuildError, ValueError,
               OSError)


def check_artifact(model: torch.nn.Module, out_dir: str, batch: int, seed: int = 0) -> float:
    """Run a synthetic batch through the artifact and PyTorch eager; print both; return max |diff|."""
    from ..runtime import load
    from ..runtime.batch import random_batch

    # mapped, not copied: the batch touches a few pages of the file
    compiled = load(out_dir, mmap=True)
    dense, offsets, indices = random_batch(compiled.arch, batch, bag_size=2, seed=seed)
    ours = compiled.predict(dense, offsets, indices)
    ref_indices = indices
    if model.table_sources:      # tables the compile never drew: PyTorch gets the batch's rows
        model, ref_indices = model.with_rows(indices)
    with torch.no_grad():
        ref = model.probabilities(torch.from_numpy(dense), torch.from_numpy(offsets),
                                  [torch.from_numpy(i) for i in ref_indices]).numpy()
    np.set_printoptions(precision=6, threshold=16, edgeitems=4)
    print(f"predictions (dlrmc)   : {ours[:, 0]}")
    print(f"predictions (PyTorch) : {ref[:, 0]}")
    diff = float(np.abs(ours - ref).max())
    print(f"max |dlrmc - PyTorch| over batch {batch}: {diff:.3g}")
    return diff


def _compile_generic(args, why: NotADlrm) -> int:
    """An ONNX graph that is not a DLRM we recognise: TVM's generic path, with a warning."""
    from ..frontend.onnx_import import load_onnx, unrecognised_readers
    from .generic import compile_generic

    proto = load_onnx(args.onnx)
    nodes = unrecognised_readers(proto)
    where = ("; ".join(nodes[:8]) + (f" (and {len(nodes) - 8} more)" if len(nodes) > 8 else "")
             + ": an encoding dlrmc does not recognise") if nodes else "no DLRM structure"
    print(f"dlrm-compile: warning: {why}. Compiling {args.onnx} through TVM's generic ONNX "
          f"path instead ({where}); it runs with TVM's default schedules, none of dlrmc's "
          "kernels, buckets or tuning, and will be slow.", file=sys.stderr)
    ignored = [flag for flag, on in [("--precision", args.precision != "fp32"),
                                     ("--mlp-quant", args.mlp_quant), ("--emb-quant", args.emb_quant),
                                     ("--tuning-log", args.tuning_log), ("--buckets", args.buckets),
                                     ("--check", args.check)] if on]
    if ignored:
        print(f"dlrm-compile: warning: {', '.join(ignored)} apply to DLRMs only; ignored",
              file=sys.stderr)
    compile_generic(proto, args.target, args.output, str(why))
    print(f"wrote {args.output} (generic)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dlrm-compile", description=__doc__)
    p.add_argument("--target", default="host",
                   help='TVM target string, e.g. "llvm -mcpu=skylake-avx512" (default: this CPU)')
    p.add_argument("-o", "--output", required=True, help="artifact directory to write")
    p.add_argument("--check", type=int, default=0, metavar="B",
                   help="afterwards run a synthetic batch of B through the artifact and PyTorch "
                        "and print the predictions and their max difference")
    p.add_argument("--buckets", metavar="B1,B2,..",
                   help="static batch sizes compiled beside the any-batch entry (default: the "
                        "tuning log's, else " + ",".join(map(str, DEFAULT_BUCKETS)) + "; "
                        "'none' for the any-batch entry only; each 1 to 65536)")
    p.add_argument("--tuning-log", metavar="LOG_DIR",
                   help="replay the schedules dlrm-tune recorded in LOG_DIR (no tuning runs)")
    p.add_argument("--emb-quant", choices=QUANTS,
                   help="store the embedding tables row-wise quantised (FBGEMM's fused 8-bit "
                        "layout: codes, float32 scale and bias per row)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="type the MLPs and the interaction multiply in (fp32 accumulation; "
                        "AVX-512 BF16 instructions where the target has them)")
    p.add_argument("--mlp-quant", choices=MLP_QUANTS,
                   help="int8 MLPs: per-channel weight scales, activation scales calibrated on "
                        "--calibration-data (AVX-512 VNNI where the target has it)")
    p.add_argument("--calibration-data", metavar="NPZ",
                   help="processed Criteo .npz (dlrm-data criteo) whose training rows calibrate "
                        "--mlp-quant")
    p.add_argument("--calibration-rows", type=int, default=CALIBRATION_ROWS, metavar="N",
                   help=f"rows of the training split to calibrate on (default {CALIBRATION_ROWS})")
    p.add_argument("--max-ind-range", type=int, metavar="N",
                   help="hash the calibration data's categories modulo N, as the model was "
                        "trained")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress lines on stderr while the stages run (they show only "
                        "where stderr is a terminal; each stage's time prints either way)")
    add_model_args(p)
    args = p.parse_args(argv)
    if args.check < 0:
        p.error(f"--check wants a batch size (0: no check), got {args.check}")
    if args.mlp_quant and not args.calibration_data:
        p.error("--mlp-quant int8 needs --calibration-data NPZ (a sample of the training data)")
    # torch.export's own pytree deprecation notice, not the user's concern.
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    try:
        # fail before building a large model: the output, the target, what its backend refuses
        check_replaceable(args.output)
        backend = backend_for(parse_target(args.target))
        backend.check_options(emb_quant=args.emb_quant, precision=args.precision != "fp32",
                              mlp_quant=args.mlp_quant, tuning_log=args.tuning_log)
        buckets = None if args.buckets is None else parse_buckets(args.buckets)
        if args.tuning_log:
            read_log_manifest(args.tuning_log)
        try:
            # random tables are drawn as they are written (--mlp-quant calibrates on them)
            model, arch = model_from_args(args, lazy_tables=not args.mlp_quant)
        except NotADlrm as e:
            if not args.onnx:
                raise
            return _compile_generic(args, e)
        emb_quant = args.emb_quant or model.stored_quant
        if emb_quant and not args.emb_quant:
            kept = "emb_quant" not in backend.refuses
            print(f"[dlrmc] the checkpoint's tables are row-wise {emb_quant} (a quantized "
                  "TorchRec model): " + (f"kept as they are (--emb-quant {emb_quant})" if kept
                                         else "decoded to float32 for this target"), flush=True)
            emb_quant = emb_quant if kept else None
        calibration = None
        if args.mlp_quant:
            from ..frontend.dataset import ProcessedData
            data = ProcessedData.load(args.calibration_data, args.max_ind_range)
            calibration = data.sample(args.calibration_rows, arch)
        compile_model(model, arch, args.target, args.output, buckets=buckets,
                      tuning_log=args.tuning_log, emb_quant=emb_quant,
                      precision=args.precision, mlp_quant=args.mlp_quant,
                      calibration=calibration,
                      progress=not args.no_progress and sys.stderr.isatty())
        print(f"wrote {args.output}", flush=True)
        if args.check:
            from ..artifact import read_manifest
            from ..runtime.devices import artifact_device
            try:
                artifact_device(args.output, read_manifest(args.output, verify=False))
            except ArtifactError as e:   # built for another CPU or a GPU: the build stands
                print(f"dlrm-compile: warning: --check skipped on this machine: {e}",
                      file=sys.stderr)
                return 0
            print(f"[dlrmc] check: loading {args.output} (checking its files' digests) and "
                  f"running a batch of {args.check} through it and PyTorch eager", flush=True)
            diff = check_artifact(model, args.output, args.check, args.seed)
            # reduced-precision builds are compared with the fp32 model: their error shows
            # (tables kept as the checkpoint stores them are the model's own values)
            exact = emb_quant in (None, model.stored_quant) and args.precision == "fp32" and \
                not args.mlp_quant
            tolerance = 1e-4 if exact else 5e-2
            if diff > tolerance:
                print("dlrm-compile: error: the artifact disagrees with PyTorch", file=sys.stderr)
                return 1
    except USER_ERRORS as e:
        print(f"dlrm-compile: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
