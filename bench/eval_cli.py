"""``dlrm-eval``: accuracy of a compiled artifact beside PyTorch eager on processed Criteo data.

Streams a split (``--split train|test|val|all``, the reference's Kaggle split) through the
artifact and through PyTorch eager running the artifact's own weights (rebuilt from
``weights.bin``), and prints AUC, log loss and accuracy of both (scikit-learn's metrics) and
the largest prediction difference.
"""

from __future__ import annotations

import argparse
import sys

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
                   for k, v in runtime.manifest["arch"].items()})
    model = DLRM(arch, init=False)
    names = [t["name"] for t in runtime.manifest["weights"]["tensors"]]
    # quantised tables (--emb-quant) as the float rows they stand for
    quant = runtime.manifest.get("emb_quant")
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
            ref.append(model(torch.from_numpy(dense), torch.from_numpy(offsets),
                             [torch.from_numpy(i) for i in indices]).numpy()[:, 0])
            labels.append(y)
    ours, ref, y = np.concatenate(ours), np.concatenate(ref), np.concatenate(labels)
    return {"samples": len(y), "dlrmc": metrics(y, ours), "pytorch": metrics(y, ref),
            "max_abs_diff": float(np.abs(ours - ref).max()) if len(y) else 0.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dlrm-eval", description=__doc__)
    p.add_argument("artifact")
    p.add_argument("--data", required=True, help="processed .npz (dlrm-data criteo)")
    p.add_argument("--split", default="test", choices=("train", "test", "val", "all"))
    p.add_argument("--max-ind-range", type=int)
    p.add_argument("--batch-size", type=int, default=4096)
    args = p.parse_args(argv)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
