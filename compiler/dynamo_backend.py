"""The TorchDynamo backend: ``torch.compile(model, backend="dlrmc", options={"target": ...})``.

Registered through the ``torch_dynamo_backends`` entry point. Each graph Dynamo hands over
is captured again with ``torch.export`` at its example shapes and goes through the same
lowering and build as ``dlrm-compile``. Compiled modules are cached by graph code, weights,
target and input shapes/dtypes; a new shape compiles once more. A graph dlrmc cannot lower
(or inputs off the CPU) runs eagerly instead, with a warning naming the reason.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import tvm
from tvm import relax

from ..runtime import set_threads
from ..runtime.model import to_tvm
from ..targets import parse_target
from .build import TRANSFORM_PARAMS, build
from .lower import lower

_CACHE: dict = {}


def _signature(inputs) -> tuple:
    return tuple((tuple(t.shape), str(t.dtype)) if isinstance(t, torch.Tensor) else ("scalar", t)
                 for t in inputs)


def _weights_key(gm: torch.fx.GraphModule) -> tuple:
    return tuple((name, t.data_ptr(), t._version)
                 for name, t in list(gm.named_parameters()) + list(gm.named_buffers()))


class _Compiled:
    """One graph compiled for one input signature; called with the flat graph inputs."""

    def __init__(self, gm: torch.fx.GraphModule, inputs, target: tvm.target.Target):
        with torch.no_grad():
            ep = torch.export.export(gm, tuple(inputs), strict=False)
        lowered = lower(ep, target, unwrap_single_output=False)
        set_threads()
        self.vm = relax.VirtualMachine(build(lowered, target), tvm.cpu())
        weights = [tvm.runtime.tensor(p) for p in lowered.params]
        self.params = list(self.vm[TRANSFORM_PARAMS](weights))

    def __call__(self, *inputs):
        args = to_tvm([t.detach().numpy() for t in inputs])
        out = self.vm["main"](*args, *self.params)
        return tuple(torch.from_dlpack(o) for o in out)


def dlrmc_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None,
                  **_: object) -> Callable:
    """Dynamo backend entry; ``options={"target": "llvm -mcpu=..."}`` (default: host CPU)."""
    target_text = (options or {}).get("target", "host")
    target = parse_target(target_text)
    key = (gm.code, str(target), _weights_key(gm))

    def fallback(reason: str) -> Callable:
        warnings.warn(f"dlrmc: running this graph eagerly: {reason}", stacklevel=2)
        return gm.forward

    if any(not isinstance(t, torch.Tensor) for t in example_inputs):
        return fallback("it takes symbolic or scalar inputs (compile with dynamic=False)")
    if any(t.device.type != "cpu" for t in example_inputs):
        return fallback("its inputs are not on the CPU")

    def compiled_for(inputs) -> _Compiled | Callable:
        k = key + (_signature(inputs),)
        if k not in _CACHE:
            try:
                _CACHE[k] = _Compiled(gm, inputs, target)
            except Exception as e:  # noqa: BLE001 - any lowering failure falls back
                _CACHE[k] = fallback(f"{type(e).__name__}: {e}")
        return _CACHE[k]

    compiled_for(example_inputs)

    def run(*inputs):
        return compiled_for(inputs)(*inputs)

    return run
