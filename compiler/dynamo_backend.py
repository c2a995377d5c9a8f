"""The TorchDynamo backend: ``torch.compile(model, backend="dlrmc", options={"target": ...})``.

Registered through the ``torch_dynamo_backends`` entry point. Each graph Dynamo hands over
is captured again with ``torch.export`` at its example shapes and goes through the same
lowering and build as ``dlrm-compile``. Compiled modules are cached by graph code, weights,
target and input shapes/dtypes; a new shape compiles once more, also when Dynamo has made
the graph dynamic (its size inputs are fixed to each call's values). A graph dlrmc cannot lower
(or inputs off the CPU) runs eagerly instead, with a warning naming the reason. The graph
runs on its target's device (inputs copied there and outputs back where they are not the
CPU); a target whose code this machine cannot run (``-mcpu=skylake-avx512`` on an AVX2-only
CPU, a CUDA target without a GPU) is refused with the runtime's ``ArtifactError`` before
anything is compiled: running it would die of SIGILL.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import tvm
from tvm import relax

from ..runtime import set_threads
from ..runtime.devices import device_for, is_host
from ..runtime.model import to_tvm
from ..targets import parse_target, requirements, target_text
from .build import TRANSFORM_PARAMS, build
from .lower import lower

_CACHE: dict = {}


def _signature(inputs) -> tuple:
    return tuple((tuple(t.shape), str(t.dtype)) if isinstance(t, torch.Tensor) else ("scalar", t)
                 for t in inputs)


def _weights_key(gm: torch.fx.GraphModule) -> tuple:
    return tuple((name, t.data_ptr(), t._version)
                 for name, t in list(gm.named_parameters()) + list(gm.named_buffers()))


class _SizesFixed(torch.nn.Module):
    """The graph with its int inputs (sizes Dynamo made symbolic) fixed to one call's values,
    so that torch.export and TVM see tensors only."""

    def __init__(self, gm: torch.fx.GraphModule, inputs):
        super().__init__()
        self.gm = gm
        self.fixed = {k: v for k, v in enumerate(inputs) if not isinstance(v, torch.Tensor)}
        self.count = len(inputs)

    def forward(self, *tensors):
        rest = iter(tensors)
        return self.gm(*[self.fixed[k] if k in self.fixed else next(rest)
                         for k in range(self.count)])


def _as_tvm(t: torch.Tensor, device) -> tvm.runtime.Tensor:
    """On ``device``; zero-copy where TVM can take the memory (Dynamo passes the weights in
    every call)."""
    t = t.detach()
    if not is_host(device):
        return tvm.runtime.tensor(t.contiguous().numpy(), device)
    if t.is_contiguous() and t.numel() and t.data_ptr() % 64 == 0:
        return tvm.runtime.from_dlpack(t)
    return to_tvm([t.contiguous().numpy()])[0]


class _Compiled:
    """One graph compiled for one input signature; called with the graph's inputs."""

    def __init__(self, gm: torch.fx.GraphModule, inputs, target: tvm.target.Target, device):
        tensors = tuple(t for t in inputs if isinstance(t, torch.Tensor))
        module = gm if len(tensors) == len(inputs) else _SizesFixed(gm, inputs)
        with torch.no_grad():
            ep = torch.export.export(module, tensors, strict=False)
        lowered = lower(ep, target, unwrap_single_output=False)
        set_threads()
        self.device = device
        self.vm = relax.VirtualMachine(build(lowered, target)[0], device)
        weights = [tvm.runtime.tensor(p, device) for p in lowered.params]
        self.params = list(self.vm[TRANSFORM_PARAMS](weights))

    def __call__(self, *inputs):
        args = [_as_tvm(t, self.device) for t in inputs if isinstance(t, torch.Tensor)]
        out = self.vm["main"](*args, *self.params)
        return tuple(torch.from_dlpack(o).cpu() for o in out)   # where the inputs were


def dlrmc_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None,
                  **_: object) -> Callable:
    """Dynamo backend entry; ``options={"target": "llvm -mcpu=..."}`` (default: host CPU)."""
    target = parse_target((options or {}).get("target", "host"))
    device = device_for(requirements(target), f"code for {target_text(target)}")
    key = (gm.code, str(target), _weights_key(gm))

    def fallback(reason: str) -> Callable:
        warnings.warn(f"dlrmc: running this graph eagerly: {reason}", stacklevel=2)
        return gm.forward

    if any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in example_inputs):
        return fallback("its inputs are not on the CPU")

    def compiled_for(inputs) -> _Compiled | Callable:
        k = key + (_signature(inputs),)
        if k not in _CACHE:
            try:
                _CACHE[k] = _Compiled(gm, inputs, target, device)
            except Exception as e:  # noqa: BLE001 - any lowering failure falls back
                _CACHE[k] = fallback(f"{type(e).__name__}: {e}")
        return _CACHE[k]

    # A graph Dynamo made dynamic takes its sizes as int inputs; its example holds symbols, so
    # it is compiled per concrete size at the first call with that size.
    if all(isinstance(t, torch.Tensor) for t in example_inputs):
        compiled_for(example_inputs)

    def run(*inputs):
        return compiled_for(inputs)(*inputs)

    return run
