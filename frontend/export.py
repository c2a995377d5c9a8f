"""Capture a DLRM with ``torch.export``: dynamic batch and dynamic index count.

The exported signature is ``(dense_x [B, F], indices [N], offsets [T*B+1])``: the flat
sparse layout of FBGEMM's table-batched embedding bags (``dlrmc.frontend.ops``), so a batch
crosses into the compiled code as three tensors however many tables, and one program serves
any batch size and any number of indices.
"""

from __future__ import annotations

import numpy as np
import torch

from .arch import Arch
from .model import FlatDLRM
from .ops import flat_layout

# torch.export specialises sizes 0 and 1, so the example sizes it traces with are larger.
EXAMPLE_BATCH = 4


def example_batch(arch: Arch, batch: int = EXAMPLE_BATCH, seed: int = 0):
    """A small valid batch (torch tensors) in the reference layout: bags of 1 to 3 indices."""
    rng = np.random.default_rng(seed)
    dense = torch.from_numpy(rng.random((batch, arch.num_dense), dtype=np.float32))
    offsets, indices = [], []
    for rows in arch.embedding_sizes:
        sizes = rng.integers(1, 4, batch)
        offsets.append(np.concatenate([[0], np.cumsum(sizes)[:-1]]))
        indices.append(torch.from_numpy(rng.integers(0, rows, int(sizes.sum()))))
    return dense, torch.from_numpy(np.stack(offsets)), tuple(indices)


def example_inputs(arch: Arch, batch: int = EXAMPLE_BATCH, seed: int = 0):
    """``example_batch`` in the exported (flat) layout: (dense_x, indices, offsets)."""
    dense, lS_o, lS_i = example_batch(arch, batch, seed)
    return (dense, *(torch.from_numpy(a) for a in flat_layout(lS_o.numpy(), lS_i)))


def export_model(model: torch.nn.Module, arch: Arch) -> torch.export.ExportedProgram:
    """torch.export the model's flat forward (``FlatDLRM``) with a symbolic batch and a
    symbolic index count."""
    batch = torch.export.Dim("batch", min=1)
    dims = {"dense_x": {0: batch}, "indices": {0: torch.export.Dim("indices", min=0)},
            "offsets": {0: arch.num_tables * batch + 1}}
    model = FlatDLRM(model.eval())
    with torch.no_grad():
        return torch.export.export(model, example_inputs(arch), dynamic_shapes=dims)
