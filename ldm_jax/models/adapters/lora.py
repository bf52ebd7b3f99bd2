"""LoRA: low-rank adapters of Dense and Conv layers (Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models", Sec. 4.1), as peft and diffusers apply them to Stable Diffusion.

A layer with kernel W gets y = W x + (alpha / r) * weight * B(A x): A maps the layer's input to r
channels, B maps those to its output. For a Dense layer A is f32[in, r] and B f32[r, out]; for a
Conv layer A is a conv of the layer's own kernel size, stride and padding to r channels
(f32[kh, kw, in, r]) and B a 1x1 conv (f32[1, 1, r, out]), as peft's `lora.Conv2d`.

An adapter is a parameter tree shaped like the model's own, holding {"lora_A": A, "lora_B": B}
where a targeted layer's {"kernel", ...} is: a trainable parameter group of its own, while the
base parameters stay untouched. Two ways to use it, both pure functions of the trees:

- `intercept(adapters)`: a context manager under which `module.apply` adds every adapter's
  branch to its layers' outputs (flax method interception): the base is not copied, so this is
  the form for training;
- `fuse(params, adapters)`: the base kernels with W + (alpha / r) * weight * A B folded in, for
  sampling at the base model's speed. The base tree is not modified: "unfusing" is using it.

Several adapters at once are a list of `Adapter`s, each with its weight (diffusers'
`set_adapters(names, weights)`): one number, or one per layer, as `block_weights` makes from
diffusers' per-block weights of a U-Net ({"down": ..., "mid": ..., "up": ...}). Targets are diffusers' module names ("to_q", "to_out.0",
"ff.net.0.proj", "conv1", ...): a layer is targeted when its path ends with the name, as peft
matches `target_modules`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

# diffusers' default LoRA targets for the U-Net's attention (train_text_to_image_lora.py).
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
INITS = ("gaussian", "zeros_b")


def target_path(name: str) -> tuple[str, ...]:
    """A diffusers module name as the suffix of a flax module path: "ff.net.0.proj" ->
    ("ff", "net_0", "proj") (a numeric segment joins the name before it)."""
    path: list[str] = []
    for part in name.split("."):
        if part.isdigit() and path:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return tuple(path)


def layer_paths(params) -> list[tuple[str, ...]]:
    """Paths of the Dense / Conv layers (modules with a `kernel`) of `params` (a model's
    variables or its "params" collection), in tree order."""
    tree = params.get("params", params)
    return [path[:-1] for path in traverse_util.flatten_dict(tree) if path[-1] == "kernel"]


def targeted_layers(params, targets: Sequence[str]) -> list[tuple[str, ...]]:
    """The layers of `params` that the target names select, in tree order."""
    suffixes = [target_path(t) for t in targets]
    return [p for p in layer_paths(params) if any(p[-len(s) :] == s for s in suffixes)]


def init(params, targets: Sequence[str], rank: int, key: jax.Array, *, init: str = "gaussian"):
    """A fresh adapter for the targeted layers of `params`: A ~ N(0, 1/r^2) (peft's "gaussian"),
    B = 0, so the adapted model starts equal to the base (Hu et al. 2021, Sec. 4.1).
    Returns {"params": {... layer: {"lora_A", "lora_B"}}}."""
    if init not in INITS:
        raise ValueError(f"unknown LoRA init {init!r}; valid: {', '.join(INITS)}")
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    tree = params.get("params", params)
    flat = traverse_util.flatten_dict(tree)
    layers = targeted_layers(params, targets)
    if not layers:
        raise ValueError(f"no Dense or Conv layer matches the LoRA targets {list(targets)}")
    out = {}
    for i, layer in enumerate(layers):
        kernel = flat[(*layer, "kernel")]
        *window, fan_in, fan_out = kernel.shape
        a_shape = (*window, fan_in, rank)
        b_shape = (*([1] * len(window)), rank, fan_out)
        a = jax.random.normal(jax.random.fold_in(key, i), a_shape, jnp.float32) / rank
        out[(*layer, "lora_A")] = a
        out[(*layer, "lora_B")] = jnp.zeros(b_shape, jnp.float32)
    return {"params": traverse_util.unflatten_dict(out)}


@dataclasses.dataclass(frozen=True)
class Adapter:
    """One adapter as applied: its tree ({"params": {... layer: {"lora_A", "lora_B"}}}), its
    alpha (one value, {layer path: value} as kohya files store it, or None: alpha = rank, as
    diffusers does without metadata) and its weight (diffusers' adapter weight / `lora_scale`:
    one value, or {layer path: value} with 1 for the layers it leaves out, `block_weights`)."""

    params: Any
    alpha: float | Mapping[tuple[str, ...], float] | None = None
    weight: Any = 1.0


def _layers(adapter: Adapter) -> dict[tuple[str, ...], tuple[jax.Array, jax.Array, Any]]:
    """{layer path: (A, B, alpha / r * weight)}."""
    flat = traverse_util.flatten_dict(adapter.params.get("params", adapter.params))
    out = {}
    for path, a in flat.items():
        if path[-1] != "lora_A":
            continue
        layer = path[:-1]
        b = flat[(*layer, "lora_B")]
        rank = a.shape[-1]
        alpha = adapter.alpha
        if isinstance(alpha, Mapping):
            alpha = alpha.get(layer)
        alpha = rank if alpha is None else alpha
        weight = adapter.weight
        if isinstance(weight, Mapping):
            weight = weight.get(layer, 1.0)
        out[layer] = (a, b, alpha / rank * weight)
    return out


def _lora_branch(module: nn.Module, x: jax.Array, a, b) -> jax.Array:
    """B(A x) of one layer, in the layer's compute dtype."""
    dtype = x.dtype
    if isinstance(module, nn.Dense):
        return (x @ a.astype(dtype)) @ b.astype(dtype)
    strides = module.strides or 1
    strides = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
    padding = module.padding
    if isinstance(padding, int):
        padding = ((padding, padding),) * 2
    h = jax.lax.conv_general_dilated(
        x, a.astype(dtype), strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jax.lax.conv_general_dilated(
        h, b.astype(dtype), (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _root(module: nn.Module) -> nn.Module:
    while isinstance(module.parent, nn.Module):
        module = module.parent
    return module


@contextlib.contextmanager
def intercept(adapters: Sequence[Adapter], model: type | None = None):
    """Within this context, `module.apply(...)` adds every adapter's branch to its layers'
    outputs: y = W x + sum over adapters of (alpha / r) * weight * B(A x). Use it inside the
    jitted function, with the adapter trees as its arguments. `model`: only layers inside a
    model of this class (e.g. the U-Net, not the VAE or text encoders applied in the same
    context). Layers no adapter targets run as they are (`check_targets` finds adapter layers
    the model lacks)."""
    layers: dict[tuple[str, ...], list] = {}
    for adapter in adapters:
        for path, value in _layers(adapter).items():
            layers.setdefault(path, []).append(value)

    def interceptor(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.Conv)):
            return y
        found = layers.get(tuple(module.path), ())
        if found and model is not None and not isinstance(_root(module), model):
            return y
        for a, b, scale in found:
            y = y + jnp.asarray(scale, y.dtype) * _lora_branch(module, args[0], a, b)
        return y

    with nn.intercept_methods(interceptor):
        yield


def fuse(params, adapters: Sequence[Adapter]):
    """`params` with every adapter folded into its layers' kernels: W + (alpha / r) * weight *
    A B (a conv's A B contracts the rank: [kh, kw, in, r] x [1, 1, r, out]). A new tree; the
    base is left as it was."""
    check_targets(params, adapters)
    collection = "params" in params
    flat = traverse_util.flatten_dict(params["params"] if collection else params)
    for adapter in adapters:
        for layer, (a, b, scale) in _layers(adapter).items():
            kernel = flat[(*layer, "kernel")]
            delta = jnp.tensordot(a, b.reshape(b.shape[-2:]), axes=1)
            flat[(*layer, "kernel")] = kernel + (scale * delta).astype(kernel.dtype)
    fused = traverse_util.unflatten_dict(flat)
    return {**params, "params": fused} if collection else fused


def check_targets(params, adapters: Sequence[Adapter]) -> None:
    """Every adapter layer must be a Dense / Conv layer of `params` with shapes that fit: a
    ValueError names the layers that are missing (listed) or the first whose shapes do not."""
    flat = traverse_util.flatten_dict(params.get("params", params))
    for i, adapter in enumerate(adapters):
        layers = _layers(adapter)
        missing = ["/".join(p) for p in layers if (*p, "kernel") not in flat]
        if missing:
            raise ValueError(f"adapter {i}: {len(missing)} layers not in the model: {missing}")
        for path, (a, b, _) in layers.items():
            kernel = flat[(*path, "kernel")].shape
            fits = a.shape[:-1] == kernel[:-1] and b.shape[-1] == kernel[-1]
            fits = fits and a.shape[-1] == b.shape[-2] and a.ndim == b.ndim == len(kernel)
            if not fits:
                raise ValueError(
                    f"adapter {i}: {'/'.join(path)} has lora_A {tuple(a.shape)} and lora_B "
                    f"{tuple(b.shape)}, which do not fit its kernel {tuple(kernel)}"
                )


def block_weights(layers: Sequence[tuple[str, ...]], weights, default: float = 1.0) -> dict:
    """diffusers' per-block LoRA weights of a U-Net (`set_adapters(name, {"unet": weights})`)
    as {layer path: weight} for `layers` (the U-Net's Dense / Conv layer paths).

    weights: {"down": ..., "mid": ..., "up": ...}, expanded as diffusers does
    (`unet.expand_block_scales`: a number per direction, or {"block_i": a number or one per
    attention module}). A weight belongs to an attention module `attentions_j` of a block and,
    as peft applies diffusers' dict (`get_module_weight`), also to the block's `resnets_j` and
    (j = 0) its down/upsampler. The default goes to the mid block's resnets, to blocks without
    attention and to layers outside the blocks (conv_in, the time embedding, conv_out), for
    which diffusers raises an IndexError instead.
    """
    from ldm_jax.models.unet import expand_block_scales

    if not isinstance(weights, Mapping):
        return {tuple(p): float(weights) for p in layers}
    attentions: dict[str, dict[int, set]] = {"down": {}, "up": {}}
    for path in layers:
        for where in attentions:
            if path[0].startswith(f"{where}_blocks_"):
                block = attentions[where].setdefault(int(path[0].rsplit("_", 1)[1]), set())
                if len(path) > 1 and path[1].startswith("attentions_"):
                    block.add(path[1])
    counts = {
        w: [len(b.get(i, ())) for i in range(max(b, default=-1) + 1)] for w, b in attentions.items()
    }
    scales = expand_block_scales(dict(weights), counts, default, "LoRA block weights")
    out = {}
    for path in map(tuple, layers):
        out[path] = default
        if path[:2] == ("mid_block", "attentions_0"):
            out[path] = scales["mid"]
        where = path[0].split("_blocks_")[0]
        if where not in ("down", "up") or len(path) < 2:
            continue
        values = scales[where][int(path[0].rsplit("_", 1)[1])]
        kind, _, j = path[1].rpartition("_")
        j = {"attentions": j, "resnets": j, "downsamplers": "0", "upsamplers": "0"}.get(kind)
        if j is not None and int(j) < len(values):
            out[path] = values[int(j)]
    return out


def num_params(adapter_params) -> int:
    return sum(x.size for x in jax.tree.leaves(adapter_params))
