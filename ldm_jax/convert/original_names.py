"""Module-name tables between the original (CompVis / Stability) and diffusers layouts.

A table maps an original module path to `(diffusers module path, op)`; `lookup` matches whole
dotted components, the longest entry wins, and the rest of the key (`weight`, `bias`, or a whole
transformer subtree that both layouts name alike) is carried over. The tables reproduce
diffusers' `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint` and
`convert_open_clip_checkpoint` (diffusers/loaders/single_file_utils.py) as explicit, invertible
name maps. `op` is "copy", "squeeze" (1x1 conv <-> linear) or "transpose".
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Mapping

from ldm_jax.convert.state_dict import CheckpointError

_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_VAE_RESNET = {n: n for n in ("norm1", "conv1", "norm2", "conv2")} | {
    "nin_shortcut": "conv_shortcut"
}
# The VAE mid-block attention is 1x1 convs in the original, nn.Linear in diffusers.
_VAE_ATTENTION = {
    "norm": "group_norm",
    "q": "to_q",
    "k": "to_k",
    "v": "to_v",
    "proj_out": "to_out.0",
}
_OPENCLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}


Table = dict[str, tuple[str, str]]


def prefixes(keys, depth: int = 2) -> str:
    """A summary of `keys` by their first `depth` components, for error messages."""
    counts = collections.Counter(".".join(k.split(".")[:depth]) for k in keys)
    return ", ".join(f"{p}.* ({n})" for p, n in sorted(counts.items()))


def lookup(key: str, table: Table) -> tuple[str, str] | None:
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        head = ".".join(parts[:n])
        if head in table:
            target, op = table[head]
            return ".".join([target, *parts[n:]]), op
    return None


def invert(table: Table) -> Table:
    return {target: (source, op) for source, (target, op) in table.items()}


def indices(keys, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := regex.match(k))})


def _submodules(src: str, dst: str, names: Mapping[str, str], op: str = "copy") -> Table:
    return {f"{src}.{a}": (f"{dst}.{b}", op) for a, b in names.items()}


@dataclasses.dataclass(frozen=True)
class UNetLayout:
    """What the U-Net renames depend on: resnets per down level and which levels attend."""

    layers_per_block: int
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]


def unet_layout_original(keys: list[str]) -> UNetLayout:
    blocks = indices(keys, r"input_blocks\.(\d+)\.")
    if not blocks:
        raise CheckpointError(f"U-Net has no input_blocks.* entries; found {prefixes(keys)}")
    n_down = sum(f"input_blocks.{n}.0.op.weight" in keys for n in blocks)
    levels = n_down + 1
    # input_blocks = [conv_in] + per level: layers_per_block resnets (+ a downsampler, not last)
    layers_per_block, rest = divmod(max(blocks) - n_down, levels)
    if rest or layers_per_block < 1:
        raise CheckpointError(
            f"U-Net with {max(blocks) + 1} input blocks and {n_down} downsamplers does not "
            "split into equal levels"
        )
    step = layers_per_block + 1

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    return UNetLayout(
        layers_per_block,
        tuple(has(f"input_blocks.{1 + b * step}.1.") for b in range(levels)),
        tuple(has(f"output_blocks.{b * step}.1.") for b in range(levels)),
    )


def unet_layout_diffusers(keys: list[str]) -> UNetLayout:
    levels = len(indices(keys, r"down_blocks\.(\d+)\."))
    if not levels:
        raise CheckpointError(f"U-Net has no down_blocks.* entries; found {prefixes(keys)}")
    layers_per_block = len(indices(keys, r"down_blocks\.0\.resnets\.(\d+)\."))

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    return UNetLayout(
        layers_per_block,
        tuple(has(f"down_blocks.{b}.attentions.") for b in range(levels)),
        tuple(has(f"up_blocks.{b}.attentions.") for b in range(levels)),
    )


def unet_table(layout: UNetLayout) -> Table:
    """Original -> diffusers module names (diffusers' convert_ldm_unet_checkpoint)."""
    table: Table = {
        "time_embed.0": ("time_embedding.linear_1", "copy"),
        "time_embed.2": ("time_embedding.linear_2", "copy"),
        "label_emb.0.0": ("add_embedding.linear_1", "copy"),  # SDXL text_time conditioning
        "label_emb.0.2": ("add_embedding.linear_2", "copy"),
        "input_blocks.0.0": ("conv_in", "copy"),
        "out.0": ("conv_norm_out", "copy"),
        "out.2": ("conv_out", "copy"),
        "middle_block.1": ("mid_block.attentions.0", "copy"),
    }
    table |= _submodules("middle_block.0", "mid_block.resnets.0", _UNET_RESNET)
    table |= _submodules("middle_block.2", "mid_block.resnets.1", _UNET_RESNET)
    levels, step = len(layout.down_attention), layout.layers_per_block + 1
    for b in range(levels):
        for i in range(layout.layers_per_block):
            n = 1 + b * step + i
            table |= _submodules(
                f"input_blocks.{n}.0", f"down_blocks.{b}.resnets.{i}", _UNET_RESNET
            )
            if layout.down_attention[b]:
                table[f"input_blocks.{n}.1"] = (f"down_blocks.{b}.attentions.{i}", "copy")
        if b < levels - 1:
            n = 1 + b * step + layout.layers_per_block
            table[f"input_blocks.{n}.0.op"] = (f"down_blocks.{b}.downsamplers.0.conv", "copy")
        # Up blocks have one resnet more (they also take the downsampler's skip connection).
        for i in range(step):
            n = b * step + i
            table |= _submodules(f"output_blocks.{n}.0", f"up_blocks.{b}.resnets.{i}", _UNET_RESNET)
            if layout.up_attention[b]:
                table[f"output_blocks.{n}.1"] = (f"up_blocks.{b}.attentions.{i}", "copy")
        if b < levels - 1:
            n, j = b * step + layout.layers_per_block, 2 if layout.up_attention[b] else 1
            table[f"output_blocks.{n}.{j}.conv"] = (f"up_blocks.{b}.upsamplers.0.conv", "copy")
    return table


def vae_table(levels: int, layers_per_block: int) -> Table:
    """Original -> diffusers module names (diffusers' convert_ldm_vae_checkpoint)."""
    table: Table = {n: (n, "copy") for n in ("quant_conv", "post_quant_conv")}
    for part in ("encoder", "decoder"):
        for n in ("conv_in", "conv_out"):
            table[f"{part}.{n}"] = (f"{part}.{n}", "copy")
        table[f"{part}.norm_out"] = (f"{part}.conv_norm_out", "copy")
        for i in (1, 2):
            table |= _submodules(
                f"{part}.mid.block_{i}", f"{part}.mid_block.resnets.{i - 1}", _VAE_RESNET
            )
        table |= _submodules(
            f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", _VAE_ATTENTION, "squeeze"
        )
    for i in range(levels):
        for j in range(layers_per_block):
            table |= _submodules(
                f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", _VAE_RESNET
            )
        if i < levels - 1:
            table[f"encoder.down.{i}.downsample.conv"] = (
                f"encoder.down_blocks.{i}.downsamplers.0.conv",
                "copy",
            )
        # The original decoder counts levels from the lowest resolution up; diffusers reverses.
        up = levels - 1 - i
        for j in range(layers_per_block + 1):
            table |= _submodules(
                f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}", _VAE_RESNET
            )
        if i > 0:
            table[f"decoder.up.{i}.upsample.conv"] = (
                f"decoder.up_blocks.{up}.upsamplers.0.conv",
                "copy",
            )
    return table


def openclip_table(num_layers: int, with_projection: bool) -> Table:
    """OpenCLIP -> transformers CLIP names (diffusers' convert_open_clip_checkpoint), except the
    fused attention input projection, which `_map_openclip` splits into q/k/v."""
    table: Table = {
        "token_embedding": ("text_model.embeddings.token_embedding", "copy"),
        "positional_embedding": ("text_model.embeddings.position_embedding.weight", "copy"),
        "ln_final": ("text_model.final_layer_norm", "copy"),
    }
    if with_projection:
        table["text_projection"] = ("text_projection.weight", "transpose")
    for i in range(num_layers):
        table |= _submodules(
            f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}", _OPENCLIP_LAYER
        )
    return table
