"""One backend per target family: everything about a target that the compiler, the runtimes
and the torch.compile backend need to decide, asked here and nowhere else.

In the spirit of Glow's ``Backend`` and dlight's rules that say themselves whether they
apply: each backend says whether it ``matches`` a target, which converter family lowers for
it (``lowering``, a name ``dlrmc.compiler.lower`` looks up), how its module is built and its
library written, what the machine that runs it needs (``requirements``, which the manifest
records and the runtimes check: ``device`` says which device it runs on), and which options it
refuses (``refuses``: one table, one message each). Backends are tried newest first, so a
module that ``register``s one takes the targets it matches. Adding a target family means
adding one module here.
"""

from __future__ import annotations

from typing import Callable

import tvm
from tvm.target import Target

from .parse import TargetError


class Backend:
    """The shape every backend has; subclasses fill it in."""

    name = "?"
    device = "cpu"           # what the artifact runs on: "cpu" or "cuda"
    lowering = "cpu"         # the converter family compiler.lower uses for it
    refuses: dict[str, str] = {}   # option (dlrm-compile's flag) -> why it is refused

    def matches(self, target: Target) -> bool:
        raise NotImplementedError

    def check_options(self, **options) -> None:
        """A ``TargetError`` for the first option set that this backend refuses."""
        for option, value in options.items():
            if value and option in self.refuses:
                raise TargetError(self.refuses[option])

    def check_tools(self, target: Target) -> None:
        """Fail before a long build when a tool the library needs is missing."""

    def requirements(self, target: Target) -> dict:
        """What a machine needs to run the code: ``device`` (TVM's name) and ``device_type``
        (its DLPack number, what the C++ runtime reads), and what it checks there."""
        return {"device": self.device,
                "device_type": int(tvm.device(self.device).dlpack_device_type())}

    def build(self, mod: tvm.IRModule, target: Target, tuning_log: str | None,
              expect: dict | None, log: Callable[[str], None]):
        """The lowered module compiled for ``target``: (executable, tuning summary)."""
        raise NotImplementedError

    def export_library(self, module, target: Target, path: str,
                       workspace: str | None = None) -> None:
        raise NotImplementedError


BACKENDS: list[Backend] = []


def register(backend: Backend) -> Backend:
    """Add ``backend``; it is asked before those registered earlier."""
    BACKENDS.insert(0, backend)
    return backend


def unregister(backend: Backend) -> None:
    BACKENDS.remove(backend)


def backend_for(target: Target) -> Backend:
    """The backend that builds for ``target``."""
    for backend in BACKENDS:
        if backend.matches(target):
            return backend
    raise TargetError(f"dlrmc does not build for target kind {target.kind.name!r}; its "
                      f"backends: {', '.join(b.name for b in BACKENDS)}")
