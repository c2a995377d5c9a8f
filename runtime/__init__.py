"""Running a dlrmc artifact with the TVM runtime alone: no torch, no TVM compiler.

    import dlrmc.runtime
    model = dlrmc.runtime.load("kaggle.dlrmc")
    probs = model.predict(dense_x, lS_o, lS_i)     # numpy in, numpy [B, 1] out

Set ``TVM_USE_RUNTIME_LIB=1`` before importing to load only libtvm_runtime.
"""
from .model import CompiledDLRM, load, set_threads
from .validate import InputError

__all__ = ["CompiledDLRM", "InputError", "load", "set_threads"]
