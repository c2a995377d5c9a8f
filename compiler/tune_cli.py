"""``dlrm-tune``: MetaSchedule over a model's kernels at each batch bucket, into a tuning log.

The log directory (``dlrmc.schedules.tuning``) is resumable: run the same command again and
only the trials still missing are measured. ``dlrm-compile --tuning-log DIR`` replays it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from importlib.metadata import version

import tvm
from tqdm import tqdm

from ..frontend.source import add_model_args, model_from_args
from ..schedules.tuning.measure import make_runner
from ..schedules.tuning.tasks import extract_tasks
from ..schedules.tuning.tune import trial_plan, tune
from ..schedules.tuning.log import task_table
from ..targets import backend_for, parse_target, target_text
from .build import prepare, tuning_identity
from .buckets import DEFAULT_BUCKETS, parse_buckets
from .cli import USER_ERRORS

TRIALS_PER_TASK_WITH_BUDGET = 64   # --time-budget alone: this many per task, or until time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dlrm-tune", description=__doc__)
    p.add_argument("--target", default="host", help='TVM target string (default: this CPU)')
    p.add_argument("-o", "--output", required=True, metavar="LOG_DIR",
                   help="tuning-log directory (created, or resumed if it holds a log)")
    budget = p.add_argument_group("budget (at least one)")
    budget.add_argument("--trials", type=int, help="measurements in all, split over the tasks")
    budget.add_argument("--time-budget", type=float, metavar="MIN",
                        help="stop measuring after this many minutes")
    p.add_argument("--buckets", default=",".join(map(str, DEFAULT_BUCKETS)),
                   help="batch sizes to tune (default: %(default)s)")
    p.add_argument("--indices-per-bag", type=int, default=1,
                   help="indices per bag of the measurement inputs (default 1, one-hot)")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT",
                   help="measure on the devices registered at this TVM RPC tracker")
    p.add_argument("--rpc-key", help="the device key to request from the tracker")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_args(p)
    args = p.parse_args(argv)
    if args.trials is None and args.time_budget is None:
        p.error("give --trials N, --time-budget MIN, or both")
    if (args.trials is not None and args.trials < 1) or args.indices_per_bag < 1:
        p.error("--trials and --indices-per-bag must be positive")
    if bool(args.rpc_tracker) != bool(args.rpc_key):
        p.error("--rpc-tracker and --rpc-key go together")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    try:
        if os.path.exists(args.output) and not os.path.isdir(args.output):
            raise ValueError(f"{args.output} is a file; the tuning log is a directory")
        tgt = parse_target(args.target)
        buckets = parse_buckets(args.buckets)
        if not buckets:
            raise ValueError("dlrm-tune needs at least one batch bucket")
        runner = make_runner(args.rpc_tracker, args.rpc_key)
        model, arch = model_from_args(args)
        lowered = prepare(model, arch, tgt, buckets)
        del model
        tasks = extract_tasks(lowered.mod, tgt, args.indices_per_bag)
        if not tasks:
            raise ValueError(
                f"nothing to tune for {target_text(tgt)} at buckets {args.buckets}: no kernel "
                "has work enough to split over the cores" if backend_for(tgt).lowering == "cpu"
                else f"dlrm-tune tunes CPU targets; {target_text(tgt)}'s kernels have fixed "
                "GPU schedules (ours and dlight's)")
        trials = args.trials or TRIALS_PER_TASK_WITH_BUDGET * len(tasks)
        manifest = {**tuning_identity(arch, tgt), "target_string": args.target,
                    "arch": arch.to_dict(), "buckets": list(buckets),
                    "indices_per_bag": args.indices_per_bag, "trials": trials,
                    "dlrmc_version": version("dlrmc"), "tvm_version": tvm.__version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        per_task, planned = trial_plan(trials, len(tasks))
        print(f"{len(tasks)} tasks at buckets {','.join(map(str, buckets))}, {per_task} trials "
              f"each ({planned} in all); target {target_text(tgt)}")
        bar = None if args.no_progress else tqdm(total=planned, unit="trial", dynamic_ncols=True)

        def progress(name, done, total, best):
            if bar is None:
                return
            bar.n = done
            bar.set_postfix_str(f"{name}" + (f" best {best * 1e6:.1f} us" if best else ""))

        result = tune(tasks, tgt, args.output, trials, manifest,
                      time_budget_s=args.time_budget * 60 if args.time_budget else None,
                      runner=runner, progress=progress)
        if bar is not None:
            bar.close()
        print(task_table(result))
        print(f"wrote {args.output}; use it with dlrm-compile --tuning-log {args.output}")
    except USER_ERRORS as e:
        print(f"dlrm-tune: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
