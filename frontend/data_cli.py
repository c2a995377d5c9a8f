"""``dlrm-data``: Criteo-format data — preprocess raw click logs, or synthesise them.

  dlrm-data criteo RAW.txt[.gz] -o processed.npz [--max-ind-range N] [--strict]
  dlrm-data synth -o synthetic.txt --rows N [--seed S] [--max-vocab V]
"""

from __future__ import annotations

import argparse
import os
import sys

from tqdm import tqdm

from .criteo import MalformedLine, preprocess
from .synth import generate


def _criteo(args) -> int:
    size = os.path.getsize(args.raw)
    bar = None if args.no_progress else tqdm(total=size, unit="B", unit_scale=True,
                                             desc="preprocessing", dynamic_ncols=True)

    def progress(pos):
        if bar is not None and pos:
            bar.update(pos - bar.n)

    try:
        stats = preprocess(args.raw, args.output, args.max_ind_range, args.strict, progress)
    finally:
        if bar is not None:
            bar.close()
    print(f"{stats.rows:,} rows -> {args.output}")
    if stats.malformed:
        print(f"skipped {stats.malformed:,} malformed line(s) (--strict makes them errors); "
              "first: " + "; ".join(stats.first_malformed))
    return 0


def _synth(args) -> int:
    bar = None if args.no_progress else tqdm(total=args.rows, unit="row", unit_scale=True,
                                             desc="generating", dynamic_ncols=True)
    try:
        auc = generate(args.output, args.rows, args.seed, args.max_vocab,
                       bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    print(f"{args.rows:,} rows -> {args.output}; the hidden teacher's AUC on them: {auc:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dlrm-data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("criteo", help="raw Criteo TSV -> the reference's processed .npz")
    c.add_argument("raw", help="train.txt of the Kaggle set (or any Criteo-format TSV, .gz ok)")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--max-ind-range", type=int,
                   help="hash categories to value %% N instead of first-seen indices")
    c.add_argument("--strict", action="store_true", help="a malformed line is an error")
    s = sub.add_parser("synth", help="synthetic Criteo-format TSV with a hidden teacher")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--rows", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-vocab", type=int, default=100_000,
                   help="cap on a column's distinct values (default %(default)s)")
    for sp in (c, s):
        sp.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        return _criteo(args) if args.command == "criteo" else _synth(args)
    except MalformedLine as e:
        print(f"dlrm-data: error: {args.raw}: {e}", file=sys.stderr)
    except (ValueError, OSError) as e:
        print(f"dlrm-data: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
