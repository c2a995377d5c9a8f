"""Numeric options of a build: MLP precision, int8 MLP quantisation and its calibration.

``--precision`` (fp32 | bf16 | fp16) is the type the dense layers and the dot interaction
multiply in (accumulating in fp32); ``--mlp-quant int8`` makes the dense layers int8
(``dlrmc.schedules.dense_lowp``), which needs the range of every dense layer's input: the
calibration runs the captured program in PyTorch on sample batches and records, per
``dlrmc::linear`` node, the smallest and largest input value (min/max calibration, as
PyTorch's MinMaxObserver). Inputs are quantised to uint8 with a scale and zero point that map
that range (widened to include 0) onto 0..255.
"""

from __future__ import annotations

import math

import torch
from torch.export.graph_signature import InputKind

from ..frontend.ops import flat_layout

PRECISIONS = ("fp32", "bf16", "fp16")
MLP_QUANTS = ("int8",)
CALIBRATION_ROWS = 4096     # training rows a calibration runs on by default


def activation_qparams(lo: float, hi: float) -> tuple[float, int]:
    """(scale, zero point) of uint8 codes covering [min(lo, 0), max(hi, 0)]."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"calibration saw a non-finite dense-layer input ({lo}, {hi})")
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    return scale, int(min(max(round(-lo / scale), 0), 255))


def linear_input_ranges(ep: torch.export.ExportedProgram, batches) -> dict[str, tuple]:
    """{dlrmc::linear or cross_linear node name: (min, max) of its input} over ``batches``
    (dense_x, lS_o, [lS_i_k], the reference layout) run through ``ep``'s graph (flat inputs)
    in PyTorch."""
    ranges: dict[str, tuple[float, float]] = {}
    linears = (torch.ops.dlrmc.linear.default, torch.ops.dlrmc.cross_linear.default)

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            if n.op == "call_function" and n.target in linears:
                x = self.env[n.args[0]]
                lo, hi = ranges.get(n.name, (math.inf, -math.inf))
                ranges[n.name] = (min(lo, float(x.min())), max(hi, float(x.max())))
            return super().run_node(n)

    seen = 0
    for dense, offsets, indices in batches:
        user = iter([torch.as_tensor(dense)]
                    + [torch.from_numpy(a) for a in flat_layout(offsets, indices)])
        args = []
        for spec in ep.graph_signature.input_specs:
            if spec.kind == InputKind.USER_INPUT:
                args.append(next(user))
            elif spec.kind == InputKind.CONSTANT_TENSOR:
                args.append(ep.constants[spec.target])
            else:
                args.append(ep.state_dict[spec.target])
        with torch.no_grad():
            Recorder(ep.graph_module).run(*args)
        seen += 1
    if not seen:
        raise ValueError("--mlp-quant int8 needs calibration batches (--calibration-data)")
    return ranges
