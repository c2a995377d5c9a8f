"""Capture a DLRM with ``torch.export``: dynamic batch and dynamic index counts per table.

The exported signature is ``(dense_x [B, D], lS_o [T, B], lS_i_0 [N_0], .., lS_i_{T-1})``:
the reference's layout with the index list spelled out, so one program serves any batch size
and any number of indices per table.
"""

from __future__ import annotations

import numpy as np
import torch

from .arch import Arch

# torch.export specialises sizes 0 and 1, so the example sizes it traces with are larger.
EXAMPLE_BATCH = 4


def example_inputs(arch: Arch, batch: int = EXAMPLE_BATCH, seed: int = 0):
    """A small valid batch (torch tensors) in the exported layout: bags of 1 to 3 indices."""
    rng = np.random.default_rng(seed)
    dense = torch.from_numpy(rng.random((batch, arch.num_dense), dtype=np.float32))
    offsets, indices = [], []
    for rows in arch.embedding_sizes:
        sizes = rng.integers(1, 4, batch)
        offsets.append(np.concatenate([[0], np.cumsum(sizes)[:-1]]))
        indices.append(torch.from_numpy(rng.integers(0, rows, int(sizes.sum()))))
    return dense, torch.from_numpy(np.stack(offsets)), tuple(indices)


def export_model(model: torch.nn.Module, arch: Arch) -> torch.export.ExportedProgram:
    """torch.export the model with a symbolic batch and symbolic index counts."""
    batch = torch.export.Dim("batch", min=1)
    dims = {
        "dense_x": {0: batch},
        "lS_o": {1: batch},
        "lS_i": tuple({0: torch.export.Dim(f"indices_{k}", min=0)} for k in range(arch.num_tables)),
    }
    model = model.eval()
    with torch.no_grad():
        return torch.export.export(model, example_inputs(arch), dynamic_shapes=dims)
