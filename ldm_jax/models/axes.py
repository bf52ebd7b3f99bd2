"""Logical axis names of the parameters of every model here (U-Net, VAE, CLIP text encoder).

The parameter trees follow diffusers' / transformers' module names (see layers.py), so the role of
a parameter is told by its path: `.../attn1/to_q/kernel` is an attention input projection
wherever it appears, in `params`, in the EMA copy or in the optimizer's moment trees. The config
maps these logical names to mesh axes (`ldm_jax.sharding`), as t5x / MaxText do:

  embed     the width a layer reads from the residual stream (the usual FSDP axis)
  heads     heads * dim_head of the attention projections: q/k/v split by columns, the output
            projection by rows (Megatron-LM tensor parallelism, Shoeybi et al. 2019, Sec. 3)
  mlp       the feed-forward hidden width (GEGLU / CLIP MLP), split the same way
  conv_in, conv_out   input / output channels of a convolution kernel [kh, kw, in, out]
  vocab     token-embedding rows
Anything else (norm scales and biases, the time embedding's biases, scalars) is `None`: too small
to be worth splitting, replicated.

Activations are named at block boundaries in the modules (`ldm_jax.sharding.constrain`) with
`batch` plus the names above, so the compiler keeps the batch split over the data axes (FSDP
gathers parameters, not activations) and attention / MLP internals split over heads / mlp.
"""

from __future__ import annotations

import re

import jax

# (regex on the "/"-joined path of a kernel, logical axes); the first match wins. Biases take the
# output axis of their sibling kernel.
KERNEL_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"(to_q|to_k|to_v|q_proj|k_proj|v_proj)$", ("embed", "heads")),
    (r"(to_out_0|out_proj)$", ("heads", "embed")),
    (r"(net_0/proj|fc1)$", ("embed", "mlp")),
    (r"(net_2|fc2)$", ("mlp", "embed")),
)
EMBEDDING_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"token_embedding$", ("vocab", "embed")),
    (r"position_embedding$", (None, "embed")),
)


def _kernel_axes(module_path: str, ndim: int) -> tuple[str | None, ...]:
    if ndim == 4:  # every convolution: [kh, kw, in, out]
        return (None, None, "conv_in", "conv_out")
    if ndim == 2:
        for pattern, axes in KERNEL_RULES:
            if re.search(pattern, module_path):
                return axes
        return ("embed", None)  # other linear layers: time / text projections, proj_in/out
    return (None,) * ndim


def _path_str(path) -> str:
    parts = []
    for p in path:
        key = getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))
        parts.append(str(key))
    return "/".join(parts)


def logical_axes(tree):
    """A tree like `tree` whose leaves are tuples of logical axis names (or None), one per
    dimension of the leaf. Works on params, EMA params, optax states, TrainStates, and
    `jax.eval_shape` outputs alike: only paths and shapes are read."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [_path_str(path) for path, _ in leaves]
    shapes = {p: tuple(getattr(leaf, "shape", ())) for p, (_, leaf) in zip(paths, leaves)}
    out = []
    for path in paths:
        shape = shapes[path]
        module, _, name = path.rpartition("/")
        axes: tuple[str | None, ...] = (None,) * len(shape)
        if name == "kernel":
            axes = _kernel_axes(module, len(shape))
        elif name == "bias" and len(shape) == 1:
            kernel = shapes.get(f"{module}/kernel")
            if kernel is not None:
                axes = (_kernel_axes(module, len(kernel))[-1],)
        elif name == "embedding" and len(shape) == 2:
            axes = next((a for p, a in EMBEDDING_RULES if re.search(p, module)), (None, "embed"))
        out.append(axes)
    return jax.tree_util.tree_unflatten(treedef, out)
