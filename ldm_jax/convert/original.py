"""Original single-file Stable Diffusion checkpoints <-> diffusers-named state dicts.

The CompVis / Stability layout (what A1111 and ComfyUI load) keeps every component in one file:

    model.diffusion_model.*                    U-Net (input_blocks / middle_block / output_blocks)
    first_stage_model.*                        VAE (encoder.down.*, decoder.up.*, mid.attn_1 as 1x1 convs)
    cond_stage_model.transformer.text_model.*  SD 1.x: OpenAI CLIP ViT-L/14 in transformers layout
    cond_stage_model.model.*                   SD 2.x: OpenCLIP ViT-H/14 (fused in_proj, 24 layers)
    conditioner.embedders.0.transformer.*      SDXL base: CLIP ViT-L/14 ...
    conditioner.embedders.1.model.*            ... and OpenCLIP ViT-bigG/14 with text_projection
    conditioner.embedders.0.model.*            SDXL refiner: OpenCLIP ViT-bigG/14 only

`read_single_file` detects which model a file holds and returns lazy mappings named as diffusers'
`UNet2DConditionModel` / `AutoencoderKL` and transformers' `CLIPTextModel(WithProjection)` name
their `state_dict()` entries (CLIP names keep the `text_model.` prefix that checkpoints on disk
use), with diffusers-vocabulary configs. `to_single_file` / `save_single_file` are the inverse.
The renames reproduce diffusers' `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint` and `convert_open_clip_checkpoint`
(diffusers/loaders/single_file_utils.py), but every key must be mapped or explicitly listed as
unused: anything else is an error.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import re
from collections.abc import Iterator, Mapping

import numpy as np

from ldm_jax.convert import original_configs
from ldm_jax.convert.original_names import (
    Table,
    indices,
    invert,
    lookup,
    openclip_table,
    prefixes,
    unet_layout_diffusers,
    unet_layout_original,
    unet_table,
    vae_table,
)
from ldm_jax.convert.state_dict import CheckpointError, read_state_dict

BASE_KINDS = ("sd1", "sd2", "sdxl", "sdxl-refiner")
KINDS = BASE_KINDS + tuple(f"{k}-inpaint" for k in BASE_KINDS)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# component -> (file prefix, layout): "hf" = transformers CLIP names below the prefix,
# "openclip" = OpenCLIP names (resblocks, fused in_proj, text_projection as a [width, dim] matrix).
TEXT_ENCODERS = {
    "sd1": {"text_encoder": ("cond_stage_model.transformer.", "hf")},
    "sd2": {"text_encoder": ("cond_stage_model.model.", "openclip")},
    "sdxl": {
        "text_encoder": ("conditioner.embedders.0.transformer.", "hf"),
        "text_encoder_2": ("conditioner.embedders.1.model.", "openclip"),
    },
    "sdxl-refiner": {"text_encoder_2": ("conditioner.embedders.0.model.", "openclip")},
}
# SD 2 conditions on the penultimate layer of the 24-layer ViT-H (FrozenOpenCLIPEmbedder,
# layer="penultimate"), so diffusers ships 23 layers and skips layer 23 and the unused projection
# (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE in diffusers). We skip the same entries, by name.
SD2_DROPPED_LAYER = 23

# Entries of original checkpoints that are not weights of any diffusers component: the DDPM
# schedule buffers of ldm.models.diffusion.ddpm.LatentDiffusion, its EMA copy (diffusers loads the
# non-EMA weights by default, extract_ema=False), the VAE's training loss (LPIPS, discriminator),
# CLIP's logit scale and position ids, and sgm's denoiser sigmas. `v_pred` / `ztsnr` are markers
# some SDXL fine-tunes carry (read by ComfyUI) that set the scheduler config.
UNUSED_KEYS = frozenset(
    """betas alphas_cumprod alphas_cumprod_prev sqrt_alphas_cumprod sqrt_one_minus_alphas_cumprod
    log_one_minus_alphas_cumprod sqrt_recip_alphas_cumprod sqrt_recipm1_alphas_cumprod
    posterior_variance posterior_log_variance_clipped posterior_mean_coef1 posterior_mean_coef2
    logvar model_ema.decay model_ema.num_updates denoiser.sigmas v_pred ztsnr""".split()
)
UNUSED_PREFIXES = ("model_ema.", "first_stage_model.loss.")


# ---------------------------------------------------------------------------------------------
# Lazy mapping: diffusers name -> (file key, transform)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a diffusers tensor comes from: `op` is "copy", "squeeze" (conv 1x1 -> linear),
    "transpose" (OpenCLIP text_projection [width, dim] -> nn.Linear [dim, width]) or "rows"
    (third `part` of OpenCLIP's fused in_proj: 0 = q, 1 = k, 2 = v)."""

    key: str
    op: str = "copy"
    part: int = 0


def _apply(source: Source, value):
    """Apply `source.op` to an array or to a shape tuple (the same arithmetic for both)."""
    shape = tuple(value) if isinstance(value, tuple) else value.shape
    if source.op == "copy":
        return value
    if source.op == "squeeze":  # [out, in, 1, 1] -> [out, in]; biases stay as they are
        if len(shape) <= 2:
            return value
        if any(d != 1 for d in shape[2:]):
            raise CheckpointError(f"{source.key}: expected a 1x1 conv kernel, got shape {shape}")
        return shape[:2] if isinstance(value, tuple) else value.reshape(shape[:2])
    if source.op == "transpose":
        return shape[::-1] if isinstance(value, tuple) else value.T
    if source.op == "rows":
        if shape[0] % 3:
            raise CheckpointError(f"{source.key}: fused q/k/v of shape {shape} is not 3 x width")
        n = shape[0] // 3
        if isinstance(value, tuple):
            return (n, *shape[1:])
        return value[source.part * n : (source.part + 1) * n]
    raise ValueError(f"unknown op {source.op!r}")


class MappedStateDict(Mapping):
    """Read-only `diffusers name -> numpy array` view of an original checkpoint.

    A tensor is read from the file (memory-mapped safetensors) only when its name is looked up,
    so converting holds about one tensor at a time beyond what the caller keeps. `shape(key)`
    reads no data; `sources` tells where each entry comes from.
    """

    def __init__(self, tensors: Mapping[str, np.ndarray], sources: Mapping[str, Source]):
        self._tensors = tensors
        self.sources = dict(sources)

    def __getitem__(self, key: str) -> np.ndarray:
        source = self.sources[key]
        return _apply(source, self._tensors[source.key])

    def shape(self, key: str) -> tuple[int, ...]:
        source = self.sources[key]
        if hasattr(self._tensors, "shape"):
            return _apply(source, tuple(self._tensors.shape(source.key)))
        return _apply(source, tuple(np.shape(self._tensors[source.key])))

    def __iter__(self) -> Iterator[str]:
        return iter(self.sources)

    def __len__(self) -> int:
        return len(self.sources)


# ---------------------------------------------------------------------------------------------
# Original -> diffusers
# ---------------------------------------------------------------------------------------------


def _map_with_table(keys, prefix: str, table: Table, sources: dict, unmapped: list) -> None:
    for key in keys:
        found = lookup(key[len(prefix) :], table)
        if found is None:
            unmapped.append(key)
        else:
            sources[found[0]] = Source(key, found[1])


def _map_unet(keys: list[str], unmapped: list) -> dict[str, Source]:
    rel = [k[len(UNET_PREFIX) :] for k in keys]
    sources: dict[str, Source] = {}
    _map_with_table(keys, UNET_PREFIX, unet_table(unet_layout_original(rel)), sources, unmapped)
    return sources


def _map_vae(keys: list[str], unmapped: list) -> dict[str, Source]:
    rel = [k[len(VAE_PREFIX) :] for k in keys]
    levels = len(indices(rel, r"encoder\.down\.(\d+)\."))
    layers = len(indices(rel, r"encoder\.down\.0\.block\.(\d+)\."))
    sources: dict[str, Source] = {}
    _map_with_table(keys, VAE_PREFIX, vae_table(levels, layers), sources, unmapped)
    return sources


def _map_hf_clip(keys: list[str], prefix: str, unmapped: list) -> dict[str, Source]:
    sources = {}
    for key in keys:
        name = key[len(prefix) :]
        if name == "text_model.embeddings.position_ids":  # a buffer, not a weight
            continue
        if name.startswith("text_model."):
            sources[name] = Source(key)
        else:
            unmapped.append(key)
    return sources


def _map_openclip(
    keys: list[str], prefix: str, kind: str, with_projection: bool, unmapped: list
) -> dict[str, Source]:
    rel = [k[len(prefix) :] for k in keys]
    layers = indices(rel, r"transformer\.resblocks\.(\d+)\.")
    skip = {"logit_scale"}
    if kind == "sd2":
        skip |= {"text_projection", "text_projection.weight"}
        if SD2_DROPPED_LAYER in layers:
            layers.remove(SD2_DROPPED_LAYER)
            skip |= {n for n in rel if n.startswith(f"transformer.resblocks.{SD2_DROPPED_LAYER}.")}
    table = openclip_table(len(layers), with_projection)
    sources = {}
    fused = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
    for key, name in zip(keys, rel):
        if name in skip:
            continue
        if m := fused.match(name):
            for part, q in enumerate("qkv"):
                target = f"text_model.encoder.layers.{m.group(1)}.self_attn.{q}_proj.{m.group(2)}"
                sources[target] = Source(key, "rows", part)
        elif name == "text_projection.weight" and with_projection:
            # Some tools save the projection as an nn.Linear ([dim, width]), as ComfyUI accepts.
            sources["text_projection.weight"] = Source(key)
        elif found := lookup(name, table):
            sources[found[0]] = Source(key, found[1])
        else:
            unmapped.append(key)
    return sources


def detect_kind(keys, shape) -> str:
    """Which model an original checkpoint holds: one of `KINDS`.

    Args:
      keys: the checkpoint's entry names.
      shape: callable `key -> shape tuple`.
    The text encoders name the family (SD1 CLIP-L in transformers layout, SD2 OpenCLIP-H, SDXL's
    CLIP-L + OpenCLIP-bigG, the refiner's lone bigG). Without text encoders the U-Net's
    cross-attention width decides (768 SD1, 1024 SD2, 2048 SDXL, 1280 refiner). A 9-channel
    `conv_in` (latents + mask + masked-image latents) adds "-inpaint".
    """
    keys = set(keys)
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise CheckpointError(
            f"not a Stable Diffusion checkpoint in the original layout: no {UNET_PREFIX}* "
            f"entries. Found: {prefixes(keys)}"
        )
    markers = {
        "sdxl": "conditioner.embedders.1.model.positional_embedding",
        "sdxl-refiner": "conditioner.embedders.0.model.positional_embedding",
        "sd2": "cond_stage_model.model.positional_embedding",
        "sd1": "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
    }
    found = [kind for kind, marker in markers.items() if marker in keys]
    has_label_emb = UNET_PREFIX + "label_emb.0.0.weight" in keys
    if found:
        kind = found[0]
    else:
        context = [
            shape(k)[1]
            for k in sorted(keys)
            if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")
        ]
        by_width = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl-refiner"}
        if not context or context[0] not in by_width:
            raise CheckpointError(
                "cannot tell which Stable Diffusion model this is: no known text-encoder entries "
                f"({', '.join(markers.values())}) and U-Net cross-attention width "
                f"{context[0] if context else None} is not one of {sorted(by_width)}. "
                f"Found: {prefixes(keys)}"
            )
        kind = by_width[context[0]]
    if has_label_emb != kind.startswith("sdxl"):
        raise CheckpointError(
            f"inconsistent checkpoint: it looks like {kind}, but the U-Net "
            f"{'has' if has_label_emb else 'lacks'} the label_emb (SDXL added conditioning)"
        )
    if shape(UNET_PREFIX + "input_blocks.0.0.weight")[1] == 9:
        kind += "-inpaint"
    return kind


def convert_original(
    tensors: Mapping[str, np.ndarray], *, prediction_type: str | None = None
) -> tuple[str, dict, dict]:
    """Map an original-layout state dict (a Mapping, ideally lazy with `shape(key)`) to
    diffusers names; see `read_single_file`."""
    keys = list(tensors)
    if hasattr(tensors, "shape"):
        shape = tensors.shape
    else:
        shape = lambda k: tuple(np.shape(tensors[k]))
    kind = detect_kind(keys, shape)
    base = kind.removesuffix("-inpaint")
    unmapped: list[str] = []
    claimed = set(UNUSED_KEYS)
    sources = {"unet": _map_unet([k for k in keys if k.startswith(UNET_PREFIX)], unmapped)}
    claimed |= {k for k in keys if k.startswith(UNET_PREFIX)}
    vae_keys = [k for k in keys if k.startswith(VAE_PREFIX) and not k.startswith(UNUSED_PREFIXES)]
    if vae_keys:
        sources["vae"] = _map_vae(vae_keys, unmapped)
        claimed |= set(vae_keys)
    for component, (prefix, layout) in TEXT_ENCODERS[base].items():
        te_keys = [k for k in keys if k.startswith(prefix)]
        if not te_keys:
            continue
        claimed |= set(te_keys)
        if layout == "hf":
            sources[component] = _map_hf_clip(te_keys, prefix, unmapped)
        else:
            with_projection = component == "text_encoder_2"
            sources[component] = _map_openclip(te_keys, prefix, base, with_projection, unmapped)
    unmapped += [k for k in keys if k not in claimed and not k.startswith(UNUSED_PREFIXES)]
    if unmapped:
        raise CheckpointError(
            f"{len(unmapped)} entries of this {kind} checkpoint have no diffusers counterpart: "
            + ", ".join(sorted(unmapped)[:50])
            + (" ..." if len(unmapped) > 50 else "")
        )
    state_dicts = {c: MappedStateDict(tensors, s) for c, s in sources.items()}
    configs = original_configs.configs_for(
        kind,
        state_dicts,
        prediction_type=prediction_type,
        v_pred_marker="v_pred" in tensors,
        zero_snr_marker="ztsnr" in tensors,
    )
    return kind, configs, state_dicts


def read_single_file(
    path: str | pathlib.Path, *, prediction_type: str | None = None
) -> tuple[str, dict, dict]:
    """Read an original single-file Stable Diffusion checkpoint.

    Args:
      path: `.safetensors` (memory-mapped, tensors read when accessed), or `.ckpt`/`.bin`/`.pt`
        read only with `torch.load(weights_only=True)` (needs torch; a nested "state_dict" is
        unwrapped). See `ldm_jax.convert.state_dict.read_state_dict`.
      prediction_type: "epsilon" or "v_prediction" for the scheduler config. The keys cannot
        tell; by default SD 2.x (non-inpaint) is "v_prediction" as in the 768-v release that
        diffusers assumes for "v2" files, everything else "epsilon" (or "v_prediction" when the
        file carries a `v_pred` marker entry).
    Returns:
      (kind, configs, state_dicts): kind in `KINDS`; configs
      {"unet", "vae", "text_encoder", "text_encoder_2", "scheduler"} (those present) in
      diffusers / transformers config.json vocabulary; state_dicts with the same component
      names, lazy `MappedStateDict`s of float32 numpy arrays (PyTorch layouts: OIHW convs,
      [out, in] linears). The SDXL refiner's only text encoder is "text_encoder_2", as in its
      diffusers folder.
    """
    return convert_original(read_state_dict(path), prediction_type=prediction_type)


# ---------------------------------------------------------------------------------------------
# Diffusers -> original
# ---------------------------------------------------------------------------------------------


def _inverse_op(op: str, value: np.ndarray) -> np.ndarray:
    if op == "squeeze":
        return value.reshape(*value.shape, 1, 1) if value.ndim == 2 else value
    if op == "transpose":
        return value.T
    return value


def _export_with_table(state_dict, table: Table, prefix: str, component: str) -> dict:
    inverse, out, unmapped = invert(table), {}, []
    for key, value in state_dict.items():
        found = lookup(key, inverse)
        if found is None:
            unmapped.append(key)
        else:
            out[prefix + found[0]] = _inverse_op(found[1], np.asarray(value))
    if unmapped:
        raise CheckpointError(
            f"{component}: {len(unmapped)} entries have no original-layout name: "
            + ", ".join(sorted(unmapped)[:50])
        )
    return out


def _with_text_model_prefix(state_dict) -> dict:
    """transformers 5 `CLIPTextModel.state_dict()` drops the `text_model.` prefix; accept both."""
    bare = ("embeddings.", "encoder.", "final_layer_norm.")
    return {("text_model." + k if k.startswith(bare) else k): v for k, v in state_dict.items()}


def _export_openclip(state_dict, prefix: str, component: str, with_projection: bool) -> dict:
    state_dict = _with_text_model_prefix(state_dict)
    layers = indices(state_dict, r"text_model\.encoder\.layers\.(\d+)\.")
    fused = re.compile(
        r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$"
    )
    rest, parts = {}, collections.defaultdict(dict)
    for key, value in state_dict.items():
        if m := fused.match(key):
            parts[(int(m.group(1)), m.group(3))][m.group(2)] = np.asarray(value)
        else:
            rest[key] = value
    out = _export_with_table(rest, openclip_table(len(layers), with_projection), prefix, component)
    for (layer, leaf), qkv in sorted(parts.items()):
        if set(qkv) != {"q", "k", "v"}:
            raise CheckpointError(f"{component}: layer {layer} {leaf} lacks one of q/k/v: {qkv}")
        name = f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{leaf}"
        out[name] = np.concatenate([qkv["q"], qkv["k"], qkv["v"]], axis=0)
    return out


def to_single_file(kind: str, state_dicts: Mapping[str, Mapping]) -> dict[str, np.ndarray]:
    """Diffusers-named component state dicts -> one original-layout state dict.

    Args:
      kind: one of `KINDS` (picks the text-encoder layout).
      state_dicts: {"unet", "vae", "text_encoder", "text_encoder_2"} (any subset the kind has),
        each `name -> array` as in `read_single_file`. CLIP names with or without `text_model.`.
    Returns:
      `original name -> numpy array`. SD 2's text encoder is written with the layers it has
      (23 for ViT-H): the dropped 24th layer and the unused projection cannot be recreated.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    base = kind.removesuffix("-inpaint")
    allowed = {"unet", "vae", *TEXT_ENCODERS[base]}
    if extra := set(state_dicts) - allowed:
        raise ValueError(f"{kind} has no component(s) {sorted(extra)}; expected {sorted(allowed)}")
    out = {}
    if "unet" in state_dicts:
        table = unet_table(unet_layout_diffusers(list(state_dicts["unet"])))
        out |= _export_with_table(state_dicts["unet"], table, UNET_PREFIX, "unet")
    if "vae" in state_dicts:
        keys = list(state_dicts["vae"])
        levels = len(indices(keys, r"encoder\.down_blocks\.(\d+)\."))
        layers = len(indices(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."))
        table = vae_table(levels, layers)
        out |= _export_with_table(state_dicts["vae"], table, VAE_PREFIX, "vae")
    for component, (prefix, layout) in TEXT_ENCODERS[base].items():
        if component not in state_dicts:
            continue
        if layout == "hf":
            table = {"text_model": ("text_model", "copy")}
            sd = _with_text_model_prefix(state_dicts[component])
            out |= _export_with_table(sd, table, prefix, component)
        else:
            with_projection = component == "text_encoder_2"
            out |= _export_openclip(state_dicts[component], prefix, component, with_projection)
    return out


def save_single_file(
    path: str | pathlib.Path, kind: str, state_dicts: Mapping[str, Mapping]
) -> None:
    """Write `to_single_file(kind, state_dicts)` as a .safetensors file (for A1111 / ComfyUI)."""
    from safetensors.numpy import save_file

    path = pathlib.Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_single_file writes .safetensors only, got {path}")
    flat = {k: np.ascontiguousarray(v) for k, v in to_single_file(kind, state_dicts).items()}
    save_file(flat, str(path), metadata={"format": "pt", "ldm_jax.kind": kind})
