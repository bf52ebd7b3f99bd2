"""CLIP (Radford et al. 2021) text and image towers, laid out like transformers' `CLIPTextModel` /
`CLIPTextModelWithProjection` and `CLIPVisionModel` / `CLIPVisionModelWithProjection`.

`CLIPTextTransformer` holds what transformers stores under `text_model.` in checkpoints
(`text_model.encoder.layers.3.self_attn.q_proj.weight` -> `encoder/layers_3/self_attn/q_proj/kernel`;
transformers 5 itself drops the `text_model.` prefix for `CLIPTextModel`), plus `text_projection`
when `projection_dim` is set (SDXL's second encoder). The same class serves OpenAI's ViT-L/14
(SD1.x), OpenCLIP ViT-H/14 (SD2.x, penultimate layer: 23 of 24 layers kept, as diffusers ships it)
and OpenCLIP ViT-bigG/14 (SDXL).

`CLIPVisionTransformer` is the image tower (`vision_model.` in a `CLIPModel` checkpoint, plus
`visual_projection`): a ViT (Dosovitskiy et al. 2021) over non-overlapping patches with a class
token, built from the same `CLIPEncoder` as the text tower without the causal mask. With both
towers' projections, cosine(text_embeds, image_embeds) is the CLIP similarity behind CLIP score
(Hessel et al. 2021); `ldm_jax.convert.clip_model` loads a whole transformers `CLIPModel` folder.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ldm_jax.models.layers import PARAM_DTYPE, dense
from ldm_jax.sharding import constrain

Dtype = Any


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: nn.gelu(x, approximate=False)}


@flax.struct.dataclass
class CLIPTextOutput:
    """last_hidden_state: [B, L, hidden] after final_layer_norm (of layer N, or of layer
    N - clip_skip when `clip_skip` was given); pooled_output: [B, hidden] (always from layer N);
    hidden_states: (embeddings, layer_1, ..., layer_N) outputs before the final LN, or None;
    text_embeds: [B, projection_dim] = text_projection(pooled_output), or None."""

    last_hidden_state: jax.Array
    pooled_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    text_embeds: jax.Array | None = None


class CLIPAttention(nn.Module):
    """transformers `CLIPAttention`: q/k/v/out_proj with bias, scale head_dim**-0.5."""

    hidden_size: int
    num_heads: int
    implementation: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        b, length, _ = x.shape
        head_dim = self.hidden_size // self.num_heads
        proj = lambda name: constrain(
            dense(self.hidden_size, self.dtype, name)(x).reshape(
                b, length, self.num_heads, head_dim
            ),
            ("batch", None, "heads", None),
        )
        q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
        out = jax.nn.dot_product_attention(
            q, k, v, mask=mask, scale=head_dim**-0.5, implementation=self.implementation
        )
        return dense(self.hidden_size, self.dtype, "out_proj")(out.reshape(b, length, -1))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer layer: x += self_attn(layer_norm1(x)); x += mlp(layer_norm2(x))."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        ln = lambda name: nn.LayerNorm(
            epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=PARAM_DTYPE, name=name
        )
        x = x + CLIPAttention(
            self.hidden_size,
            self.num_heads,
            self.attention_implementation,
            self.dtype,
            name="self_attn",
        )(ln("layer_norm1")(x), mask)
        x = x + CLIPMLP(self.intermediate_size, self.hidden_act, self.dtype, name="mlp")(
            ln("layer_norm2")(x)
        )
        return constrain(x, ("batch", None, None))


class CLIPMLP(nn.Module):
    """transformers `CLIPMLP`: fc1 -> activation -> fc2."""

    intermediate_size: int
    hidden_act: str = "quick_gelu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = ACTIVATIONS[self.hidden_act](dense(self.intermediate_size, self.dtype, "fc1")(x))
        h = constrain(h, ("batch", None, "mlp"))
        return dense(x.shape[-1], self.dtype, "fc2")(h)


class CLIPTextEmbeddings(nn.Module):
    """token_embedding(input_ids) + position_embedding(0..L-1). [B, L] int32 -> [B, L, hidden]."""

    vocab_size: int
    hidden_size: int
    max_position_embeddings: int = 77
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        embed = lambda n, name: nn.Embed(
            n, self.hidden_size, dtype=self.dtype, param_dtype=PARAM_DTYPE, name=name
        )
        positions = jnp.arange(input_ids.shape[1])[None, :]
        return embed(self.vocab_size, "token_embedding")(input_ids) + embed(
            self.max_position_embeddings, "position_embedding"
        )(positions)


class CLIPEncoder(nn.Module):
    """`num_layers` CLIPEncoderLayers (`layers_0` ...). Returns (input, layer_1 out, ...,
    layer_N out).

    mask: bool [B or 1, 1, L, L], True = attend (the text tower's causal mask), or None for
    full bidirectional attention (the image tower)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h, mask) -> tuple[jax.Array, ...]:
        hidden_states = [h]
        for i in range(self.num_layers):
            h = CLIPEncoderLayer(
                self.hidden_size,
                self.intermediate_size,
                self.num_heads,
                self.hidden_act,
                self.layer_norm_eps,
                self.attention_implementation,
                self.dtype,
                name=f"layers_{i}",
            )(h, mask)
            hidden_states.append(h)
        return tuple(hidden_states)


def _encoder(tower) -> CLIPEncoder:
    """The `encoder` submodule of a text or image tower, from the fields both name alike (call
    inside the tower's compact __call__)."""
    return CLIPEncoder(
        tower.num_hidden_layers,
        tower.hidden_size,
        tower.intermediate_size,
        tower.num_attention_heads,
        tower.hidden_act,
        tower.layer_norm_eps,
        tower.attention_implementation,
        tower.dtype,
        name="encoder",
    )


class CLIPTextTransformer(nn.Module):
    """The CLIP text tower: causal (GPT-style) pre-LN transformer over BPE tokens.

    Pooling (transformers 5 `CLIPTextModel`): the final-LN hidden state at the first position where
    `input_ids == eos_token_id`. transformers applies a legacy rule when a config says
    `eos_token_id == 2` (the value in the original OpenAI/diffusers configs): the position of the
    largest token id. With the real CLIP tokenizer both rules pick the same token (end-of-text,
    49407, is the largest id and argmax takes the first occurrence), so the real variants here use
    eos_token_id=49407 and first-EOS pooling; set `legacy_argmax_pooling` to reproduce the legacy
    rule exactly for other vocabularies.
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int | None = (
        None  # set -> text_projection (no bias), CLIPTextModelWithProjection
    )
    legacy_argmax_pooling: bool = False
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        output_hidden_states: bool = False,
        clip_skip: int | None = None,
    ) -> CLIPTextOutput:
        """input_ids: int32[B, L] (L <= max_position_embeddings); attention_mask: [B, L] with 1 for
        real tokens and 0 for padding (SD does not pass one). Returns a `CLIPTextOutput`.

        clip_skip: diffusers' meaning for SD 1.x/2.x (`StableDiffusionPipeline.encode_prompt`):
        skip the last `clip_skip` layers, i.e. `last_hidden_state` is
        final_layer_norm(hidden_states[-(clip_skip + 1)]); 1 = the penultimate layer. SDXL instead
        takes `hidden_states[-(clip_skip + 2)]` without the final LN: see
        `sdxl_prompt_hidden_state`.
        """
        if clip_skip is not None and not 0 <= clip_skip < self.num_hidden_layers:
            raise ValueError(f"clip_skip={clip_skip} outside [0, {self.num_hidden_layers})")
        length = input_ids.shape[1]
        if length > self.max_position_embeddings:
            raise ValueError(f"sequence length {length} > {self.max_position_embeddings}")
        h = CLIPTextEmbeddings(
            self.vocab_size,
            self.hidden_size,
            self.max_position_embeddings,
            self.dtype,
            name="embeddings",
        )(input_ids)
        # Causal mask (token i attends to j <= i) combined with the key-padding mask, as
        # transformers' create_causal_mask. bool [B or 1, 1, L, L], True = attend.
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
        if attention_mask is not None:
            mask = mask & (attention_mask[:, None, None, :] > 0)
        hidden_states = _encoder(self)(h, mask)
        final_layer_norm = nn.LayerNorm(
            epsilon=self.layer_norm_eps,
            dtype=self.dtype,
            param_dtype=PARAM_DTYPE,
            name="final_layer_norm",
        )
        last = final_layer_norm(hidden_states[-1])
        if self.legacy_argmax_pooling:
            index = jnp.argmax(input_ids, axis=-1)
        else:
            index = jnp.argmax(input_ids == self.eos_token_id, axis=-1)  # first EOS
        pooled = last[jnp.arange(last.shape[0]), index]
        text_embeds = None
        if self.projection_dim is not None:
            text_embeds = dense(self.projection_dim, self.dtype, "text_projection", False)(pooled)
            text_embeds = text_embeds.astype(jnp.float32)
        if clip_skip:
            last = final_layer_norm(hidden_states[-(clip_skip + 1)])
        f32 = lambda x: x.astype(jnp.float32)
        return CLIPTextOutput(
            last_hidden_state=f32(last),
            pooled_output=f32(pooled),
            hidden_states=tuple(map(f32, hidden_states)) if output_hidden_states else None,
            text_embeds=text_embeds,
        )


def sdxl_prompt_hidden_state(output: CLIPTextOutput, clip_skip: int | None = None) -> jax.Array:
    """The per-token text conditioning SDXL takes from each of its text encoders (diffusers
    `StableDiffusionXLPipeline.encode_prompt`): hidden_states[-(clip_skip + 2)], no final LN;
    clip_skip=None is the penultimate layer. The encoder must run with output_hidden_states=True.
    Returns float32[B, L, hidden]."""
    if output.hidden_states is None:
        raise ValueError("call the text encoder with output_hidden_states=True")
    index = (clip_skip or 0) + 2
    if index > len(output.hidden_states):
        raise ValueError(f"clip_skip={clip_skip} too large for {len(output.hidden_states)} states")
    return output.hidden_states[-index]


@flax.struct.dataclass
class CLIPVisionOutput:
    """last_hidden_state: [B, 1 + num_patches, hidden], the last layer's output (class token
    first, no final LN, as transformers returns it); pooled_output: [B, hidden] =
    post_layernorm(class token); image_embeds: [B, projection_dim] =
    visual_projection(pooled_output) (transformers `get_image_features`), or None;
    hidden_states: (embeddings after pre_layrnorm, layer_1, ..., layer_N), or None."""

    last_hidden_state: jax.Array
    pooled_output: jax.Array
    image_embeds: jax.Array | None = None
    hidden_states: tuple[jax.Array, ...] | None = None


class CLIPVisionEmbeddings(nn.Module):
    """transformers `CLIPVisionEmbeddings`: [class_embedding, patch_embedding(patches)] +
    position_embedding(0..num_patches). float32[B, H, W, C] -> [B, 1 + num_patches, hidden].

    Patches are taken row-major (as PyTorch's `flatten(2)` of the NCHW conv output), so position
    i + 1 is patch (i // grid, i % grid). Only the trained resolution is accepted: transformers'
    `interpolate_pos_encoding` (bicubic resampling of the position table) is not implemented."""

    image_size: int
    patch_size: int
    hidden_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        b, height, width, _ = pixel_values.shape
        if (height, width) != (self.image_size, self.image_size):
            raise ValueError(
                f"input image size {height}x{width} does not match the model's "
                f"{self.image_size}x{self.image_size} (resize first: preprocess_images)"
            )
        p = self.patch_size
        patches = nn.Conv(
            self.hidden_size,
            (p, p),
            strides=(p, p),
            padding="VALID",  # floor(image_size / patch_size) patches per side, as PyTorch
            use_bias=False,
            dtype=self.dtype,
            param_dtype=PARAM_DTYPE,
            name="patch_embedding",
        )(pixel_values)
        patches = patches.reshape(b, -1, self.hidden_size)
        class_embedding = self.param(
            "class_embedding", nn.initializers.normal(1.0), (self.hidden_size,), PARAM_DTYPE
        )
        cls = jnp.broadcast_to(class_embedding.astype(patches.dtype), (b, 1, self.hidden_size))
        num_positions = (self.image_size // p) ** 2 + 1
        positions = nn.Embed(
            num_positions,
            self.hidden_size,
            dtype=self.dtype,
            param_dtype=PARAM_DTYPE,
            name="position_embedding",
        )(jnp.arange(num_positions))
        return jnp.concatenate([cls, patches], axis=1) + positions[None]


class CLIPVisionTransformer(nn.Module):
    """The CLIP image tower (transformers `CLIPVisionModel`, `vision_model.` in checkpoints):
    embeddings -> pre_layrnorm (sic, transformers' name) -> bidirectional pre-LN encoder ->
    post_layernorm of the class token -> optional visual_projection (no bias).

    Defaults are OpenAI's ViT-L/14 at 224 px without the projection (`CLIP_VISION_VARIANTS`)."""

    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None  # set -> visual_projection, CLIPVisionModelWithProjection
    attention_implementation: str | None = None
    dtype: Dtype = jnp.float32

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @nn.compact
    def __call__(
        self, pixel_values: jax.Array, output_hidden_states: bool = False
    ) -> CLIPVisionOutput:
        """pixel_values: float32[B, image_size, image_size, 3], already resized, rescaled and
        normalized with the CLIP mean/std (`ldm_jax.convert.clip_model.preprocess_images`).
        Returns a `CLIPVisionOutput`."""
        ln = lambda name: nn.LayerNorm(
            epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=PARAM_DTYPE, name=name
        )
        h = CLIPVisionEmbeddings(
            self.image_size, self.patch_size, self.hidden_size, self.dtype, name="embeddings"
        )(pixel_values)
        h = constrain(ln("pre_layrnorm")(h), ("batch", None, None))
        hidden_states = _encoder(self)(h, None)  # no mask: every token attends to every token
        last = hidden_states[-1]
        pooled = ln("post_layernorm")(last[:, 0])
        image_embeds = None
        if self.projection_dim is not None:
            project = dense(self.projection_dim, self.dtype, "visual_projection", False)
            image_embeds = project(pooled).astype(jnp.float32)
        f32 = lambda x: x.astype(jnp.float32)
        return CLIPVisionOutput(
            last_hidden_state=f32(last),
            pooled_output=f32(pooled),
            image_embeds=image_embeds,
            hidden_states=tuple(map(f32, hidden_states)) if output_hidden_states else None,
        )


# Field dicts of the text encoders of the SD family (transformers `CLIPTextConfig` names).
CLIP_VARIANTS: dict[str, dict[str, Any]] = {
    # openai/clip-vit-large-patch14 (SD1.x): 123,060,480 parameters.
    "vit-l-14": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "hidden_act": "quick_gelu",
    },
    # OpenCLIP ViT-H/14 as shipped with SD2.x (23 of 24 layers: SD2 conditions on the penultimate
    # layer): 340,387,840 parameters.
    "openclip-h": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 23,
        "num_attention_heads": 16,
        "hidden_act": "gelu",
    },
    # OpenCLIP ViT-bigG/14 with projection (SDXL text_encoder_2): 694,659,840 parameters.
    "openclip-bigg": {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 20,
        "hidden_act": "gelu",
        "projection_dim": 1280,
    },
    # For tests and CPU smoke runs with the byte-level test tokenizer (eos id 2).
    "tiny": {
        "vocab_size": 259,
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "hidden_act": "quick_gelu",
        "eos_token_id": 2,
    },
}


def clip_from_variant(name: str, **overrides) -> CLIPTextTransformer:
    return CLIPTextTransformer(**{**CLIP_VARIANTS[name], **overrides})


# Field dicts of image towers (transformers `CLIPVisionConfig` names).
CLIP_VISION_VARIANTS: dict[str, dict[str, Any]] = {
    # openai/clip-vit-large-patch14 with visual_projection (the CLIP of SD1.x's text encoder and
    # of CLIP score): 303,966,208 parameters (303,179,776 without the projection).
    "vit-l-14": {
        "image_size": 224,
        "patch_size": 14,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
    },
    # For tests: 32 px images, 4 x 4 patches of 8 px.
    "tiny": {
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "hidden_act": "quick_gelu",
        "projection_dim": 16,
    },
}


def clip_vision_from_variant(name: str, **overrides) -> CLIPVisionTransformer:
    return CLIPVisionTransformer(**{**CLIP_VISION_VARIANTS[name], **overrides})
