"""Tiny random Stable Diffusion models in diffusers / transformers (PyTorch, CPU), for tests.
(Also a tiny whole `CLIPModel`, the CLIP-score model.)

The released architectures at toy widths: SD1-style (one CLIP text encoder) and SDXL-style (two
encoders, `text_time` added conditioning). Each component has the released checkpoints'
structural settings that single-file checkpoints assume (GroupNorm 32, 8 heads per level for
SD1, CLIP heads 64 wide), so the same weights also round-trip through the original layout.
`SIZE`-pixel images give `SIZE // 2` latents (the VAE has f = 2). The pipeline builders take U-Net
config overrides (e.g. one level only, for tests whose cost is compiling a training step).
"""

import diffusers
import torch
import transformers

SIZE = 32  # pixels; the tiny VAE has f = 2, so latents are 16 x 16


def scheduler():
    # The released SD checkpoints' settings (their scheduler_config.json), as DDIM.
    return diffusers.DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def vae(deterministic: bool = False):
    torch.manual_seed(1)
    model = diffusers.AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,  # the released value, which single files assume
        layers_per_block=1,
    )
    if deterministic:
        # Posterior std exp(-15): diffusers samples the VAE posterior with torch's generator and
        # we with JAX's, so a negligible std makes img2img / inpainting comparable.
        with torch.no_grad():
            model.quant_conv.weight[4:] = 0
            model.quant_conv.bias[4:] = -30.0
    return model


def text_encoder(projection: bool = False, hidden: int = 32, act: str = "quick_gelu"):
    config = transformers.CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=3,
        num_attention_heads=max(1, hidden // 64),  # what single files assume (CLIP: 64 wide)
        max_position_embeddings=77,
        hidden_act=act,
        eos_token_id=49407,
        bos_token_id=49406,
        pad_token_id=49407,
        projection_dim=hidden,
    )
    torch.manual_seed(2 + projection)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config).eval()


def unet(**kwargs):
    torch.manual_seed(0)
    config = dict(
        sample_size=SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=8,  # SD1's (8 heads per level), which single files assume
        cross_attention_dim=32,
        norm_num_groups=32,
    )
    return diffusers.UNet2DConditionModel(**{**config, **kwargs}).eval()


def sd_pipeline(tokenizer_dir, cls=None, in_channels=4, deterministic_vae=False, **unet_kwargs):
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
    return (cls or diffusers.StableDiffusionPipeline)(
        vae=vae(deterministic=deterministic_vae),
        text_encoder=text_encoder(),
        tokenizer=tokenizer,
        unet=unet(in_channels=in_channels, **unet_kwargs),
        scheduler=scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def sdxl_pipeline(tokenizer_dir, **unet_kwargs):
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
    config = dict(
        cross_attention_dim=64,  # 32 (encoder 1) + 32 (encoder 2), concatenated
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    )
    denoiser = unet(**{**config, **unet_kwargs})
    return diffusers.StableDiffusionXLPipeline(
        vae=vae(),
        text_encoder=text_encoder(),
        text_encoder_2=text_encoder(projection=True, act="gelu"),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=denoiser,
        scheduler=scheduler(),
        force_zeros_for_empty_prompt=True,
    )


def sdxl_refiner_pipeline(tokenizer_dir):
    """The refiner's layout: text_encoder_2 only (with projection), aesthetic-score time ids
    (5 of them), an img2img pipeline; the base's VAE (the same latent space)."""
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
    denoiser = unet(
        cross_attention_dim=32,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 5 * 8,
    )
    return diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=vae(),
        text_encoder=None,
        text_encoder_2=text_encoder(projection=True, act="gelu"),
        tokenizer=None,
        tokenizer_2=tokenizer,
        unet=denoiser,
        scheduler=scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )


CLIP_IMAGE_SIZE = 32


def clip_model(folder, tokenizer_dir, hidden_act: str = "quick_gelu"):
    """A tiny random transformers `CLIPModel` saved to `folder` with the real CLIP tokenizer and a
    PIL `CLIPImageProcessor` (32 px), as openai/clip-vit-large-patch14 is laid out; returns it."""
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    tower.update(num_attention_heads=4, hidden_act=hidden_act)
    config = transformers.CLIPConfig(
        # the real tokenizer's vocabulary; hidden 32 keeps the table at 1.6M parameters
        text_config={**tower, "vocab_size": 49408},
        vision_config={**tower, "image_size": CLIP_IMAGE_SIZE, "patch_size": 8},
        projection_dim=16,
        logit_scale_init_value=2.0,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    model.save_pretrained(folder)
    transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(folder)
    size = CLIP_IMAGE_SIZE
    transformers.CLIPImageProcessorPil(size=size, crop_size=size).save_pretrained(folder)
    return model
