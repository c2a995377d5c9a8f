"""``dlrm-train``: train our DLRM with PyTorch on processed Criteo data.

Prints the reference's progress lines ("Finished training it j/n of epoch k, t ms/it, loss
l", then "Testing at - j/n of epoch k," and the test accuracy) and saves checkpoints in the
reference's format (``state_dict`` with its keys, plus epoch/iteration/accuracy fields), which
facebookresearch/dlrm and ``dlrm-compile --load-model`` both read. Table sizes come from the
data's ``counts``; the other architecture flags are the reference's (default: the Kaggle
preset's MLPs and dimension).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from ..artifact.staging import atomic_file, check_output_file
from .arch import PRESETS, add_arch_args, arch_from_fields, given_fields
from .dataset import ProcessedData
from .model import DLRM


# A test AUC below this after training is chance: the model learned nothing.
CHANCE_AUC = 0.55
# A training loss this many times that of always predicting the click rate has diverged
# (saturated sigmoids give BCE losses in the tens and no gradient to recover).
DIVERGED = 3.0


class TrainingFailed(RuntimeError):
    """Training that went wrong in a way no checkpoint should come of."""


def base_rate_loss(positives: float, n: int) -> float:
    """BCE of always predicting the observed click rate."""
    p = min(max(positives / max(n, 1), 1e-6), 1 - 1e-6)
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def evaluate(model: DLRM, data: ProcessedData, split: str, batch_size: int) -> dict:
    """BCE loss, accuracy (threshold 0.5) and AUC of ``model`` on ``split``."""
    from sklearn.metrics import roc_auc_score

    loss, correct, n, preds, labels = 0.0, 0, 0, [], []
    with torch.no_grad():
        for dense, offsets, indices, y in data.batches(split, batch_size):
            p = model.probabilities(torch.from_numpy(dense), torch.from_numpy(offsets),
                      [torch.from_numpy(i) for i in indices])[:, 0]
            t = torch.from_numpy(y)
            loss += float(torch.nn.functional.binary_cross_entropy(p, t, reduction="sum"))
            correct += int(((p > 0.5).float() == t).sum())
            n += len(y)
            preds.append(p.numpy())
            labels.append(y)
    labels_all = np.concatenate(labels) if labels else np.zeros(0)
    auc = (float(roc_auc_score(labels_all, np.concatenate(preds)))
           if len(np.unique(labels_all)) == 2 else float("nan"))
    return {"loss": loss / max(n, 1), "accuracy": correct / max(n, 1), "auc": auc, "samples": n}


def check_progress(loss: float, positives: float, seen: int, lr: float) -> None:
    """Stop a run whose loss is not finite or has diverged far above the base rate's."""
    base = base_rate_loss(positives, seen)
    hint = f"lower --learning-rate (now {lr:g}; adagrad: try 0.01)"
    if not math.isfinite(loss):
        raise TrainingFailed(f"the training loss is {loss}: {hint}")
    if loss > DIVERGED * base:
        raise TrainingFailed(f"training diverged: loss {loss:.3f}, where always predicting the "
                             f"click rate gives {base:.3f} (the sigmoid saturated): {hint}")


def save_checkpoint(path: str, model: DLRM, optimizer, epoch: int, nepochs: int, it: int,
                    nbatches: int, train: dict, test: dict | None) -> None:
    """The reference's checkpoint layout, written atomically."""
    state = {"epoch": epoch, "nepochs": nepochs, "nbatches": nbatches, "iter": it,
             "state_dict": model.state_dict(), "opt_state_dict": optimizer.state_dict(),
             "train_loss": train.get("loss", 0.0), "train_acc": train.get("accuracy", 0.0),
             "test_loss": (test or {}).get("loss", 0.0),
             "test_acc": (test or {}).get("accuracy", 0.0)}
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dlrm-train", description=__doc__)
    p.add_argument("--processed-data-file", "--data", dest="data", required=True,
                   help="processed .npz (dlrm-data criteo, or the reference's)")
    p.add_argument("--max-ind-range", type=int, default=None)
    p.add_argument("--mini-batch-size", type=int, default=128)
    p.add_argument("--test-mini-batch-size", type=int, default=4096)
    p.add_argument("--learning-rate", type=float, default=0.1)
    p.add_argument("--optimizer", choices=("sgd", "adagrad"), default="sgd")
    p.add_argument("--nepochs", type=int, default=1)
    p.add_argument("--print-freq", type=int, default=100)
    p.add_argument("--test-freq", type=int, default=0,
                   help="test every N iterations (0: at the end of each epoch)")
    p.add_argument("--save-model", help="checkpoint path (reference format)")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar on stderr (the reference's lines still print)")
    add_arch_args(p)
    args = p.parse_args(argv)
    for flag in ("mini_batch_size", "test_mini_batch_size", "nepochs", "print_freq"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.test_freq < 0 or (args.threads is not None and args.threads < 1):
        p.error("--test-freq must be >= 0 and --threads at least 1")
    if not 0 < args.learning_rate < math.inf:
        p.error(f"--learning-rate must be positive and finite, got {args.learning_rate}")
    try:
        data = ProcessedData.load(args.data, args.max_ind_range)
        given = given_fields(args)
        given["embedding_sizes"] = data.table_sizes()
        base = PRESETS[args.preset or "kaggle"]
        arch = arch_from_fields(given, base)
        if args.save_model:      # before the epochs, not after them
            check_output_file(args.save_model, (args.data,))
    except (ValueError, OSError) as e:
        print(f"dlrm-train: error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = DLRM(arch, seed=args.seed)
    opt_cls = torch.optim.SGD if args.optimizer == "sgd" else torch.optim.Adagrad
    optimizer = opt_cls(model.parameters(), lr=args.learning_rate)
    nbatches = data.num_batches("train", args.mini_batch_size)
    print(f"model: {arch.describe()}; {nbatches} batches per epoch", flush=True)
    try:
        train(args, model, optimizer, data, nbatches)
    except TrainingFailed as e:
        print(f"dlrm-train: error: {e}; no checkpoint written", file=sys.stderr)
        return 1
    except OSError as e:     # the checkpoint's write (a full disk): the old one stands
        print(f"dlrm-train: error: cannot write the checkpoint: {e}", file=sys.stderr)
        return 1
    return 0


def train(args, model: DLRM, optimizer, data: ProcessedData, nbatches: int) -> None:
    """The epochs, with the reference's progress lines; raises ``TrainingFailed``."""
    best, test = 0.0, None
    it, positives, labelled = 0, 0.0, 0
    for epoch in range(args.nepochs):
        model.train()
        t0, loss_sum, seen = time.perf_counter(), 0.0, 0
        batches = tqdm(data.batches("train", args.mini_batch_size, shuffle_seed=args.seed + epoch),
                       total=nbatches, desc=f"epoch {epoch}", unit="batch", leave=False,
                       disable=args.no_progress)
        for j, (dense, offsets, indices, y) in enumerate(batches):
            p_ = model.probabilities(torch.from_numpy(dense), torch.from_numpy(offsets),
                       [torch.from_numpy(i) for i in indices])[:, 0]
            loss = torch.nn.functional.binary_cross_entropy(p_, torch.from_numpy(y))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            it += 1
            loss_sum += float(loss.detach()) * len(y)
            seen += len(y)
            positives += float(y.sum())
            labelled += len(y)
            last = j + 1 == nbatches
            if (j + 1) % args.print_freq == 0 or last:
                ms = (time.perf_counter() - t0) * 1000 / (args.print_freq if not last
                                                           else (j % args.print_freq) + 1)
                print(f"Finished training it {j + 1}/{nbatches} of epoch {epoch}, {ms:.2f} ms/it,"
                      f" loss {loss_sum / seen:.6f}", flush=True)
                check_progress(loss_sum / seen, positives, labelled, args.learning_rate)
                t0, loss_sum, seen = time.perf_counter(), 0.0, 0
            if (args.test_freq and (j + 1) % args.test_freq == 0) or last:
                model.eval()
                test = evaluate(model, data, "test", args.test_mini_batch_size)
                best = max(best, test["accuracy"])
                print(f"Testing at - {j + 1}/{nbatches} of epoch {epoch},", flush=True)
                print(f" loss {test['loss']:.6f}, accuracy {test['accuracy'] * 100:3.3f} %, "
                      f"best {best * 100:3.3f} %", flush=True)
                print(f" auc {test['auc']:.4f}", flush=True)
                model.train()
        if test and test["auc"] < CHANCE_AUC:      # NaN (one class in the split): no verdict
            raise TrainingFailed(
                f"the model did not learn: test AUC {test['auc']:.4f} after epoch {epoch} "
                f"(chance is 0.5); try another --learning-rate (now {args.learning_rate:g}) or "
                "more data")
        if args.save_model:
            model.eval()
            save_checkpoint(args.save_model, model, optimizer, epoch, args.nepochs, it,
                            nbatches, {"loss": float(loss), "accuracy": 0.0}, test)
            print(f"saved {args.save_model}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
