"""The PyTorch <-> Flax parameter naming rule of ldm_jax's models, and strict conversion.

The models name every submodule after its diffusers / transformers counterpart, so the mapping is
mechanical: a PyTorch key `down_blocks.0.attentions.1.proj_in.weight` is the Flax path
`("down_blocks_0", "attentions_1", "proj_in", "kernel")`: a numeric segment (an index into an
`nn.ModuleList` / `nn.Sequential`) joins the name before it with "_", and the tensor name becomes
`kernel` (conv / linear weight), `scale` (norm weight), `embedding` (embedding table) or `bias`.
Layouts: conv OIHW -> HWIO, linear [out, in] -> [in, out].

Going back needs to know which "name_N" segments were list indices (`resnets_1`) and which are
real names (diffusers' `linear_1`): `MODULE_LISTS` lists the container names the models use.

`state_dict_to_params` is strict: every model parameter must come from exactly one checkpoint
tensor of the right shape, and every checkpoint tensor must be used, except the known
non-parameter buffers passed as `ignore`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.convert.state_dict import CheckpointError

# nn.ModuleList / nn.Sequential attributes in diffusers' UNet2DConditionModel, AutoencoderKL and
# transformers' CLIPTextModel: `<name>.<index>` in PyTorch, `<name>_<index>` here.
MODULE_LISTS = frozenset(
    {
        "down_blocks",
        "up_blocks",
        "resnets",
        "attentions",
        "downsamplers",
        "upsamplers",
        "transformer_blocks",
        "to_out",
        "net",
        "layers",
    }
)
_WEIGHT_LEAVES = ("kernel", "scale", "embedding")
_LIST_SEGMENT = re.compile(r"^(.+)_(\d+)$")


def torch_key_to_flax_path(key: str, leaf: str | None = None) -> tuple[str, ...]:
    """`a.b.0.c.weight` -> ("a", "b_0", "c", leaf). `leaf` replaces "weight" (kernel / scale /
    embedding); "bias" stays "bias". With leaf=None the last segment is kept as is."""
    parts = key.split(".")
    path: list[str] = []
    for part in parts[:-1]:
        if part.isdigit():
            if not path:
                raise ValueError(f"key {key!r} starts with an index")
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    last = parts[-1]
    if last == "weight" and leaf is not None:
        last = leaf
    return (*path, last)


def flax_path_to_torch_key(path: Iterable[str]) -> str:
    """Inverse of `torch_key_to_flax_path`: ("down_blocks_0", "resnets_1", "conv1", "kernel") ->
    "down_blocks.0.resnets.1.conv1.weight"."""
    *parents, leaf = path
    parts = []
    for segment in parents:
        match = _LIST_SEGMENT.match(segment)
        if match and match.group(1) in MODULE_LISTS:
            parts.extend(match.groups())
        else:
            parts.append(segment)
    parts.append("weight" if leaf in _WEIGHT_LEAVES else leaf)
    return ".".join(parts)


def to_flax_layout(leaf: str, value: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """A PyTorch tensor in the layout of the Flax leaf `leaf` of shape `target_shape`.

    A 1x1 conv and a linear layer are the same map, and checkpoints store some of these layers
    either way (LDM's VAE attention as [C, C, 1, 1] convs, SD2's `proj_in` as conv or linear),
    so a [O, I, 1, 1] tensor loads into a Dense kernel and an [O, I] tensor into a 1x1 Conv.
    """
    if leaf != "kernel":
        return value
    if len(target_shape) == 2:  # Dense [in, out]
        if value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]
        return value.T if value.ndim == 2 else value
    if len(target_shape) == 4:  # Conv HWIO
        if value.ndim == 2 and target_shape[:2] == (1, 1):
            return value.T[None, None]
        return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
    return value


def _contiguous_float32(value: np.ndarray, block: int = 256) -> np.ndarray:
    """`value` as a C-contiguous float32 array. A transposed [out, in] Dense kernel is copied in
    column blocks, each a run of contiguous source rows: 10 ms instead of numpy's 126 ms for a
    5120 x 1280 kernel on the 2-core Xeon (the strided copy misses the cache on every element)."""
    value = np.asarray(value, dtype=np.float32)
    if value.ndim != 2 or value.flags.c_contiguous:
        # reshape: ascontiguousarray makes a 0-d array (CLIP's logit_scale) 1-d
        return np.ascontiguousarray(value).reshape(value.shape)
    out = np.empty(value.shape, np.float32)
    for start in range(0, value.shape[1], block):
        out[:, start : start + block] = value[:, start : start + block]
    return out


def to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    """Flax leaf -> PyTorch layout (HWIO -> OIHW, [in, out] -> [out, in])."""
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return to_torch_layout(leaf, np.empty(shape, np.bool_)).shape


def _listing(title: str, keys: list[str], limit: int = 40) -> str:
    shown = "\n    ".join(keys[:limit])
    more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"  {title} ({len(keys)}):\n    {shown}{more}"


def flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def unflatten(flat: Mapping[tuple[str, ...], object]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return tree


def state_dict_to_params(
    state_dict: Mapping[str, np.ndarray],
    abstract_params: Mapping,
    *,
    component: str,
    rename: Callable[[str], str | None] = lambda key: key,
    export_name: Callable[[str], str] = lambda key: key,
) -> dict:
    """Convert a PyTorch state dict to the Flax params tree of shape `abstract_params`, strictly.

    Args:
      state_dict: checkpoint key -> array (PyTorch layout); read one tensor at a time.
      abstract_params: the model's `params` tree (e.g. from `jax.eval_shape(model.init, ...)`),
        leaves with `.shape`.
      component: a name for error messages ("unet", "vae", "text_encoder").
      rename: maps a checkpoint key to the model's PyTorch-style key (legacy names, prefixes), or
        None for a known buffer that is not a parameter (e.g. CLIP's `position_ids`).
      export_name: maps the model's key back to the checkpoint's naming, for messages about
        missing keys (so they read like the file's other keys).
    Returns:
      The params tree of float32 jax arrays (`{"params": ...}` is the caller's business).
    Raises:
      CheckpointError naming every missing and unexpected key and every shape mismatch.
    """
    expected = {flax_path_to_torch_key(p): p for p in flatten(abstract_params)}
    shapes = {p: tuple(s.shape) for p, s in flatten(abstract_params).items()}
    if len(expected) != len(shapes):
        raise AssertionError(f"{component}: two Flax parameters map to one PyTorch name")
    source: dict[str, str] = {}  # model key -> checkpoint key
    unexpected = []
    for key in state_dict:
        name = rename(key)
        if name is None:
            continue
        if name not in expected:
            unexpected.append(key)
        elif name in source:
            raise CheckpointError(f"{component}: {source[name]!r} and {key!r} both give {name!r}")
        else:
            source[name] = key
    missing = [export_name(k) for k in expected if k not in source]
    if missing or unexpected:
        parts = [f"{component}: the checkpoint does not match the model config"]
        if missing:
            parts.append(_listing("missing keys", sorted(missing)))
        if unexpected:
            parts.append(_listing("unexpected keys", sorted(unexpected)))
        raise CheckpointError("\n".join(parts))

    flat = {}
    mismatched = []
    for name, path in expected.items():
        key = source[name]
        target = shapes[path]
        get_shape = getattr(state_dict, "shape", None)
        src_shape = tuple(get_shape(key)) if get_shape else tuple(state_dict[key].shape)
        if np.prod(src_shape, dtype=np.int64) != np.prod(target, dtype=np.int64):
            mismatched.append((key, src_shape, _torch_shape(path[-1], target)))
            continue
        value = to_flax_layout(path[-1], state_dict[key], target)
        if tuple(value.shape) != target:
            mismatched.append((key, src_shape, _torch_shape(path[-1], target)))
            continue
        flat[path] = jnp.asarray(_contiguous_float32(value))
        del value
    if mismatched:
        lines = [f"    {k}: checkpoint {s}, model expects {t}" for k, s, t in mismatched]
        raise CheckpointError(f"{component}: shape mismatch\n" + "\n".join(lines))
    return unflatten(flat)


def params_to_state_dict(
    params: Mapping, *, export_name: Callable[[str], str] = lambda key: key, dtype=np.float32
) -> dict[str, np.ndarray]:
    """Flax params tree -> PyTorch state dict (numpy, PyTorch layout, `dtype`)."""
    out = {}
    for path, value in flatten(params).items():
        array = to_torch_layout(path[-1], np.asarray(jax.device_get(value)))
        out[export_name(flax_path_to_torch_key(path))] = np.ascontiguousarray(array, dtype=dtype)
    return out
