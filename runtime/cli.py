"""``dlrm-run``: run a batch through an artifact and report predictions and time per batch."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from ..artifact import ArtifactError
from ..artifact.staging import atomic_file, check_output_file
from .batch import add_random_batch_args, batch_from_args, load_npz, read_npz
from .model import load, time_calls
from .validate import InputError, check_batch


def _npy_path(output: str) -> str:
    """Where ``--output`` goes: numpy's name for it (``.npy`` added), checked before the run."""
    path = output if output.endswith(".npy") else output + ".npy"
    check_output_file(path)
    return path


def _save(path: str, array: np.ndarray) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
    print(f"wrote {path}")


def _run_generic(model, args) -> int:
    """A generic ONNX artifact: its inputs by name from --input's .npz."""
    names = [i["name"] for i in model.inputs]
    if not args.input:
        raise InputError(f"{args.artifact} is a generic ONNX artifact: give --input with an .npz "
                         f"holding {', '.join(names)}")
    with read_npz(args.input) as z:
        missing = [n for n in names if n not in z.files]
        if missing:
            raise InputError(f"{args.input} lacks {', '.join(missing)}")
        outputs = model.run(*[z[n] for n in names])
    for spec, out in zip(model.manifest.outputs, outputs):
        print(f"{spec['name']} {list(out.shape)}: {out.reshape(-1)[:10]}")
    if args.output:
        _save(args.output, outputs[0])
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dlrm-run", description=__doc__)
    p.add_argument("artifact", help="artifact directory written by dlrm-compile")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help=".npz with dense_x and the sparse features as lS_o with lS_i "
                     "[T, N] or lS_i_0..lS_i_{T-1} (the reference's layout), indices with "
                     "offsets [T*B+1] (FBGEMM's), or values with lengths [T*B] (TorchRec's)")
    src.add_argument("--random", type=int, metavar="B", help="run a synthetic batch of B samples")
    add_random_batch_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="write the predictions [B, 1] to this .npy file")
    p.add_argument("--repeat", type=int, default=20, help="timed runs (default 20)")
    args = p.parse_args(argv)
    try:
        if args.output:
            args.output = _npy_path(args.output)
        t0 = time.perf_counter()
        model = load(args.artifact, mmap=True)   # the weights mapped from the file, not read
        print(f"loaded {args.artifact} in {time.perf_counter() - t0:.2f} s "
              f"(target {model.manifest.target['string']}; weights mapped from disk)")
        if model.manifest.arch is None:
            return _run_generic(model, args)
        if args.input:
            batch = load_npz(args.input, model.arch)
        else:
            if args.random < 1:
                raise InputError("--random needs a batch size >= 1")
            batch = check_batch(model.arch, *batch_from_args(model.arch, args.random, args,
                                                             args.seed))
        t0 = time.perf_counter()
        preds = model.predict_jagged(*batch)
        first = time.perf_counter() - t0      # the rows it reads are faulted in from the file
        times = time_calls(model.bind_jagged(*batch), warmup=1, repeat=max(1, args.repeat))
        if args.output:
            _save(args.output, preds)
    except (ArtifactError, InputError, ValueError, OSError) as e:
        print(f"dlrm-run: error: {e}", file=sys.stderr)
        return 2
    np.set_printoptions(precision=6, threshold=20, edgeitems=5)
    print(f"predictions [{preds.shape[0]}, 1]: {preds[:, 0]}")
    med = float(np.median(times))
    print(f"time per batch (B={preds.shape[0]}): median {med * 1e6:,.1f} us, "
          f"min {min(times) * 1e6:,.1f} us over {len(times)} runs; the first call, which "
          f"faults its rows in from the file: {first * 1e6:,.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
