"""Which model a command line names: a preset, the reference's flags, or a checkpoint.

Shared by every command that takes a model (dlrm-compile, and later dlrm-tune/-bench).
"""

from __future__ import annotations

import argparse
import os

from .arch import PRESETS, Arch, add_arch_args, arch_from_fields, given_fields, parse_dashed
from .checkpoint import load_model
from .model import DLRM

DEFAULT_PRESET = "kaggle"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    add_arch_args(parser)
    parser.add_argument("--load-model", metavar="PATH",
                        help="checkpoint from facebookresearch/dlrm --save-model, a state_dict "
                             "(TorchRec's DLRM, DLRM_DCN, DLRM_Projection too), or a directory "
                             "that torch.distributed.checkpoint or torchsnapshot wrote")
    parser.add_argument("--features-per-table", metavar="N1-N2-...",
                        help="with a TorchRec --load-model whose tables serve several features "
                             "each (an EmbeddingBagConfig's feature_names): how many, per table "
                             "in order; the features then come table by table")
    parser.add_argument("--onnx", metavar="PATH",
                        help="an ONNX export of a DLRM (facebookresearch/dlrm --save-onnx, "
                             "torch.onnx.export with or without dynamo; external data beside it)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random weights when no checkpoint is given")


def tables_too_big(arch: Arch) -> str | None:
    """Why the architecture's float32 tables cannot be held in memory here (more than half
    of it), or None."""
    tables = sum(arch.embedding_sizes) * arch.sparse_feature_size * 4
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if tables <= memory / 2:
        return None
    return (f"its float32 tables ({tables / 1e9:.1f} GB) are more than half this machine's "
            f"memory ({memory / 1e9:.1f} GB)")


def model_from_args(args: argparse.Namespace, log=print, lazy_tables: bool | str = False
                    ) -> tuple[DLRM, Arch]:
    """The eval-mode model and its architecture that ``args`` describe. Random tables are
    left undrawn (``DLRM(lazy_tables=True)``) with ``lazy_tables``, or with "too-big" only
    when they cannot be held in memory (``tables_too_big``); a quantized TorchRec
    checkpoint's tables are left as stored with ``lazy_tables`` (``load_model``)."""
    given = given_fields(args)
    shared = getattr(args, "features_per_table", None)
    if getattr(args, "onnx", None):
        if args.load_model or args.preset or given or shared:
            raise ValueError("--onnx carries its own architecture and weights: give it alone, "
                             "without --load-model, --preset, --features-per-table or --arch-* "
                             "flags")
        from .onnx_import import model_from_onnx
        return model_from_onnx(args.onnx, log)
    if shared and not args.load_model:
        raise ValueError("--features-per-table describes a TorchRec checkpoint's tables: give "
                         "it with --load-model")
    if args.load_model:
        if args.preset:
            given = {**PRESETS[args.preset].to_dict(), **given}
        model = load_model(args.load_model, given,
                           parse_dashed(shared, "--features-per-table") if shared else None,
                           lazy_tables=lazy_tables is True)
        log(f"loaded {args.load_model}: {model.arch.describe()}")
        return model, model.arch
    preset = args.preset
    if preset is None and not given:
        preset = DEFAULT_PRESET
        log(f"no model given: using --preset {preset} with random weights (seed {args.seed})")
    arch = arch_from_fields(given, PRESETS[preset] if preset else None)
    log(f"model: {arch.describe()}")
    if lazy_tables == "too-big":
        lazy_tables = tables_too_big(arch) is not None
    return DLRM(arch, seed=args.seed, lazy_tables=lazy_tables).eval(), arch
