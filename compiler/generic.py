"""ONNX graphs dlrmc does not read as a DLRM: TVM's generic path, into the same artifact format.

``dlrmc.frontend.onnx_import`` rebuilds a DLRM it recognises and everything else here goes
through TVM's Relax ONNX frontend (initializers kept as parameters, so the weights still go to
``weights.bin``, never into the code) and Relax's default lowering with TVM's default
schedules: correct, but none of our kernels, buckets or tuning, so slow. The artifact's
manifest has ``"arch": null`` and ``"generic": {...}``, and lists the graph's own inputs and
outputs; ``dlrmc.runtime.load`` gives a ``GenericModel`` for it.
"""

from __future__ import annotations


import numpy as np
import onnx
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from ..artifact import Manifest, write_artifact
from ..frontend.onnx_import import OnnxImportError, graph_inputs
from ..targets import backend_for, parse_target
from .build import export_library, target_record


def _value_info(v: onnx.ValueInfoProto) -> dict:
    t = v.type.tensor_type
    return {"name": v.name, "dtype": str(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)),
            "shape": [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                      for d in t.shape.dim]}


def compile_generic(model: onnx.ModelProto, target: str | None, out_dir: str, reason: str,
                    log=print) -> dict:
    """Compile ``model`` through TVM's Relax ONNX frontend into an artifact; ``reason``:
    why it is not a recognised DLRM (kept in the manifest)."""
    tgt = parse_target(target)
    backend_for(tgt).check_tools(tgt)     # a missing cross compiler fails before the build
    try:
        mod = from_onnx(model, keep_params_in_input=True)
    except Exception as e:  # noqa: BLE001 - the frontend raises many types for what it lacks
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise OnnxImportError(f"TVM's generic ONNX frontend cannot import the graph either: "
                              f"{first[:300]}") from e
    mod, detached = relax.frontend.detach_params(mod)
    main = mod["main"]
    num_inputs = int(main.attrs["num_input"]) if main.attrs and "num_input" in main.attrs \
        else len(main.params) - len(detached.get("main", []))
    names = [p.name for p in main.params[num_inputs:]]
    params = [np.from_dlpack(t) for t in detached.get("main", [])]
    log("[dlrmc] generic: TVM's ONNX frontend and default schedules")
    executable = tvm.compile(mod, tgt)
    manifest = Manifest(arch=None, generic={"reason": reason}, entry="main",
                        inputs=[_value_info(v) for v in graph_inputs(model)],
                        outputs=[_value_info(v) for v in model.graph.output],
                        target=target_record(target, tgt))
    return write_artifact(out_dir, lambda path, workspace: export_library(
        executable, tgt, path, workspace), zip(names, params), manifest)
