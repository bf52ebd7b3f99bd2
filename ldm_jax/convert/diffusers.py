"""Stable Diffusion checkpoints in the diffusers folder layout: load into ldm_jax, export back.

A diffusers folder holds `model_index.json` and one subfolder per component: `unet/`, `vae/`
(`config.json` + `diffusion_pytorch_model[.<variant>].safetensors`), `text_encoder/`,
`text_encoder_2/` (transformers `config.json` + `model[.<variant>].safetensors`), `tokenizer/`,
`tokenizer_2/`, `scheduler/scheduler_config.json`. `load_pretrained` also takes an original
single-file checkpoint through `ldm_jax.convert.original.read_single_file`.

The weights become float32 Flax variables `{"params": ...}` by the naming rule of
`ldm_jax.convert.naming`; loading is strict (missing, unexpected and mis-shaped keys are errors).
"""

from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.convert import configs as cfg
from ldm_jax.convert.naming import params_to_state_dict, state_dict_to_params
from ldm_jax.convert.state_dict import CheckpointError, read_state_dict
from ldm_jax.model import TEXT_ENCODER_SLOTS, Model, text_encoder_slots
from ldm_jax.models.unet import UNet2DConditionModel

TOKENIZER_SLOTS = ("tokenizer", "tokenizer_2")
KINDS = ("sd1", "sd2", "sdxl", "sdxl-refiner")


def detect_kind(unet: UNet2DConditionModel, text_slots: tuple[str, ...]) -> str:
    """The SD family member of a U-Net config and the text encoders present with it."""
    if unet.addition_embed_type == "text_time":
        kind = "sdxl" if "text_encoder" in text_slots else "sdxl-refiner"
    else:  # SD2.x (and only SD2.x) uses linear proj_in/proj_out without added conditioning
        kind = "sd2" if unet.use_linear_projection else "sd1"
    return kind + ("-inpaint" if unet.in_channels == 9 else "")


# ---------------------------------------------------------------- modules and abstract params
def _abstract_params(module, component: str):
    """The `params` tree of `module` as ShapeDtypeStructs (traces init, computes nothing)."""
    key = jax.random.key(0)
    if component == "unet":
        n = len(module.block_out_channels)
        size = 2 ** (n - 1)
        args = (
            jnp.zeros((1, size, size, module.in_channels)),
            jnp.zeros((1,)),
            jnp.zeros((1, 1, module.cross_attention_dim)),
        )
        kwargs = {}
        if module.addition_embed_type == "text_time":
            # add_embedding sees concat(text_embeds, embedded time ids); only the total width
            # matters for the parameter shapes, so one time id stands in for 5 or 6.
            width = module.projection_class_embeddings_input_dim - module.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {
                "text_embeds": jnp.zeros((1, width)),
                "time_ids": jnp.zeros((1, 1)),
            }
        init = lambda: module.init(key, *args, **kwargs)
    elif component == "vae":
        size = module.downsampling_factor
        init = lambda: module.init(key, jnp.zeros((1, size, size, module.in_channels)))
    else:
        init = lambda: module.init(key, jnp.zeros((1, 1), jnp.int32))
    return jax.eval_shape(init)["params"]


def _vae_rename(key: str) -> str:
    """Pre-0.14 diffusers VAE attention names (query/key/value/proj_attn), as diffusers'
    `ModelMixin._convert_deprecated_attention_blocks`."""
    legacy = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    parts = key.split(".")
    if len(parts) >= 3 and ".mid_block.attentions." in key and parts[-2] in legacy:
        return ".".join([*parts[:-2], legacy[parts[-2]], parts[-1]])
    return key


def _clip_rename(key: str) -> str | None:
    """transformers CLIP names -> ours: `text_model.` is optional (transformers 5 omits it for
    CLIPTextModel); `position_ids` is a buffer, not a parameter."""
    if key.endswith("embeddings.position_ids"):
        return None
    return key.removeprefix("text_model.")


def _clip_export_name(key: str) -> str:
    """Our CLIP key -> the checkpoint name of the released models (which transformers 4 and 5
    both load): everything but `text_projection` under `text_model.`."""
    return key if key.startswith("text_projection.") else f"text_model.{key}"


RENAMES = {"unet": (lambda k: k), "vae": _vae_rename, "text_encoder": _clip_rename}
EXPORT_NAMES = {"unet": (lambda k: k), "vae": (lambda k: k), "text_encoder": _clip_export_name}


def module_from_config(component: str, config: dict, **overrides):
    """The ldm_jax module for a diffusers/transformers config dict of `component` ("unet",
    "vae", "text_encoder" or "text_encoder_2")."""
    if component == "unet":
        return cfg.unet_from_config(config, **overrides)
    if component == "vae":
        return cfg.vae_from_config(config, **overrides)
    if component in TEXT_ENCODER_SLOTS:
        return cfg.clip_from_config(config, **overrides)
    raise ValueError(f"unknown component {component!r}")


def convert_state_dict(component: str, module, state_dict: Mapping[str, np.ndarray]) -> dict:
    """A PyTorch state dict of `component` -> Flax variables `{"params": ...}` for `module`."""
    family = "text_encoder" if component in TEXT_ENCODER_SLOTS else component
    params = state_dict_to_params(
        state_dict,
        _abstract_params(module, family),
        component=component,
        rename=RENAMES[family],
        export_name=EXPORT_NAMES[family],
    )
    return {"params": params}


def export_state_dict(component: str, variables, dtype=np.float32) -> dict[str, np.ndarray]:
    """Flax variables of `component` -> the PyTorch state dict diffusers/transformers load."""
    family = "text_encoder" if component in TEXT_ENCODER_SLOTS else component
    return params_to_state_dict(variables["params"], export_name=EXPORT_NAMES[family], dtype=dtype)


# ---------------------------------------------------------------- reading a diffusers folder
def _add_variant(name: str, variant: str | None) -> str:
    """diffusers' `_add_variant`: "model.safetensors" -> "model.fp16.safetensors"."""
    if variant is None:
        return name
    *head, last = name.split(".")
    return ".".join([*head, variant, last])


WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def find_weights(folder: pathlib.Path, variant: str | None = None) -> pathlib.Path:
    """The weights file of a component folder (safetensors preferred over pickles)."""
    for name in WEIGHT_NAMES:
        path = folder / _add_variant(name, variant)
        if path.is_file():
            return path
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    hint = ""
    if variant is None and any(".fp16." in p for p in present):
        hint = ' (only a variant is present: pass variant="fp16")'
    raise CheckpointError(
        f"no weights{f' of variant {variant!r}' if variant else ''} in {folder}{hint}; "
        f"it holds {present}"
    )


def _read_json(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"missing {path}") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def load_component(folder, component: str, variant: str | None = None, **overrides):
    """Load one component folder (e.g. `unet/` or a standalone VAE such as sd-vae-ft-mse).

    Args:
      folder: the component's folder (config.json + weights).
      component: "unet", "vae", "text_encoder" or "text_encoder_2".
      variant: e.g. "fp16" for `*.fp16.safetensors` (upcast to float32).
      overrides: module field overrides (`dtype`, `attention_implementation`).
    Returns:
      (module, variables).
    """
    folder = pathlib.Path(folder)
    config = _read_json(folder / "config.json")
    module = module_from_config(component, config, **overrides)
    variables = convert_state_dict(
        component, module, read_state_dict(find_weights(folder, variant))
    )
    return module, variables


def _load_tokenizer(folder):
    from transformers import CLIPTokenizer

    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"no tokenizer folder {folder}")
    # from_pretrained reads the folder's special_tokens_map / tokenizer_config, so each folder's
    # own pad token is kept (SDXL's tokenizer_2 pads with "!", tokenizer with <|endoftext|>).
    return CLIPTokenizer.from_pretrained(str(folder))


def _assemble(kind, configs, state_dicts, tokenizers, scheduler_config, source, overrides):
    """Build modules from `configs` and convert `state_dicts` (both keyed by component)."""
    unet = module_from_config("unet", configs["unet"], **overrides)
    vae = module_from_config("vae", configs["vae"], **overrides)
    slots = text_encoder_slots(kind)
    absent = [c for c in ("unet", "vae", *slots) if c not in state_dicts]
    if absent:
        raise CheckpointError(f"{source}: a {kind} checkpoint needs {absent}, which it lacks")
    encoders = tuple(module_from_config(s, configs[s], **overrides) for s in slots)
    return Model(
        kind=kind,
        unet=unet,
        unet_params=convert_state_dict("unet", unet, state_dicts["unet"]),
        vae=vae,
        vae_params=convert_state_dict("vae", vae, state_dicts["vae"]),
        scaling_factor=float(vae.scaling_factor),
        text_encoders=encoders,
        text_encoder_params=tuple(
            convert_state_dict(s, m, state_dicts[s]) for s, m in zip(slots, encoders, strict=True)
        ),
        tokenizers=tuple(tokenizers),
        scheduler_config=dict(scheduler_config),
        configs=dict(configs),
        source=str(source),
    )


def load_pretrained(
    path,
    *,
    variant: str | None = None,
    tokenizer_dir=None,
    tokenizer_2_dir=None,
    **overrides,
) -> Model:
    """Load a Stable Diffusion 1.x / 2.x / XL / XL-refiner / inpainting checkpoint.

    Args:
      path: a diffusers folder (with model_index.json), an orbax export of `save_orbax` (with
        pretrained.json), or an original single-file checkpoint
        (`.safetensors`, or `.ckpt` with torch installed) in the CompVis / Stability layout.
      variant: weights variant of a diffusers folder ("fp16" -> `*.fp16.safetensors`), as in
        diffusers' `from_pretrained`. Weights are upcast to float32 either way.
      tokenizer_dir, tokenizer_2_dir: tokenizer folders; override the folder's own, and are the
        only source of tokenizers for single files.
      overrides: module field overrides for every module, e.g. dtype=jnp.bfloat16 (compute
        dtype; parameters stay float32) or attention_implementation="cudnn".
    """
    path = pathlib.Path(path)
    if path.is_dir() and (path / "pretrained.json").is_file():  # written by save_orbax
        return load_orbax(path, **overrides)
    if path.is_dir():
        return _load_folder(path, variant, tokenizer_dir, tokenizer_2_dir, overrides)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint: {path}")
    try:
        from ldm_jax.convert.original import read_single_file
    except ImportError as e:
        raise CheckpointError(f"single-file checkpoints are not supported yet ({e})") from e
    kind, configs, state_dicts = read_single_file(path)
    tokenizer_dirs = dict(zip(TOKENIZER_SLOTS, (tokenizer_dir, tokenizer_2_dir), strict=True))
    wanted = [t.replace("text_encoder", "tokenizer") for t in text_encoder_slots(kind)]
    tokenizers = []
    if all(tokenizer_dirs[t] is not None for t in wanted):
        tokenizers = [_load_tokenizer(tokenizer_dirs[t]) for t in wanted]
    scheduler = configs.get("scheduler", {})
    return _assemble(kind, configs, state_dicts, tokenizers, scheduler, path, overrides)


def _load_folder(path, variant, tokenizer_dir, tokenizer_2_dir, overrides) -> Model:
    index = _read_json(path / "model_index.json")
    present = lambda name: (
        isinstance(index.get(name), list) and index[name][0] is not None and (path / name).is_dir()
    )
    configs: dict[str, dict] = {"model_index": index}
    state_dicts = {}
    for component in ("unet", "vae", *TEXT_ENCODER_SLOTS):
        if present(component):
            configs[component] = _read_json(path / component / "config.json")
            state_dicts[component] = read_state_dict(find_weights(path / component, variant))
    if "unet" not in configs or "vae" not in configs:
        raise CheckpointError(f"{path}: a Stable Diffusion folder needs unet/ and vae/")
    unet = module_from_config("unet", configs["unet"])
    kind = detect_kind(unet, tuple(c for c in TEXT_ENCODER_SLOTS if c in configs))
    tokenizer_dirs = {"tokenizer": tokenizer_dir, "tokenizer_2": tokenizer_2_dir}
    tokenizers = []
    for slot in text_encoder_slots(kind):
        name = slot.replace("text_encoder", "tokenizer")
        folder = tokenizer_dirs[name] or (path / name if present(name) else None)
        if folder is None:
            raise CheckpointError(f"{path}: {slot}/ has no {name}/ folder")
        tokenizers.append(_load_tokenizer(folder))
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    scheduler = _read_json(scheduler_file) if scheduler_file.is_file() else {}
    return _assemble(kind, configs, state_dicts, tokenizers, scheduler, path, overrides)


# ---------------------------------------------------------------- export
PIPELINE_CLASSES = {
    "sd1": "StableDiffusionPipeline",
    "sd2": "StableDiffusionPipeline",
    "sd1-inpaint": "StableDiffusionInpaintPipeline",
    "sd2-inpaint": "StableDiffusionInpaintPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sdxl-inpaint": "StableDiffusionXLInpaintPipeline",
    "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline",
}


def _save_weights(folder: pathlib.Path, name: str, tensors: dict, variant: str | None):
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / _add_variant(name, variant)), metadata={"format": "pt"})


def _write_json(path: pathlib.Path, data: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _model_index(model: Model) -> dict:
    base = model.configs.get("model_index", {})
    default = PIPELINE_CLASSES.get(
        model.kind, PIPELINE_CLASSES[model.kind.removesuffix("-inpaint")]
    )
    pipeline_class = base.get("_class_name") or default
    index = {k: v for k, v in base.items() if not isinstance(v, list)}
    index["_class_name"] = pipeline_class
    if not model.scheduler_config.get("_class_name"):
        raise ValueError("scheduler_config has no _class_name; diffusers could not load it")
    index["scheduler"] = ["diffusers", model.scheduler_config["_class_name"]]
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    index["vae"] = ["diffusers", "AutoencoderKL"]
    for slot, tok in zip(TEXT_ENCODER_SLOTS, TOKENIZER_SLOTS, strict=True):
        index[slot], index[tok] = [None, None], [None, None]
    for i, slot in enumerate(model.text_encoder_slots):
        projected = model.text_encoders[i].projection_dim is not None
        index[slot] = [
            "transformers",
            "CLIPTextModelWithProjection" if projected else "CLIPTextModel",
        ]
        if i < len(model.tokenizers):
            index[slot.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
    if not model.kind.startswith("sdxl"):  # SD pipelines' optional components
        index.setdefault("requires_safety_checker", False)
        for optional in ("safety_checker", "feature_extractor"):
            index[optional] = [None, None]
    elif model.kind == "sdxl-refiner":
        index.setdefault("requires_aesthetics_score", True)
    for optional in ("image_encoder", "feature_extractor"):
        if model.kind.startswith("sdxl"):
            index[optional] = [None, None]
    return index


def save_pretrained(model: Model, path, *, variant: str | None = None, dtype=None):
    """Write `model` as a diffusers folder that `DiffusionPipeline.from_pretrained` loads.

    Weights are safetensors in PyTorch layout (float32, or `dtype` such as np.float16; with
    `variant` the file names carry it, as diffusers' `save_pretrained(variant=...)`). Component
    configs come from the module fields, over the source configs (so metadata such as
    `sample_size` survives); tokenizers are saved with their own `save_pretrained`.
    """
    path = pathlib.Path(path)
    dtype = np.dtype(dtype or np.float32)
    original = model.configs
    unet_config = {**original.get("unet", {}), **cfg.unet_to_config(model.unet)}
    _write_json(path / "unet" / "config.json", unet_config)
    _save_weights(
        path / "unet",
        "diffusion_pytorch_model.safetensors",
        export_state_dict("unet", model.unet_params, dtype),
        variant,
    )
    vae_config = {**original.get("vae", {}), **cfg.vae_to_config(model.vae)}
    _write_json(path / "vae" / "config.json", vae_config)
    _save_weights(
        path / "vae",
        "diffusion_pytorch_model.safetensors",
        export_state_dict("vae", model.vae_params, dtype),
        variant,
    )
    for slot, module, variables in zip(
        model.text_encoder_slots, model.text_encoders, model.text_encoder_params, strict=True
    ):
        base = {
            k: v
            for k, v in original.get(slot, {}).items()
            if k not in ("text_config", "dtype", "torch_dtype")  # transformers loads in "dtype"
        }
        base["dtype"] = dtype.name
        _write_json(path / slot / "config.json", cfg.clip_to_config(module, base))
        _save_weights(
            path / slot, "model.safetensors", export_state_dict(slot, variables, dtype), variant
        )
    for slot, tokenizer in zip(model.text_encoder_slots, model.tokenizers, strict=False):
        folder = path / slot.replace("text_encoder", "tokenizer")
        if folder.exists():
            shutil.rmtree(folder)
        tokenizer.save_pretrained(str(folder))
    _write_json(path / "scheduler" / "scheduler_config.json", model.scheduler_config)
    _write_json(path / "model_index.json", _model_index(model))


# ---------------------------------------------------------------- orbax
def save_orbax(model: Model, path) -> None:
    """Save all parameters as one orbax checkpoint at `path` (a new directory), with the
    configs needed to rebuild the modules in `path/pretrained.json` and the tokenizers."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    tree = {
        "unet": model.unet_params,
        "vae": model.vae_params,
        "text_encoders": {
            s: p for s, p in zip(model.text_encoder_slots, model.text_encoder_params)
        },
    }
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / "params", tree)
    meta = {
        "kind": model.kind,
        "configs": {
            "unet": cfg.unet_to_config(model.unet),
            "vae": cfg.vae_to_config(model.vae),
            **{
                s: cfg.clip_to_config(m, model.configs.get(s))
                for s, m in zip(model.text_encoder_slots, model.text_encoders)
            },
        },
        "scheduler_config": model.scheduler_config,
        "model_index": model.configs.get("model_index", {}),
    }
    _write_json(path / "pretrained.json", meta)
    for slot, tokenizer in zip(model.text_encoder_slots, model.tokenizers, strict=False):
        tokenizer.save_pretrained(str(path / slot.replace("text_encoder", "tokenizer")))


def load_orbax(path, **overrides) -> Model:
    """Inverse of `save_orbax`."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    meta = _read_json(path / "pretrained.json")
    kind, configs = meta["kind"], meta["configs"]
    slots = text_encoder_slots(kind)
    modules = {c: module_from_config(c, configs[c], **overrides) for c in ("unet", "vae", *slots)}
    family = lambda c: "text_encoder" if c in TEXT_ENCODER_SLOTS else c
    abstract = {c: {"params": _abstract_params(m, family(c))} for c, m in modules.items()}
    target = {
        "unet": abstract["unet"],
        "vae": abstract["vae"],
        "text_encoders": {s: abstract[s] for s in slots},
    }
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.restore(path / "params", target)
    tokenizers = []
    for slot in slots:
        folder = path / slot.replace("text_encoder", "tokenizer")
        if folder.is_dir():
            tokenizers.append(_load_tokenizer(folder))
    return Model(
        kind=kind,
        unet=modules["unet"],
        unet_params=tree["unet"],
        vae=modules["vae"],
        vae_params=tree["vae"],
        scaling_factor=float(modules["vae"].scaling_factor),
        text_encoders=tuple(modules[s] for s in slots),
        text_encoder_params=tuple(tree["text_encoders"][s] for s in slots),
        tokenizers=tuple(tokenizers),
        scheduler_config=meta["scheduler_config"],
        configs={**configs, "model_index": meta["model_index"]},
        source=str(path),
    )
