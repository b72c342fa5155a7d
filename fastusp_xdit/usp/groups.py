"""Ulysses and ring process groups from a DeviceMesh, laid out as yunchang and xfuser lay them out.

Mesh dims ``(replica, ring, ulysses)`` in row-major rank order: Ulysses groups are contiguous ranks,
ring groups strided by the Ulysses degree, and each replica (CFG / data parallel) has its own groups.
"""
from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh


def usp_groups(ulysses: int, ring: int, device_type: str = "cpu"):
    """Return ``(ulysses_group, ring_group)`` for this rank; a degree of 1 gives ``None``.

    Must be called by every rank with the same arguments (it creates process groups).
    """
    world = dist.get_world_size()
    if ulysses < 1 or ring < 1 or world % (ulysses * ring):
        raise ValueError(f"ulysses ({ulysses}) x ring ({ring}) must be >= 1 and divide the world size {world}")
    mesh = init_device_mesh(device_type, (world // (ulysses * ring), ring, ulysses),
                            mesh_dim_names=("replica", "ring", "ulysses"))
    return (mesh.get_group("ulysses") if ulysses > 1 else None,
            mesh.get_group("ring") if ring > 1 else None)
