"""LoRA files in and out: diffusers / PEFT state dicts (`pytorch_lora_weights.safetensors`) and
kohya / A1111 files.

The diffusers layout (`StableDiffusionPipeline.save_lora_weights`, PEFT's
`get_peft_model_state_dict`): `<component>.<module>.lora_A.weight` f32[r, in] (a Linear) or
f32[r, in, kh, kw] (a Conv2d), `<component>.<module>.lora_B.weight` f32[out, r] or
f32[out, r, 1, 1], with component "unet", "text_encoder" or "text_encoder_2"; the older
`lora.down` / `lora.up` spellings name the same two matrices. Alpha comes from the file's
`lora_adapter_metadata` (diffusers >= 0.33 writes PEFT's `lora_alpha` there, with per-module
`alpha_pattern` / `rank_pattern`), else alpha = rank, as diffusers loads it.

The kohya / A1111 layout (`lora_unet_<module, "." as "_">.lora_down.weight`, `.lora_up.weight`
and an `.alpha` per layer; text encoders `lora_te_`, `lora_te1_`, `lora_te2_`): module names in
diffusers' naming, or for the U-Net in the original sgm naming (`input_blocks_4_1_...`) that
many SDXL files use; both are resolved against the model's own layers. Written by `save_lora(...,
layout="kohya")`.

Here an adapter is `ldm_jax.models.adapters.lora.Adapter`: a tree shaped like the component's
parameters ({"params": {... layer: {"lora_A": A, "lora_B": B}}}, A and B transposed to the flax
kernel layouts [in, r] / [kh, kw, in, r] and [r, out] / [1, 1, r, out]).
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Mapping

import numpy as np
from flax import traverse_util

from ldm_jax.convert.naming import flax_path_to_torch_key, torch_key_to_flax_path
from ldm_jax.convert.state_dict import CheckpointError, read_state_dict
from ldm_jax.models.adapters.lora import Adapter

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' file name
_PEFT_KEY = re.compile(r"^(.+)\.(lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up)\.weight$")
_ROLE = {"lora_A": "lora_A", "lora.down": "lora_A", "lora_down": "lora_A"}
_ROLE |= {"lora_B": "lora_B", "lora.up": "lora_B", "lora_up": "lora_B"}
# Variants that are not LoRA: named, never silently dropped.
_UNSUPPORTED = {
    "lora_magnitude_vector": "DoRA",
    "dora_scale": "DoRA",  # kohya's spelling
    "hada_w1": "LoHa",
    "lokr_w1": "LoKr",
    "lora_embedding_A": "embedding LoRA",
}


def _to_flax(array: np.ndarray) -> np.ndarray:
    """A PyTorch Linear / Conv2d weight ([out, in] / [out, in, kh, kw]) in flax's kernel layout."""
    array = np.asarray(array, np.float32)
    if array.ndim == 2:
        return array.T
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    raise CheckpointError(f"a LoRA weight of shape {array.shape}: neither Linear nor Conv2d")


def _to_torch(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, np.float32)
    return array.T if array.ndim == 2 else array.transpose(3, 2, 0, 1)


def _check_supported(key: str) -> None:
    for marker, variant in _UNSUPPORTED.items():
        if marker in key:
            raise CheckpointError(
                f"{key!r} belongs to a {variant} adapter, which ldm_jax does not load (LoRA only)"
            )


# diffusers' attention-processor spelling (LoRAAttnProcessor, diffusers < 0.21), as its
# UNET_TO_DIFFUSERS / DIFFUSERS_OLD_TO_PEFT tables read it: the U-Net's `attn1.processor.
# to_q_lora.down`, the text encoders' `self_attn.to_q_lora.down` and `mlp.fc1.lora_linear_layer.
# down`.
_ATTENTION_PROCESSOR = {
    "unet": {f"to_{x}_lora": f"to_{x}" for x in "qkv"} | {"to_out_lora": "to_out.0"},
    "text": {f"to_{x}_lora": f"{x}_proj" for x in "qkv"} | {"to_out_lora": "out_proj"},
}
_OLD_MODULE = re.compile(r"\.(to_[qkv]_lora|to_out_lora|lora_linear_layer)\.(down|up)\.weight$")


def _new_spelling(component: str, rest: str) -> str:
    """A key's module path in the current spelling (`<module>.lora.down.weight`)."""
    rest = rest.replace(".processor.", ".")
    match = _OLD_MODULE.search(rest)
    if match is None:
        return rest
    name, role = match.groups()
    table = _ATTENTION_PROCESSOR["unet" if component == "unet" else "text"]
    module = "" if name == "lora_linear_layer" else f".{table[name]}"
    return f"{rest[: match.start()]}{module}.lora.{role}.weight"


def peft_state_dict_to_adapters(state_dict: Mapping[str, np.ndarray]) -> dict[str, dict]:
    """{component: adapter tree} of a diffusers / PEFT LoRA state dict (keys with their
    component prefix; also the older `lora.down` / `lora.up` and attention-processor
    spellings). Keys of other forms, unsupported variants and half pairs are errors that list
    them."""
    flat: dict[str, dict] = {}
    unknown = []
    for key in state_dict:
        _check_supported(key)
        component, _, rest = key.partition(".")
        match = _PEFT_KEY.match(_new_spelling(component, rest))
        if component not in COMPONENTS or match is None:
            unknown.append(key)
            continue
        module, role = match.groups()
        if component != "unet":  # transformers' CLIP names; ours drop `text_model.`
            module = module.removeprefix("text_model.")
        path = torch_key_to_flax_path(module + ".x")[:-1]
        flat.setdefault(component, {})[(*path, _ROLE[role])] = _to_flax(state_dict[key])
    if unknown:
        shown = ", ".join(unknown[:8]) + (
            f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
        )
        raise CheckpointError(
            f"{len(unknown)} keys are not diffusers / PEFT LoRA weights "
            f"(<{'|'.join(COMPONENTS)}>.<module>.lora_A|lora_B.weight): {shown}"
        )
    adapters = {}
    for component, tensors in flat.items():
        layers = {p[:-1] for p in tensors}
        half = sorted("/".join(p) for p in layers if len({r for r in tensors if r[:-1] == p}) != 2)
        if half:
            raise CheckpointError(f"{component}: LoRA layers without both A and B: {half}")
        adapters[component] = {"params": traverse_util.unflatten_dict(tensors)}
    return adapters


def _peft_config(metadata: Mapping[str, str] | None, component: str) -> dict | None:
    """PEFT's LoraConfig fields of `component` from a file's `lora_adapter_metadata` (diffusers
    writes them flat with a component prefix, "unet.lora_alpha"; a single-model file has none)."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if raw is None:
        return None
    config = json.loads(raw)
    prefix = f"{component}."
    nested = {k[len(prefix) :]: v for k, v in config.items() if k.startswith(prefix)}
    return nested or config


def _alphas(config: dict | None, tree: dict):
    r"""diffusers' alpha of each layer: PEFT's `alpha_pattern` (a module-name pattern matched as
    PEFT does, `(.*\.)?(pattern)$`), else `lora_alpha`; None without either (alpha = rank)."""
    if not config or "lora_alpha" not in config:
        return None
    default = float(config["lora_alpha"])
    patterns = config.get("alpha_pattern") or {}
    if not patterns:
        return default
    out = {}
    for path in traverse_util.flatten_dict(tree.get("params", tree)):
        if path[-1] != "lora_A":
            continue
        name = flax_path_to_torch_key((*path[:-1], "weight"))[: -len(".weight")]
        matched = [v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", name)]
        out[path[:-1]] = float(matched[0]) if matched else default
    return out


KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",  # SD 1.x / 2.x files (A1111)
    "lora_te1_": "text_encoder",  # SDXL's first encoder (and diffusers' kohya export)
    "lora_te2_": "text_encoder_2",
}
_KOHYA_KEY = re.compile(
    r"^(lora_unet_|lora_te_|lora_te1_|lora_te2_)(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$"
)


def is_kohya(state_dict: Mapping) -> bool:
    return any(key.startswith(tuple(KOHYA_PREFIXES)) for key in state_dict)


def sgm_names(unet_layers) -> dict[str, tuple[str, ...]]:
    """{kohya name in the original (sgm) layout: flax path} of a U-Net's layers: each layer's
    diffusers module name mapped back through the single-file converter's table (which is
    diffusers' `convert_ldm_unet_checkpoint`), joined by "_". For SDXL this gives what
    diffusers' `_maybe_map_sgm_blocks_to_diffusers` reads; for SD 1.x, where that function
    miscounts blocks 10 and 11, the layout of the original checkpoints."""
    from ldm_jax.convert.original_names import invert, lookup, unet_layout_diffusers, unet_table

    names = {
        flax_path_to_torch_key((*p, "weight"))[: -len(".weight")]: tuple(p) for p in unet_layers
    }
    if not any(n.startswith("down_blocks.") for n in names):
        return {}  # not a diffusers U-Net's layers
    table = invert(unet_table(unet_layout_diffusers([f"{n}.weight" for n in names])))
    out = {}
    for name, path in names.items():
        found = lookup(name, table)
        if found is not None:
            out[found[0].replace(".", "_")] = path
    return out


def kohya_state_dict_to_adapters(state_dict, layers: Mapping[str, list]) -> dict[str, Adapter]:
    """{component: Adapter(tree, {layer: alpha})} of a kohya / A1111 LoRA state dict
    (`lora_unet_<module with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`), whose module
    names are matched against the layers of the model it is applied to (`layers`: {component:
    [flax layer path, ...]}, a path joined by "_" is kohya's name; `text_model_` is dropped from
    text-encoder names). U-Net names may also be the original (CompVis / Stability sgm) module
    names that many SDXL files use (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`,
    `middle_block_0_in_layers_2`, `output_blocks_2_2_conv`): `sgm_names`."""
    index = {c: {"_".join(p): tuple(p) for p in paths} for c, paths in layers.items()}
    if "unet" in index:
        index["unet"] |= sgm_names(layers["unet"])
    tensors: dict[str, dict] = {}
    alphas: dict[str, dict] = {}
    unknown = []
    for key in state_dict:
        _check_supported(key)
        match = _KOHYA_KEY.match(key)
        component = KOHYA_PREFIXES.get(match.group(1)) if match else None
        name = match.group(2).removeprefix("text_model_") if match else ""
        path = index.get(component, {}).get(name)
        if path is None:
            unknown.append(key)
            continue
        if match.group(3) == "alpha":
            alpha = np.asarray(state_dict[key])
            if alpha.size != 1:
                raise CheckpointError(f"{key}: an alpha is one number, not shape {alpha.shape}")
            alphas.setdefault(component, {})[path] = float(alpha.reshape(()))
            continue
        role = "lora_A" if match.group(3).startswith("lora_down") else "lora_B"
        tensors.setdefault(component, {})[(*path, role)] = _to_flax(state_dict[key])
    if unknown:
        shown = ", ".join(unknown[:8]) + (
            f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
        )
        raise CheckpointError(
            f"{len(unknown)} kohya LoRA keys match no layer of the model: {shown}"
        )
    out = {}
    for component, flat in tensors.items():
        layer_paths = {p[:-1] for p in flat}
        half = sorted("/".join(p) for p in layer_paths if sum(q[:-1] == p for q in flat) != 2)
        if half:
            raise CheckpointError(f"{component}: LoRA layers without both down and up: {half}")
        tree = {"params": traverse_util.unflatten_dict(flat)}
        out[component] = Adapter(tree, alphas.get(component) or None)
    return out


def read_lora(
    path: str | pathlib.Path, weight: float = 1.0, layers: Mapping[str, list] | None = None
) -> dict[str, Adapter]:
    """{component: Adapter} of a LoRA file (safetensors, or a pickle through
    `torch.load(weights_only=True)`) with this weight: diffusers / PEFT layout (alpha from its
    metadata), or kohya / A1111 layout (per-layer alphas; needs `layers`, the model's layer
    paths per component, to resolve its underscore-joined names)."""
    path = pathlib.Path(path)
    state_dict = read_state_dict(path)
    if is_kohya(state_dict):
        if layers is None:
            raise CheckpointError(f"{path} is a kohya LoRA: reading it needs the model's layers")
        found = kohya_state_dict_to_adapters(state_dict, layers)
        return {c: Adapter(a.params, a.alpha, weight) for c, a in found.items()}
    metadata = None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata()
    out = {}
    for component, tree in peft_state_dict_to_adapters(state_dict).items():
        out[component] = Adapter(tree, _alphas(_peft_config(metadata, component), tree), weight)
    return out


def adapters_to_peft_state_dict(adapters: Mapping[str, Adapter]) -> dict[str, np.ndarray]:
    """The inverse of `peft_state_dict_to_adapters`: {"<component>.<module>.lora_A.weight": ...}
    in PyTorch layouts."""
    out = {}
    for component, adapter in adapters.items():
        flat = traverse_util.flatten_dict(adapter.params.get("params", adapter.params))
        for path, value in flat.items():
            module = flax_path_to_torch_key((*path[:-1], "weight"))[: -len(".weight")]
            if component != "unet" and not module.startswith("text_projection"):
                module = f"text_model.{module}"  # the released CLIP names
            out[f"{component}.{module}.{path[-1]}.weight"] = _to_torch(np.asarray(value))
    return out


KOHYA_COMPONENT_PREFIXES = {
    "unet": "lora_unet_",
    "text_encoder": "lora_te1_",
    "text_encoder_2": "lora_te2_",
}
LAYOUTS = ("diffusers", "kohya")


def adapters_to_kohya_state_dict(adapters: Mapping[str, Adapter]) -> dict[str, np.ndarray]:
    """kohya / A1111 keys (`lora_unet_<module with _>.lora_down.weight`, `.lora_up.weight`,
    `.alpha` per layer; text encoders `lora_te1_`, `lora_te2_`, as diffusers'
    `convert_state_dict_to_kohya` names them), PyTorch layouts."""
    out = {}
    for key, value in adapters_to_peft_state_dict(adapters).items():
        component, rest = key.split(".", 1)
        module, role = rest.removesuffix(".weight").rsplit(".", 1)
        name = KOHYA_COMPONENT_PREFIXES[component] + module.replace(".", "_")
        out[f"{name}.{'lora_down' if role == 'lora_A' else 'lora_up'}.weight"] = value
    for component, adapter in adapters.items():
        for layer, alpha in _layer_alphas(adapter).items():
            module = flax_path_to_torch_key((*layer, "weight"))[: -len(".weight")]
            if component != "unet" and not module.startswith("text_projection"):
                module = f"text_model.{module}"
            name = KOHYA_COMPONENT_PREFIXES[component] + module.replace(".", "_")
            out[f"{name}.alpha"] = np.asarray(alpha, np.float32)
    return out


def _layer_alphas(adapter: Adapter) -> dict[tuple[str, ...], float]:
    """{layer path: alpha} of an adapter (alpha = rank where it has none)."""
    flat = traverse_util.flatten_dict(adapter.params.get("params", adapter.params))
    out = {}
    for path, value in flat.items():
        if path[-1] != "lora_A":
            continue
        alpha = adapter.alpha
        if isinstance(alpha, Mapping):
            alpha = alpha.get(path[:-1])
        out[path[:-1]] = float(value.shape[-1] if alpha is None else alpha)
    return out


def save_lora(
    out_dir, adapters: Mapping[str, Adapter], targets, layout: str = "diffusers"
) -> pathlib.Path:
    """Write `adapters` ({component: Adapter}; `targets`: their module names, one list for all
    or {component: names}) as diffusers does (`save_lora_weights`):
    `<out_dir>/pytorch_lora_weights.safetensors`, PyTorch layouts, and PEFT's config per
    component in the `lora_adapter_metadata` (rank, alpha, targets), so that diffusers'
    `load_lora_weights(out_dir)` builds the same adapter; or (layout "kohya") in the kohya /
    A1111 layout, an alpha per layer, which diffusers, A1111 and ComfyUI read. Replaces the file
    only when complete."""
    from safetensors.numpy import save_file

    if layout not in LAYOUTS:
        raise ValueError(f"unknown LoRA layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LORA_WEIGHT_NAME
    tmp = path.with_name(path.name + ".tmp")
    if layout == "kohya":
        tensors = adapters_to_kohya_state_dict(adapters)
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
        tmp.replace(path)
        return path
    metadata = {}
    for component, adapter in adapters.items():
        flat = traverse_util.flatten_dict(adapter.params.get("params", adapter.params))
        ranks = {p[:-1]: v.shape[-1] for p, v in flat.items() if p[-1] == "lora_A"}
        rank = max(ranks.values())
        if isinstance(adapter.alpha, Mapping) or len(set(ranks.values())) > 1:
            raise NotImplementedError("writing per-layer ranks or alphas is not supported yet")
        alpha = rank if adapter.alpha is None else float(adapter.alpha)
        names = targets[component] if isinstance(targets, Mapping) else targets
        config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(names)}
        metadata |= {f"{component}.{k}": v for k, v in config.items()}
    tensors = adapters_to_peft_state_dict(adapters)
    header = {"format": "pt", "lora_adapter_metadata": json.dumps(metadata, sort_keys=True)}
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), header)
    tmp.replace(path)
    return path
