"""``dlrm-eval``: accuracy of a compiled artifact beside PyTorch eager on processed Criteo data.

Streams a split (``--split train|test|val|all``, the reference's Kaggle split) through the
artifact and through PyTorch eager running the artifact's own weights (rebuilt from
``weights.bin``), and prints AUC, log loss and accuracy of both (scikit-learn's metrics) and
the largest prediction difference.

``--compare VARIANTS --load-model CKPT`` instead compiles the checkpoint once per variant
(``fp32``; ``int8-emb``, ``int4-emb``: ``dlrm-compile --emb-quant``; ``bf16``, ``fp16``:
``--precision``; ``int8-mlp``: ``--mlp-quant int8`` calibrated on 4096 training rows) and
prints one table:
variant, AUC, delta AUC against fp32, log loss, accuracy, time per batch of 512, and the
weight file's size.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import numpy as np
import torch
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

from ..artifact import ArtifactError, read_weights
from ..frontend.arch import Arch
from ..frontend.dataset import ProcessedData
from ..frontend.model import DLRM
from ..schedules.embedding_bag import dequantize_rows
from ..runtime import load
from ..runtime.validate import InputError


def torch_model(runtime) -> DLRM:
    """PyTorch eager with the artifact's weights (the reference's state_dict names); quantised
    tables enter dequantised, so both systems compute with the same numbers."""
    arch = Arch(**{k: tuple(v) if isinstance(v, list) else v
                   for k, v in runtime.manifest.arch.items()})
    model = DLRM(arch, init=False)
    names = [t["name"] for t in runtime.manifest.weights["tensors"]]
    # quantised tables (--emb-quant) as the float rows they stand for
    quant = runtime.manifest.emb_quant
    state = {n: torch.from_numpy(
        dequantize_rows(w, arch.sparse_feature_size, quant) if w.dtype == np.uint8
        else np.array(w)) for n, w in zip(names, read_weights(runtime.path, runtime.manifest))}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def metrics(y: np.ndarray, p: np.ndarray) -> dict:
    p64 = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return {"auc": float(roc_auc_score(y, p64)) if 0 < y.sum() < len(y) else float("nan"),
            "log_loss": float(log_loss(y, p64, labels=[0, 1])),
            "accuracy": float(accuracy_score(y, p64 > 0.5))}


def evaluate(runtime, data: ProcessedData, split: str, batch_size: int) -> dict:
    model = torch_model(runtime)
    ours, ref, labels = [], [], []
    with torch.no_grad():
        for dense, offsets, indices, y in data.batches(split, batch_size):
            ours.append(runtime.predict(dense, offsets, indices)[:, 0])
            ref.append(model.probabilities(torch.from_numpy(dense), torch.from_numpy(offsets),
                                           [torch.from_numpy(i) for i in indices]).numpy()[:, 0])
            labels.append(y)
    ours, ref, y = np.concatenate(ours), np.concatenate(ref), np.concatenate(labels)
    return {"samples": len(y), "dlrmc": metrics(y, ours), "pytorch": metrics(y, ref),
            "max_abs_diff": float(np.abs(ours - ref).max()) if len(y) else 0.0,
            "spread": float(np.ptp(ours)) if len(y) else 0.0}


# Predictions that all lie within this of each other are constant: a model that learned
# nothing (a diverged training run's saturated sigmoid, say).
CONSTANT_SPREAD = 1e-4


VARIANTS = {"fp32": {}, "int8-emb": {"emb_quant": "int8"}, "int4-emb": {"emb_quant": "int4"},
            "bf16": {"precision": "bf16"}, "fp16": {"precision": "fp16"},
            "int8-mlp": {"mlp_quant": "int8"}}


def compare(checkpoint: str, variants: list[str], data: ProcessedData, split: str,
            batch_size: int, progress: bool = False) -> list[dict]:
    """Compile ``checkpoint`` per variant, evaluate each, time a batch of 512; ``progress``:
    a bar over the variants on stderr, naming the step under way."""
    import os
    import tempfile

    from tqdm import tqdm

    from ..compiler.build import compile_model
    from ..compiler.numerics import CALIBRATION_ROWS
    from ..frontend.checkpoint import load_model

    model = load_model(checkpoint)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dlrm-eval-") as tmp, \
            tqdm(variants, unit="variant", disable=not progress) as bar:
        for name in bar:
            bar.set_postfix_str(f"{name}: compiling")
            out = os.path.join(tmp, name)
            options = dict(VARIANTS[name])
            if "mlp_quant" in options:
                options["calibration"] = data.sample(CALIBRATION_ROWS, model.arch)
            compile_model(model, model.arch, None, out, log=lambda _: None, buckets=(512,),
                          **options)
            runtime = load(out)
            bar.set_postfix_str(f"{name}: evaluating {split}")
            result = evaluate(runtime, data, split, batch_size)
            dense, offsets, indices, _ = next(data.batches(split, 512))
            times = runtime.time_per_batch(dense, offsets, indices, repeat=20)
            rows.append({"variant": name, **result["dlrmc"], "ms_512": float(np.median(times))
                         * 1e3, "rows_512": len(dense),
                         "weights_mb": os.path.getsize(os.path.join(out, "weights.bin")) / 1e6})
    base = next((r["auc"] for r in rows if r["variant"] == "fp32"), None)
    for r in rows:
        r["delta_auc"] = None if base is None else r["auc"] - base
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dlrm-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", nargs="?", help="the artifact to evaluate (not with --compare)")
    p.add_argument("--compare", metavar="VARIANTS",
                   help=f"comma-separated subset of {','.join(VARIANTS)}: compile --load-model "
                        "once per variant and compare them")
    p.add_argument("--load-model", metavar="CKPT", help="checkpoint for --compare")
    p.add_argument("--data", required=True, help="processed .npz (dlrm-data criteo)")
    p.add_argument("--split", default="test", choices=("train", "test", "val", "all"))
    p.add_argument("--max-ind-range", type=int)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if bool(args.compare) == bool(args.artifact) or bool(args.compare) != bool(args.load_model):
        p.error("give an ARTIFACT, or --compare VARIANTS with --load-model CKPT")
    if args.compare:
        # torch.export's own pytree deprecation notice, not the user's concern
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return _compare_main(args)
    try:
        runtime = load(args.artifact)
        data = ProcessedData.load(args.data, args.max_ind_range)
        result = evaluate(runtime, data, args.split, args.batch_size)
    except (ArtifactError, InputError, ValueError, OSError) as e:
        print(f"dlrm-eval: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.split} split: {result['samples']:,} samples")
    print(f"{'system':<10} {'AUC':>9} {'log loss':>9} {'accuracy':>9}")
    for name in ("dlrmc", "pytorch"):
        m = result[name]
        print(f"{name:<10} {m['auc']:>9.6f} {m['log_loss']:>9.6f} {m['accuracy'] * 100:>8.3f}%")
    print(f"max |dlrmc - PyTorch| prediction: {result['max_abs_diff']:.3g}")
    if result["samples"] > 1 and result["spread"] < CONSTANT_SPREAD:
        print(f"dlrm-eval: warning: the artifact's predictions are constant (all within "
              f"{result['spread']:.2g} of each other): the model learned nothing; check how it "
              "was trained", file=sys.stderr)
    return 0


def _compare_main(args) -> int:
    variants = [v for v in args.compare.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        print(f"dlrm-eval: error: unknown variant(s) {', '.join(unknown) or '(none)'}; choose "
              f"from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    try:
        data = ProcessedData.load(args.data, args.max_ind_range)
        rows = compare(args.load_model, variants, data, args.split, args.batch_size,
                       progress=not args.no_progress)
    except (ArtifactError, InputError, ValueError, OSError) as e:
        print(f"dlrm-eval: error: {e}", file=sys.stderr)
        return 2
    print(f"{'variant':<10} {'AUC':>9} {'dAUC':>10} {'log loss':>9} {'accuracy':>9} "
          f"{'ms@512':>8} {'weights':>10}")
    for r in rows:
        delta = "-" if r["delta_auc"] is None else f"{r['delta_auc']:+.6f}"
        print(f"{r['variant']:<10} {r['auc']:>9.6f} {delta:>10} {r['log_loss']:>9.6f} "
              f"{r['accuracy'] * 100:>8.3f}% {r['ms_512']:>8.3f} {r['weights_mb']:>7.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
