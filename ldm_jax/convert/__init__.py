"""Pretrained-weight import and export: diffusers folders, original single files, orbax.

Importing this package does not import torch (only reading pickled `.ckpt`/`.bin` files does).

- `load_pretrained(path, variant=None, tokenizer_dir=None, tokenizer_2_dir=None, **overrides)`
  -> `ldm_jax.model.Model` (diffusers folder, single-file checkpoint or orbax export; the
  bundle `ldm_jax.model.load_pretrained` returns with a mesh).
- `save_pretrained(model, path, variant=None, dtype=None)`: a diffusers folder.
- `save_orbax(model, path)` / `load_orbax(path)`: one orbax checkpoint of all parameters.
- `read_state_dict(path)`: a lazy `name -> float32 array` mapping from any weights file.
- `load_component(folder, component, variant=None)`: one `unet/`, `vae/`, `text_encoder/` folder.
- `load_clip_model(folder)` -> `CLIPModelBundle`: a whole transformers `CLIPModel` folder (both
  towers, tokenizer, image preprocessing), e.g. openai/clip-vit-large-patch14 for CLIP score.
"""

from ldm_jax.convert.clip_model import CLIPModelBundle, load_clip_model, preprocess_images
from ldm_jax.convert.configs import UnsupportedConfigError
from ldm_jax.convert.diffusers import (
    convert_state_dict,
    detect_kind,
    export_state_dict,
    load_component,
    load_orbax,
    load_pretrained,
    module_from_config,
    save_orbax,
    save_pretrained,
)
from ldm_jax.convert.naming import flax_path_to_torch_key, torch_key_to_flax_path
from ldm_jax.convert.state_dict import CheckpointError, read_state_dict

__all__ = [
    "CLIPModelBundle",
    "CheckpointError",
    "UnsupportedConfigError",
    "convert_state_dict",
    "detect_kind",
    "export_state_dict",
    "flax_path_to_torch_key",
    "load_clip_model",
    "load_component",
    "load_orbax",
    "load_pretrained",
    "module_from_config",
    "preprocess_images",
    "read_state_dict",
    "save_orbax",
    "save_pretrained",
    "torch_key_to_flax_path",
]
