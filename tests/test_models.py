"""Networks: shapes of the tiny variants, reference parameter counts of the real ones, and numerical
parity with diffusers / transformers (PyTorch, float32) with weights copied by name."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.convert.naming import torch_key_to_flax_path
from ldm_jax.models import layers
from ldm_jax.models.clip import CLIP_VARIANTS, CLIPTextTransformer, clip_from_variant
from ldm_jax.models.layers import count_params
from ldm_jax.models.unet import (
    UNET_VARIANTS,
    UNet2DConditionModel,
    ip_adapter_layer_scales,
    unet_from_variant,
)
from ldm_jax.models.vae import VAE_VARIANTS, DiagonalGaussianDistribution, vae_from_variant

KEY = jax.random.key(0)


# ---------------------------------------------------------------- torch -> flax by name
def torch_to_flax(module) -> dict:
    """Copy a PyTorch module's parameters into a Flax params tree by the naming convention of
    these models (`ldm_jax.convert.naming`): `a.b.0.c.weight` -> a/b_0/c/{kernel,scale,embedding},
    with layout transposes. (The converter proper derives the leaf from the model's own tree.)"""
    params: dict = {}
    for name, value in module.named_parameters():
        w = value.detach().numpy()
        if name.endswith(".bias"):
            leaf = "bias"
        elif w.ndim == 4:
            leaf, w = "kernel", w.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif w.ndim == 2 and "embedding" in name.split(".")[-2]:
            leaf = "embedding"
        elif w.ndim == 2:
            leaf, w = "kernel", w.T  # Linear [out, in] -> Dense [in, out]
        else:
            leaf = "scale"  # GroupNorm / LayerNorm weight
        *path, last = torch_key_to_flax_path(name, leaf)
        node = params
        for p in path:
            node = node.setdefault(p, {})
        node[last] = jnp.asarray(w)
    return {"params": params}


def assert_same_tree(model, copied, *args, **kwargs):
    """`model.init` has exactly the copied paths and shapes: the PyTorch <-> Flax naming is a
    mechanical mapping. eval_shape traces init without compiling it."""
    shape = lambda t: jax.tree_util.tree_map(lambda x: tuple(x.shape), t)
    assert shape(jax.eval_shape(lambda: model.init(KEY, *args, **kwargs))) == shape(copied)


def random_params(model, *args, **kwargs):
    """Parameters of `model` drawn with numpy. A real `init` compiles one random-number program
    per parameter shape (~20 s for the tiny U-Net on a 2-core CPU); the tests do not need it."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: model.init(KEY, *args, **kwargs))
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(0, 0.05, s.shape).astype(np.float32)), shapes
    )


def nchw(x):
    import torch

    return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


# ---------------------------------------------------------------- shapes
def test_tiny_unet_shapes_and_dtypes():
    model = unet_from_variant("tiny")
    x = jax.random.normal(KEY, (2, 8, 8, 4))
    ctx = jax.random.normal(KEY, (2, 16, 128))
    params = random_params(model, x, jnp.array([0.0, 999.0]), ctx)
    bf16 = unet_from_variant("tiny", dtype=jnp.bfloat16)
    dropout = unet_from_variant("tiny", dropout=0.1)

    @jax.jit  # one compilation for the three calls: compiling dominates on CPU
    def run(params, rng):
        out = model.apply(params, x, 500.5, ctx)  # a scalar fractional timestep broadcasts
        out_bf16 = bf16.apply(params, x, 500.5, ctx)
        out_train = dropout.apply(params, x, 500.5, ctx, train=True, rngs={"dropout": rng})
        return out, out_bf16, out_train

    out, out_bf16, out_train = run(params, KEY)
    assert out.shape == out_train.shape == (2, 8, 8, 4)
    assert out.dtype == out_bf16.dtype == out_train.dtype == jnp.float32
    assert float(jnp.mean(jnp.abs(out_bf16 - out))) < 0.05 * float(jnp.mean(jnp.abs(out)))
    assert not np.allclose(out_train, out)  # dropout is active with train=True


def test_tiny_vae_shapes_and_kl():
    vae = vae_from_variant("tiny")
    x = jax.random.uniform(KEY, (2, 32, 32, 3), minval=-1, maxval=1)
    params = random_params(vae, x)
    recon, posterior = jax.jit(lambda p: vae.apply(p, x, rng=KEY, sample_posterior=True))(params)
    assert recon.shape == x.shape and posterior.mean.shape == (2, 8, 8, 4)
    assert vae.downsampling_factor == 4 and posterior.kl().shape == (2,)
    std_normal = DiagonalGaussianDistribution(jnp.zeros((3, 4, 4, 4)), jnp.zeros((3, 4, 4, 4)))
    np.testing.assert_allclose(std_normal.kl(), 0.0, atol=1e-7)
    shifted = DiagonalGaussianDistribution(jnp.ones((1, 2, 2, 1)), jnp.zeros((1, 2, 2, 1)))
    np.testing.assert_allclose(shifted.kl(), [0.5 * 4], rtol=1e-6)  # 0.5 * mu^2 per element


def test_tiny_clip_shapes_and_causality():
    model = clip_from_variant("tiny")
    ids = jax.random.randint(KEY, (2, 77), 3, 259).at[:, 10].set(2)
    params = random_params(model, ids)
    apply = jax.jit(lambda p, i: model.apply(p, i, output_hidden_states=True))
    out = apply(params, ids)
    assert out.last_hidden_state.shape == (2, 77, 128) and out.pooled_output.shape == (2, 128)
    assert len(out.hidden_states) == 4 + 1 and out.text_embeds is None
    np.testing.assert_allclose(out.pooled_output, out.last_hidden_state[:, 10], atol=0)
    changed = apply(params, ids.at[:, 40].set(7))
    for before, after in zip(out.hidden_states, changed.hidden_states, strict=True):
        np.testing.assert_array_equal(before[:, :40], after[:, :40])
        assert not np.allclose(before[:, 40:], after[:, 40:])


# ---------------------------------------------------------------- reference parameter counts
def _count(model, *args, **kwargs):
    return count_params(jax.eval_shape(lambda: model.init(KEY, *args, **kwargs)))


@pytest.mark.parametrize(
    "name,expected", [("sd15", 859_520_964), ("sd21", 865_910_724), ("sdxl", 2_567_463_684)]
)
def test_unet_parameter_counts(name, expected):
    model = unet_from_variant(name)
    extra = {}
    if name == "sdxl":
        extra = {
            "added_cond_kwargs": {
                "text_embeds": jnp.zeros((1, 1280)),
                "time_ids": jnp.zeros((1, 6)),
            }
        }
    ctx = jnp.zeros((1, 77, model.cross_attention_dim))
    assert _count(model, jnp.zeros((1, 32, 32, 4)), jnp.zeros((1,)), ctx, **extra) == expected


def test_vae_parameter_count():
    assert _count(vae_from_variant("sd"), jnp.zeros((1, 64, 64, 3))) == 83_653_863


@pytest.mark.parametrize(
    "name,expected",
    [("vit-l-14", 123_060_480), ("openclip-h", 340_387_840), ("openclip-bigg", 694_659_840)],
)
def test_clip_parameter_counts(name, expected):
    assert _count(clip_from_variant(name), jnp.zeros((1, 77), jnp.int32)) == expected


# ---------------------------------------------------------------- parity with PyTorch
@pytest.mark.parametrize("flip,shift,dim", [(True, 0, 320), (False, 1, 64), (True, 1, 33)])
def test_timestep_embedding_matches_diffusers(flip, shift, dim):
    torch = pytest.importorskip("torch")
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([0.0, 1.0, 17.5, 60.25, 999.0], np.float32)
    ref = get_timestep_embedding(torch.from_numpy(t), dim, flip, shift).numpy()
    ours = np.asarray(layers.get_timestep_embedding(jnp.asarray(t), dim, flip, shift))
    np.testing.assert_allclose(ours[:3], ref[:3], atol=1e-6, rtol=0)
    # float32 exp() in XLA and in torch differ by up to 1 ulp (6e-8) for some frequencies, which
    # t multiplies: the argument of sin/cos then differs by ~t * 6e-8 (6e-5 at t = 999).
    np.testing.assert_allclose(ours[3:], ref[3:], atol=1e-7 * 999, rtol=0)


def _unet_pair(fields):
    torch = pytest.importorskip("torch")
    import diffusers

    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(sample_size=8, **fields).eval()
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return ref, UNet2DConditionModel(**cfg), torch_to_flax(ref)


@pytest.mark.parametrize("variant", ["tiny", "tiny_xl"])
def test_unet_matches_diffusers(variant):
    torch = pytest.importorskip("torch")
    if variant == "tiny":
        fields = dict(UNET_VARIANTS["tiny"])
    else:  # SDXL-style: no attention at level 0, per-level transformer depth, text_time added cond
        fields = {
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "attention_head_dim": (2, 4),
            "transformer_layers_per_block": (1, 2),
            "cross_attention_dim": 48,
            "norm_num_groups": 8,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 16 + 6 * 8,
        }
    ref, model, params = _unet_pair(
        {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
    )
    x = jax.random.normal(KEY, (2, 8, 8, 4))
    ctx = jax.random.normal(jax.random.key(1), (2, 7, fields["cross_attention_dim"]))
    t = np.array([3.0, 750.25], np.float32)
    kw, tkw = {}, {}
    if variant == "tiny_xl":
        text = np.random.default_rng(0).normal(size=(2, 16)).astype(np.float32)
        ids = np.array([[512, 512, 0, 0, 512, 512], [768, 1024, 16, 32, 1024, 1024]], np.float32)
        kw = {"added_cond_kwargs": {"text_embeds": jnp.asarray(text), "time_ids": jnp.asarray(ids)}}
        tkw = {
            "added_cond_kwargs": {
                "text_embeds": torch.from_numpy(text),
                "time_ids": torch.from_numpy(ids),
            }
        }
    assert_same_tree(model, params, x, t, ctx, **kw)
    ours = jax.jit(model.apply)(params, x, jnp.asarray(t), ctx, **kw)
    with torch.no_grad():
        want = ref(nchw(x), torch.from_numpy(t), torch.from_numpy(np.array(ctx)), **tkw).sample
    np.testing.assert_allclose(ours, want.numpy().transpose(0, 2, 3, 1), atol=2e-5, rtol=1e-4)


# The tiny U-Net of the conditioning-hook tests (diffusers' config fields): two levels, attention
# at level 0 and in the middle, so every skip and cross-attention position is exercised.
HOOKS_UNET = {
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "attention_head_dim": 2,
    "cross_attention_dim": 48,
    "norm_num_groups": 8,
}


def test_unet_conditioning_hooks_match_diffusers():
    """The inputs later capabilities feed the U-Net, against diffusers' forward: LCM's guidance
    embedding (`timestep_cond` through `time_embedding.cond_proj`) and ControlNet's residuals on
    every skip connection and after the mid block. Random residuals: zeros would prove nothing."""
    torch = pytest.importorskip("torch")
    from diffusers import LatentConsistencyModelPipeline

    from ldm_jax.convert.configs import unet_fields, unet_to_config

    fields = {**HOOKS_UNET, "time_cond_proj_dim": 7}  # odd: the embedding's zero padding too
    ref, model, params = _unet_pair(fields)
    assert unet_fields(dict(ref.config))["time_cond_proj_dim"] == 7
    assert unet_to_config(model)["time_cond_proj_dim"] == 7

    w = np.array([3.0, 7.5], np.float32) - 1  # diffusers' LCM pipeline embeds guidance - 1
    cond = layers.guidance_scale_embedding(jnp.asarray(w), 7)
    want_cond = LatentConsistencyModelPipeline.get_guidance_scale_embedding(
        None, torch.from_numpy(w), embedding_dim=7
    )
    # As for the timestep embedding: float32 exp() may differ by 1 ulp (6e-8) between XLA and
    # torch, times the argument 1000 w (measured: 3e-8).
    np.testing.assert_allclose(cond, want_cond.numpy(), atol=1e-7 * 1000 * w.max(), rtol=0)

    x = jax.random.normal(KEY, (2, 8, 8, 4))
    ctx = jax.random.normal(jax.random.key(1), (2, 5, 48))
    t = np.array([3.0, 750.25], np.float32)
    rng = np.random.default_rng(1)
    # conv_in, level 0's resnet and downsampler, level 1's resnet; then the mid block's output
    skip_shapes = [(2, 8, 8, 32), (2, 8, 8, 32), (2, 4, 4, 32), (2, 4, 4, 64)]
    down = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in skip_shapes]
    mid = jnp.asarray(rng.normal(size=(2, 4, 4, 64)), jnp.float32)
    hooks = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
    assert_same_tree(model, params, x, t, ctx, timestep_cond=cond)
    apply = jax.jit(lambda p, *args, **kw: model.apply(p, *args, **kw))
    ours = apply(params, x, jnp.asarray(t), ctx, timestep_cond=cond, **hooks)
    with torch.no_grad():
        want = ref(
            nchw(x),
            torch.from_numpy(t),
            torch.from_numpy(np.array(ctx)),
            timestep_cond=torch.from_numpy(np.array(cond)),
            down_block_additional_residuals=tuple(nchw(d) for d in down),
            mid_block_additional_residual=nchw(mid),
        ).sample
    np.testing.assert_allclose(ours, want.numpy().transpose(0, 2, 3, 1), atol=2e-5, rtol=1e-4)
    plain = apply(params, x, jnp.asarray(t), ctx, timestep_cond=cond)
    assert float(jnp.abs(plain - ours).max()) > 0.1  # the residuals reach the output

    with pytest.raises(ValueError, match="3 additional residuals for 4 skip connections"):
        model.apply(params, x, t, ctx, timestep_cond=cond, down_block_additional_residuals=down[:3])
    with pytest.raises(ValueError, match=r"shape \(2, 4, 4, 32\), its mid block \(2, 4, 4, 64\)"):
        model.apply(
            params, x, t, ctx, timestep_cond=cond, mid_block_additional_residual=down[3][..., :32]
        )
    with pytest.raises(ValueError, match=r"takes a condition of shape \(2, 7\)"):
        model.apply(params, x, t, ctx)


def test_unet_t2i_adapter_features_match_diffusers():
    """T2I-Adapter's `down_intrablock_additional_residuals`, against diffusers' forward: one
    feature per down block (inside the cross-attention block before its skip and downsampler;
    after the plain block, which diffusers adds in place, so its last skip too), and a third one
    of the mid block's shape added after it (T2I-Adapter-XL). Random features."""
    torch = pytest.importorskip("torch")

    ref, model, params = _unet_pair(HOOKS_UNET)
    x = jax.random.normal(KEY, (2, 8, 8, 4))
    ctx = jax.random.normal(jax.random.key(1), (2, 5, 48))
    t = np.array([3.0, 750.25], np.float32)
    rng = np.random.default_rng(2)
    shapes = [(2, 8, 8, 32), (2, 4, 4, 64), (2, 4, 4, 64)]  # level 0, level 1, the mid block
    features = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
    apply = jax.jit(
        lambda p, x, t, c, f: model.apply(p, x, t, c, down_intrablock_additional_residuals=f)
    )
    plain = model.apply(params, x, jnp.asarray(t), ctx)
    for n in (2, 3):
        ours = apply(params, x, jnp.asarray(t), ctx, features[:n])
        with torch.no_grad():
            want = ref(
                nchw(x),
                torch.from_numpy(t),
                torch.from_numpy(np.array(ctx)),
                down_intrablock_additional_residuals=[nchw(f) for f in features[:n]],  # popped
            ).sample
        np.testing.assert_allclose(ours, want.numpy().transpose(0, 2, 3, 1), atol=2e-5, rtol=1e-4)
        assert float(jnp.abs(plain - ours).max()) > 0.1  # the features reach the output
    with pytest.raises(ValueError, match=r"has shape \(2, 8, 8, 16\), its down block"):
        model.apply(params, x, t, ctx, down_intrablock_additional_residuals=[features[0][..., :16]])
    with pytest.raises(ValueError, match="1 down_intrablock_additional_residuals unused"):
        model.apply(
            params, x, t, ctx, down_intrablock_additional_residuals=[*features, features[2]]
        )


def _ip_adapter_pair(num_tokens):
    """(diffusers U-Net with IP-Adapter processors of these token counts and scales 0.7, 1.3,
    ours, its params, our config): random to_k_ip / to_v_ip, as torch initializes them."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

    fields = {**HOOKS_UNET, "use_linear_projection": True}
    ref, _, _ = _unet_pair(fields)
    processors = {}
    for name in ref.attn_processors:  # as diffusers' `_convert_ip_adapter_attn_to_diffusers`
        if name.endswith("attn1.processor"):
            processors[name] = AttnProcessor2_0()
            continue
        if name.startswith("mid_block"):
            width = fields["block_out_channels"][-1]
        else:
            level = int(name.split(".")[1])
            widths = fields["block_out_channels"]
            width = (widths[::-1] if name.startswith("up_blocks") else widths)[level]
        processors[name] = IPAdapterAttnProcessor2_0(
            width, 48, num_tokens=num_tokens, scale=[0.7, 1.3][: len(num_tokens)]
        )
    torch.manual_seed(1)
    ref.set_attn_processor(processors)

    class Tokens(torch.nn.Module):  # the projection's output passed through
        def forward(self, image_embeds):
            return image_embeds

    ref.encoder_hid_proj = Tokens()
    ref.register_to_config(encoder_hid_dim_type="ip_image_proj")
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    model = UNet2DConditionModel(**cfg, num_ip_adapters=len(num_tokens))
    params = torch_to_flax(ref)

    return ref, model, params, cfg


def _ip_reference(ref, x, t, ctx, image_embeds, **kwargs):
    """diffusers' U-Net output (NHWC numpy) with IP-Adapter image embeddings."""
    import torch

    embeds = [torch.from_numpy(np.asarray(e, np.float32)) for e in image_embeds]
    with torch.no_grad():
        out = ref(
            nchw(x),
            torch.from_numpy(t),
            torch.from_numpy(np.array(ctx)),
            added_cond_kwargs={"image_embeds": embeds},
            **kwargs,
        ).sample
    return out.numpy().transpose(0, 2, 3, 1)


def test_unet_ip_adapter_streams_match_diffusers():
    """IP-Adapter's decoupled cross-attention: two image-prompt token streams with their own
    scales, against diffusers' `IPAdapterAttnProcessor2_0` in every cross-attention layer (random
    to_k_ip / to_v_ip, as torch initializes them). The tokens go in as the image projection's
    output (diffusers: `encoder_hid_proj` of type "ip_image_proj", here the identity)."""
    pytest.importorskip("torch")
    ref, model, params, cfg = _ip_adapter_pair((4, 3))
    x = jax.random.normal(KEY, (2, 8, 8, 4))
    ctx = jax.random.normal(jax.random.key(1), (2, 5, 48))
    t = np.array([3.0, 750.25], np.float32)
    rng = np.random.default_rng(2)
    ip = [jnp.asarray(rng.normal(size=(2, n, 48)), jnp.float32) for n in (4, 3)]
    assert_same_tree(model, params, x, t, ctx, ip_hidden_states=ip)
    apply = jax.jit(lambda p, *args, **kw: model.apply(p, *args, **kw))
    ours = apply(params, x, jnp.asarray(t), ctx, ip_hidden_states=ip, ip_adapter_scale=[0.7, 1.3])
    want = _ip_reference(ref, x, t, ctx, ip)
    np.testing.assert_allclose(ours, want, atol=2e-5, rtol=1e-4)

    # Scale 0 is the text-only U-Net with the same weights (the IP projections unused).
    off = apply(params, x, jnp.asarray(t), ctx, ip_hidden_states=ip, ip_adapter_scale=0.0)
    text_only = jax.jit(UNet2DConditionModel(**cfg).apply)(_without_ip(params), x, t, ctx)
    np.testing.assert_allclose(off, text_only, atol=1e-6, rtol=0)
    assert float(jnp.abs(off - ours).max()) > 0.01
    with pytest.raises(ValueError, match="1 ip_hidden_states for a U-Net with num_ip_adapters=2"):
        model.apply(params, x, t, ctx, ip_hidden_states=ip[:1])

    # Per-block scales (InstantStyle's recipes): diffusers' own `set_ip_adapter_scale` on the
    # reference, `ip_adapter_layer_scales` here; a new scale is an input, not a recompile.
    from diffusers.loaders.ip_adapter import IPAdapterMixin

    config = [{"down": {"block_0": 0.5}, "up": {"block_1": [0.0, 2.0]}, "mid": [1.5]}, 0.8]
    IPAdapterMixin.set_ip_adapter_scale(types.SimpleNamespace(unet=ref), config)
    layer_scales = ip_adapter_layer_scales(model, config)
    np.testing.assert_allclose(layer_scales, [[0.5, 0.8], [0.0, 0.8], [2.0, 0.8], [1.5, 0.8]])
    ours = apply(params, x, jnp.asarray(t), ctx, ip_hidden_states=ip, ip_adapter_scale=layer_scales)
    want = _ip_reference(ref, x, t, ctx, ip)
    np.testing.assert_allclose(ours, want, atol=2e-5, rtol=1e-4)
    compiled = apply._cache_size()
    apply(params, x, jnp.asarray(t), ctx, ip_hidden_states=ip, ip_adapter_scale=layer_scales / 2)
    assert apply._cache_size() == compiled  # other scales, the same program
    np.testing.assert_array_equal(
        ip_adapter_layer_scales(model, {"up": 1.0})[:, 0], [0.0, 1.0, 1.0, 0.0]
    )  # every attention of every up block; down and mid unnamed: 0
    with pytest.raises(ValueError, match="expected 2 scales for up.block_1, got 3"):
        ip_adapter_layer_scales(model, {"up": {"block_1": [1.0, 1.0, 1.0]}})
    with pytest.raises(ValueError, match=r"names \['block_7'\]"):
        ip_adapter_layer_scales(model, {"down": {"block_7": 1.0}})
    with pytest.raises(ValueError, match="3 IP-Adapter scale configs for 2 adapters"):
        ip_adapter_layer_scales(model, [1.0, 1.0, 1.0])


def test_bicubic_mask_resampling_matches_torch():
    """`layers._bicubic_matrix` is torch's bicubic interpolation (align_corners=False), the one
    diffusers resamples IP-Adapter masks with, shrinking and growing, odd sizes included."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for (h, w), (oh, ow) in [((16, 12), (10, 6)), ((7, 9), (4, 4)), ((5, 6), (11, 13))]:
        mask = rng.uniform(size=(2, h, w)).astype(np.float32)
        want = torch.nn.functional.interpolate(
            torch.from_numpy(mask)[None], size=(oh, ow), mode="bicubic"
        )[0].numpy()
        have = layers._bicubic_matrix(h, oh) @ mask @ layers._bicubic_matrix(w, ow).T
        np.testing.assert_allclose(have, want, atol=1e-5)


@pytest.mark.filterwarnings("ignore:The aspect ratio of the mask")  # on purpose: padding
def test_unet_ip_adapter_masks_match_diffusers():
    """IP-Adapter masks (`ip_adapter_masks`): adapter 0 with two reference images, each attended
    alone and weighted by its own mask at every layer's resolution (16 x 12 masks resampled to
    a 10 x 6 grid zero-padded to 64 queries, and to 4 x 4), adapter 1 unmasked; against
    diffusers' `IPAdapterAttnProcessor2_0` given the same masks."""
    torch = pytest.importorskip("torch")
    ref, model, params, _ = _ip_adapter_pair((4, 3))
    rng = np.random.default_rng(3)
    x = jax.random.normal(KEY, (2, 8, 8, 4))
    ctx = jax.random.normal(jax.random.key(1), (2, 5, 48))
    t = np.array([3.0, 750.25], np.float32)
    images = [rng.normal(size=(2, 2, 4, 48)), rng.normal(size=(2, 1, 3, 48))]  # [B, I, T, D]
    masks = (rng.uniform(size=(1, 2, 16, 12)) > 0.5).astype(np.float32)
    want = _ip_reference(
        ref, x, t, ctx, images,
        cross_attention_kwargs={"ip_adapter_masks": [torch.from_numpy(masks), None]},
    )  # fmt: skip
    ip = [jnp.asarray(i.reshape(2, -1, 48), jnp.float32) for i in images]  # I x T tokens
    ours = jax.jit(model.apply)(
        params, x, t, ctx, ip_hidden_states=ip, ip_adapter_scale=[0.7, 1.3],
        ip_adapter_masks=[masks[0], None],
    )  # fmt: skip
    np.testing.assert_allclose(ours, want, atol=2e-5, rtol=1e-4)
    unmasked = jax.jit(model.apply)(
        params, x, t, ctx, ip_hidden_states=ip, ip_adapter_scale=[0.7, 1.3]
    )  # fmt: skip
    assert float(jnp.abs(unmasked - ours).max()) > 1e-3  # the masks change the output
    with pytest.raises(ValueError, match="1 ip_adapter_masks for 2 adapters"):
        model.apply(params, x, t, ctx, ip_hidden_states=ip, ip_adapter_masks=[masks[0]])


def _without_ip(tree):
    """A params tree without IP-Adapter's projections (`processor` entries)."""
    if not isinstance(tree, dict):
        return tree
    return {k: _without_ip(v) for k, v in tree.items() if k != "processor"}


def test_vae_matches_diffusers():
    torch = pytest.importorskip("torch")
    import diffusers

    fields = {k: v for k, v in VAE_VARIANTS["tiny"].items() if k != "scaling_factor"}
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()},
    ).eval()
    vae = vae_from_variant("tiny")
    params = torch_to_flax(ref)
    x = jax.random.uniform(KEY, (1, 32, 32, 3), minval=-1, maxval=1)
    assert_same_tree(vae, params, x)
    recon, posterior = jax.jit(vae.apply)(params, x)  # decodes the posterior mode
    with torch.no_grad():
        ref_post = ref.encode(nchw(x)).latent_dist
        ref_recon = ref.decode(ref_post.mode()).sample
    to_nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(posterior.mean, to_nhwc(ref_post.mean), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(posterior.logvar, to_nhwc(ref_post.logvar), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(recon, to_nhwc(ref_recon), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(posterior.kl(), ref_post.kl().numpy(), rtol=1e-4)


@pytest.mark.parametrize("projection_dim,eos", [(None, 5), (24, 5), (None, 2)])
def test_clip_matches_transformers(projection_dim, eos):
    torch = pytest.importorskip("torch")
    import transformers

    cfg = {
        "vocab_size": 50,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 12,
        "hidden_act": "gelu",
        "eos_token_id": eos,
    }  # 2: transformers' legacy argmax pooling; else first EOS
    torch.manual_seed(0)
    hf_config = transformers.CLIPTextConfig(
        **cfg, bos_token_id=0, pad_token_id=1, projection_dim=projection_dim or 512
    )
    if projection_dim:
        ref = transformers.CLIPTextModelWithProjection(hf_config).eval()
    else:
        ref = transformers.CLIPTextModel(hf_config).eval()
    params = torch_to_flax(ref)
    if projection_dim:
        params["params"] = {**params["params"].pop("text_model"), **params["params"]}
    model = CLIPTextTransformer(
        **cfg, projection_dim=projection_dim, legacy_argmax_pooling=eos == 2
    )
    ids = np.array([[0, 7, 9, 5, 5, 5, 5], [0, 11, 12, 13, 14, 5, 8]], np.int32)
    if eos == 2:  # legacy rule: the position of the largest id (49407 with the real tokenizer)
        ids[:, 4] = 49 - np.arange(2)
    assert_same_tree(model, params, jnp.asarray(ids))
    ours = jax.jit(lambda p, i: model.apply(p, i, output_hidden_states=True))(params, ids)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids).long(), output_hidden_states=True)
    atol = {"atol": 1e-5, "rtol": 1e-5}
    np.testing.assert_allclose(ours.last_hidden_state, want.last_hidden_state.numpy(), **atol)
    for a, b in zip(ours.hidden_states, want.hidden_states, strict=True):
        np.testing.assert_allclose(a, b.numpy(), **atol)
    if projection_dim:
        np.testing.assert_allclose(ours.text_embeds, want.text_embeds.numpy(), **atol)
    else:
        np.testing.assert_allclose(ours.pooled_output, want.pooler_output.numpy(), **atol)


def test_variant_tables_are_consistent():
    for name, fields in UNET_VARIANTS.items():
        n = len(fields["block_out_channels"])
        assert len(fields["down_block_types"]) == n == len(fields["up_block_types"]), name
    assert set(CLIP_VARIANTS) >= {"vit-l-14", "openclip-h", "openclip-bigg", "tiny"}
    for name, fields in VAE_VARIANTS.items():
        assert vae_from_variant(name).downsampling_factor == 2 ** (
            len(fields["block_out_channels"]) - 1
        )
