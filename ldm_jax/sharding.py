"""Device mesh and the shardings the trainers and samplers declare.

Issue 2 needs data parallelism only: the batch is split over the `data` axis and parameters are
replicated. Logical axis rules (fsdp, tensor) arrive with the pod-scale issue.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh(mesh_config, devices=None) -> Mesh:
    """A mesh from {axis_name: size}; one size may be -1, meaning "all remaining devices"."""
    devices = jax.devices() if devices is None else devices
    names = tuple(mesh_config.keys())
    sizes = [int(mesh_config[n]) for n in names]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(names, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"{len(devices)} devices do not divide into mesh {dict(zip(names, sizes))}"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}"
        )
    # Auto axes: jit propagates shardings from the declared in/out shardings (GSPMD style).
    return jax.make_mesh(
        tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names), devices=devices
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every mesh axis that carries data."""
    return NamedSharding(mesh, P(tuple(n for n in mesh.axis_names if n in ("data", "fsdp"))))


def global_batch(mesh: Mesh, host_batch: dict) -> dict:
    """Assemble global arrays from this host's slice of the batch (leading dimension)."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), host_batch
    )
