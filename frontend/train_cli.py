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
import os
import sys
import time

import torch

from .arch import PRESETS, add_arch_args, arch_from_fields, given_fields
from .dataset import ProcessedData
from .model import DLRM


def evaluate(model: DLRM, data: ProcessedData, split: str, batch_size: int) -> dict:
    """BCE loss and accuracy (threshold 0.5) of ``model`` on ``split``."""
    loss, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for dense, offsets, indices, y in data.batches(split, batch_size):
            p = model(torch.from_numpy(dense), torch.from_numpy(offsets),
                      [torch.from_numpy(i) for i in indices])[:, 0]
            t = torch.from_numpy(y)
            loss += float(torch.nn.functional.binary_cross_entropy(p, t, reduction="sum"))
            correct += int(((p > 0.5).float() == t).sum())
            n += len(y)
    return {"loss": loss / max(n, 1), "accuracy": correct / max(n, 1), "samples": n}


def save_checkpoint(path: str, model: DLRM, optimizer, epoch: int, nepochs: int, it: int,
                    nbatches: int, train: dict, test: dict | None) -> None:
    """The reference's checkpoint layout, written atomically."""
    state = {"epoch": epoch, "nepochs": nepochs, "nbatches": nbatches, "iter": it,
             "state_dict": model.state_dict(), "opt_state_dict": optimizer.state_dict(),
             "train_loss": train.get("loss", 0.0), "train_acc": train.get("accuracy", 0.0),
             "test_loss": (test or {}).get("loss", 0.0),
             "test_acc": (test or {}).get("accuracy", 0.0)}
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


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
    add_arch_args(p)
    args = p.parse_args(argv)
    try:
        data = ProcessedData.load(args.data, args.max_ind_range)
        given = given_fields(args)
        given["embedding_sizes"] = data.table_sizes()
        base = PRESETS[args.preset or "kaggle"]
        arch = arch_from_fields(given, base)
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
    best, test = 0.0, None
    it = 0
    for epoch in range(args.nepochs):
        model.train()
        t0, loss_sum, seen = time.perf_counter(), 0.0, 0
        for j, (dense, offsets, indices, y) in enumerate(
                data.batches("train", args.mini_batch_size, shuffle_seed=args.seed + epoch)):
            p_ = model(torch.from_numpy(dense), torch.from_numpy(offsets),
                       [torch.from_numpy(i) for i in indices])[:, 0]
            loss = torch.nn.functional.binary_cross_entropy(p_, torch.from_numpy(y))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            it += 1
            loss_sum += float(loss) * len(y)
            seen += len(y)
            last = j + 1 == nbatches
            if (j + 1) % args.print_freq == 0 or last:
                ms = (time.perf_counter() - t0) * 1000 / (args.print_freq if not last
                                                           else (j % args.print_freq) + 1)
                print(f"Finished training it {j + 1}/{nbatches} of epoch {epoch}, {ms:.2f} ms/it,"
                      f" loss {loss_sum / seen:.6f}", flush=True)
                t0, loss_sum, seen = time.perf_counter(), 0.0, 0
            if (args.test_freq and (j + 1) % args.test_freq == 0) or last:
                model.eval()
                test = evaluate(model, data, "test", args.test_mini_batch_size)
                best = max(best, test["accuracy"])
                print(f"Testing at - {j + 1}/{nbatches} of epoch {epoch},", flush=True)
                print(f" loss {test['loss']:.6f}, accuracy {test['accuracy'] * 100:3.3f} %, "
                      f"best {best * 100:3.3f} %", flush=True)
                model.train()
        if args.save_model:
            model.eval()
            train = {"loss": float(loss), "accuracy": 0.0}
            save_checkpoint(args.save_model, model, optimizer, epoch, args.nepochs, it,
                            nbatches, train, test)
            print(f"saved {args.save_model}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
