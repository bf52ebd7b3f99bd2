"""Device mesh, and logical axis names -> mesh shardings (the one place that translates them).

A config declares the mesh (`config.mesh`, axis name -> size, -1 = the rest) and the rules
(`config.sharding_rules`, logical name -> mesh axis or axes, the first applicable rule wins).
Parameters get logical names from `ldm_jax.models.axes` and activations from `constrain` calls
in the modules, so one model runs data-parallel, FSDP (ZeRO-3: parameters, gradients and
optimizer state split over `fsdp`) or tensor-parallel by changing the config alone:

  mesh {"data": -1}                      data parallel, everything replicated
  mesh {"data": 2, "fsdp": 4}            batch over data x fsdp; "embed" / "conv_in" over fsdp
  mesh {"data": 4, "tensor": 2}          "heads" / "mlp" / "conv_out" over tensor (Megatron)

A dimension that the mesh axes do not divide stays unsplit (tiny test models, 4 latent channels),
so every rule set is valid for every model; a mesh axis is used at most once per array.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# Batch over every data-carrying axis; FSDP splits the input width of each layer, tensor
# parallelism the attention heads, MLP hidden units and convolution outputs. Token embeddings
# split their width, not their rows ("vocab"): a lookup in a row-split table made XLA's SPMD
# partitioner replicate the whole gather ("involuntary full rematerialization").
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("conv_in", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("conv_out", "tensor"),
)


def _resolve_sizes(names, sizes, count: int, what: str) -> list[int]:
    """Replace one -1 in `sizes` by what makes their product `count`; check the product."""
    sizes = list(sizes)
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one {what} axis may be -1, got {dict(zip(names, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if count % known:
            raise ValueError(f"{count} devices do not divide into {what} {dict(zip(names, sizes))}")
        sizes[sizes.index(-1)] = count // known
    if math.prod(sizes) != count:
        raise ValueError(
            f"{what} {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, have {count}"
        )
    return sizes


def make_mesh(mesh_config, devices=None, num_devices: int = 0, dcn_mesh=None) -> Mesh:
    """A mesh from {axis_name: size}; one size may be -1, meaning "all remaining devices".

    num_devices > 0 uses only the first that many devices (single-device references in tests).
    Devices are ordered by `jax.make_mesh`, which keeps the innermost axes within a host / slice
    (so "tensor" and "fsdp" traffic stays on the fastest links when listed last).

    dcn_mesh ({axis_name: size}, the same names) makes a hybrid mesh for several TPU slices or
    GPU hosts: `mesh_config` is then the mesh *within* one slice (ICI, or NVLink within a host)
    and each axis is `dcn_mesh[axis]` times longer, its outer factor across slices over the
    slower data-center network. Put only "data" (or "fsdp") across slices, e.g. mesh
    {"data": 1, "fsdp": -1} and dcn_mesh {"data": 4} for 4 slices. Slices are told apart by the
    devices' `slice_index` (multi-slice TPU), or else by process (a host per granule).
    """
    devices = jax.devices() if devices is None else list(devices)
    if num_devices:
        devices = devices[:num_devices]
    names = tuple(mesh_config.keys())
    dcn = {k: int(v) for k, v in dict(dcn_mesh or {}).items()}
    if unknown := set(dcn) - set(names):
        raise ValueError(f"dcn_mesh axes {sorted(unknown)} are not mesh axes {list(names)}")
    dcn_sizes = [dcn.get(n, 1) for n in names]
    if any(s < 1 for s in dcn_sizes):
        raise ValueError(f"dcn_mesh sizes must be >= 1, got {dcn}")
    granules = math.prod(dcn_sizes)
    if len(devices) % granules:
        raise ValueError(f"{len(devices)} devices do not split into dcn_mesh {dcn}")
    sizes = [int(mesh_config[n]) for n in names]
    sizes = _resolve_sizes(names, sizes, len(devices) // granules, "mesh")
    axis_types = (AxisType.Auto,) * len(names)  # jit propagates shardings (GSPMD style)
    if granules == 1:
        return jax.make_mesh(tuple(sizes), names, axis_types=axis_types, devices=devices)
    from jax.experimental import mesh_utils

    # Multi-slice TPUs number their slices; elsewhere (GPU hosts, CPU processes) every device
    # may report slice 0, and the process is the granule.
    slices = {getattr(d, "slice_index", None) for d in devices}
    by_slice = None not in slices and len(slices) > 1
    array = mesh_utils.create_hybrid_device_mesh(
        sizes, dcn_sizes, devices, process_is_granule=not by_slice, allow_split_physical_axes=True
    )
    return Mesh(array, names, axis_types=axis_types)


def mesh_from_config(config) -> Mesh:
    """The mesh of `config.mesh` (and `config.dcn_mesh` across slices / hosts), on the first
    `config.mesh_num_devices` devices if that is > 0."""
    return make_mesh(
        config.mesh,
        num_devices=config.get("mesh_num_devices", 0),
        dcn_mesh=config.get("dcn_mesh", None),
    )


def inference_mesh(config) -> Mesh:
    """The training mesh if it fits the devices here, else data parallel over all of them: a run
    trained on a pod (e.g. mesh fsdp=64 over 4 slices) still samples on a workstation."""
    try:
        return mesh_from_config(config)
    except ValueError as e:
        logging.warning("sampling data-parallel: the training mesh does not fit here (%s)", e)
        return make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


def rules_from_config(config) -> tuple:
    """config.sharding_rules (a sequence of (logical, mesh axes)), or DEFAULT_RULES."""
    rules = config.get("sharding_rules", None) if hasattr(config, "get") else None
    if not rules:
        return DEFAULT_RULES
    out = []
    for rule in rules:
        if len(rule) != 2:
            raise ValueError(f"a sharding rule is (logical_name, mesh_axes), got {rule!r}")
        name, axes = rule
        out.append((str(name), tuple(axes) if isinstance(axes, list | tuple) else axes))
    return tuple(out)


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules) -> P:
    """The PartitionSpec of an array of `shape` whose dimensions have logical names `axes`.

    For each named dimension the first rule whose mesh axes exist in `mesh` (size > 1), are not
    used yet in this spec and divide the dimension is taken; otherwise it stays unsplit.
    """
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        chosen = None
        for logical, mesh_axes in rules if name is not None else ():
            if logical != name or mesh_axes is None:
                continue
            group = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
            group = tuple(a for a in group if a in mesh.shape and mesh.shape[a] > 1)
            if not group or used & set(group):
                continue
            if size % math.prod(mesh.shape[a] for a in group):
                continue
            chosen = group
            break
        if chosen:
            used.update(chosen)
            spec.append(chosen[0] if len(chosen) == 1 else chosen)
        else:
            spec.append(None)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def tree_shardings(tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for every leaf of `tree` (params, a TrainState, `jax.eval_shape` output)
    from the logical names of `ldm_jax.models.axes.logical_axes`."""
    from ldm_jax.models.axes import logical_axes  # models import this module for `constrain`

    names = logical_axes(tree)
    return jax.tree.map(
        lambda leaf, axes: NamedSharding(mesh, spec_for(axes, np.shape(leaf), mesh, rules)),
        tree,
        names,
    )


def avoid_shardy_conv_gradient_bug(mesh: Mesh) -> bool:
    """Switch jit to the GSPMD partitioner when `mesh` splits data, fsdp and tensor all at once.

    jax 0.10.2's default partitioner, Shardy, gets convolution kernel gradients wrong on such a
    mesh: two chained convolutions whose kernels are split (fsdp, tensor) over their
    (input, output) channels, on a batch split over data x fsdp, give a first-kernel gradient
    off by ~100% (any two of the three axes are exact; GSPMD is exact on all of them; see
    tests/test_sharding.py). The switch is process-wide (`jax_use_shardy_partitioner`) and
    logged; GSPMD prints a deprecation warning. Returns whether it switched.
    """
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    if not all(sizes.get(a, 1) > 1 for a in MESH_AXES) or not jax.config.jax_use_shardy_partitioner:
        return False
    logging.getLogger("ldm_jax").warning(
        "mesh %s splits data, fsdp and tensor: using the GSPMD partitioner, since Shardy "
        "(jax %s) computes wrong convolution gradients on such meshes",
        sizes,
        jax.__version__,
    )
    jax.config.update("jax_use_shardy_partitioner", False)
    return True


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(n for n in mesh.axis_names if n in ("data", "fsdp"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every mesh axis that carries data."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


def global_batch(mesh: Mesh, host_batch: dict) -> dict:
    """Assemble global arrays from this host's slice of the batch (leading dimension)."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), host_batch
    )


# ---------------------------------------------------------------- activation constraints
_ACTIVATION_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("activations", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules=DEFAULT_RULES):
    """While tracing inside this context, `constrain` pins activations to `mesh` by `rules`.
    Outside one (sampling, tests, the converters) `constrain` does nothing."""
    token = _ACTIVATION_CONTEXT.set(None if mesh is None else (mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVATION_CONTEXT.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`jax.lax.with_sharding_constraint` by logical names (one per dimension of x), e.g.
    `constrain(h, ("batch", None, None, None))`; a no-op outside `activation_sharding`."""
    context = _ACTIVATION_CONTEXT.get()
    if context is None:
        return x
    mesh, rules = context
    if mesh.size == 1:
        return x
    spec = spec_for(axes, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
