"""Text -> tokens -> embeddings -> sampled latents -> decoded images, for a model trained here.

  ldm = load_from_workdir("runs/shapes/ldm")
  images = generate(ldm, ["a red circle"], seeds=[0], guidance_scale=4.0, num_steps=25)
  # img2img: from a picture noised part-way (diffusers' strength; 0.8 skips the first 20%)
  images = generate(ldm, ["a red circle"], seeds=[0], init_image="in.png", strength=0.6)

The whole denoising loop, the text encoder and the VAE decoder run in one jitted function per
(sampler, steps, batch size); prompts, negative prompts, seeds and guidance scales are traced
arguments, so changing them does not recompile. Batches are padded to a fixed size for the same
reason, and split over the mesh's data axis.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import rng as rng_lib
from ldm_jax import sharding as sharding_lib
from ldm_jax.config import read_config
from ldm_jax.data.tokenizers import tokenizer_from_config
from ldm_jax.diffusion import samplers as sampler_lib
from ldm_jax.diffusion.guidance import classifier_free_guidance
from ldm_jax.diffusion.schedules import NoiseSchedule, schedule_from_config
from ldm_jax.models.clip import CLIPTextTransformer
from ldm_jax.models.unet import UNet2DConditionModel
from ldm_jax.models.vae import AutoencoderKL

log = logging.getLogger("ldm_jax")


class NoCheckpointError(FileNotFoundError):
    pass


def compute_dtype(config):
    """config.compute_dtype ("float32", "bfloat16" on accelerators): the dtype of activations and
    matmul inputs; parameters stay float32, and norms, softmax and the loss compute in float32."""
    return jnp.dtype(config.get("compute_dtype", "float32"))


def build_text_encoder(config, tokenizer) -> CLIPTextTransformer:
    te = config.text_encoder
    return CLIPTextTransformer(
        vocab_size=tokenizer.vocab_size,
        hidden_size=te.hidden_size,
        intermediate_size=te.intermediate_size,
        num_hidden_layers=te.num_hidden_layers,
        num_attention_heads=te.num_attention_heads,
        max_position_embeddings=tokenizer.context_length,
        hidden_act=te.hidden_act,
        eos_token_id=tokenizer.eos_token_id,
        dtype=compute_dtype(config),
    )


def build_unet(config, latent_channels: int) -> UNet2DConditionModel:
    u = config.unet
    return UNet2DConditionModel(
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=tuple(u.block_out_channels),
        down_block_types=tuple(u.down_block_types),
        up_block_types=tuple(u.up_block_types),
        layers_per_block=u.layers_per_block,
        attention_head_dim=u.attention_head_dim,
        cross_attention_dim=config.text_encoder.hidden_size,
        norm_num_groups=u.norm_num_groups,
        remat_policy=config.get("remat_policy", "none"),
        dtype=compute_dtype(config),
    )


def build_autoencoder(config) -> AutoencoderKL:
    ae = config.autoencoder
    return AutoencoderKL(
        block_out_channels=tuple(ae.block_out_channels),
        layers_per_block=ae.layers_per_block,
        latent_channels=ae.latent_channels,
        norm_num_groups=ae.norm_num_groups,
        dtype=compute_dtype(config),
    )


def latent_size(config) -> int:
    return config.data.image_size // 2 ** (len(config.autoencoder.block_out_channels) - 1)


@dataclasses.dataclass
class LatentDiffusion:
    """A text-to-image model: modules, tokenizer, schedule and parameters.

    params: {"unet": ..., "text_encoder": ...} (the EMA weights when loaded from a workdir);
    frozen: {"vae": ..., "latent_scale": f32[]} (latents are z * latent_scale, LDM Sec. 4.3.2).
    """

    config: Any
    tokenizer: Any
    text_encoder: CLIPTextTransformer
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    schedule: NoiseSchedule
    params: Any
    frozen: Any
    mesh: Any = None
    _compiled: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def from_config(cls, config, params=None, frozen=None, mesh=None):
        tokenizer = tokenizer_from_config(config.tokenizer)
        return cls(
            config=config,
            tokenizer=tokenizer,
            text_encoder=build_text_encoder(config, tokenizer),
            unet=build_unet(config, config.autoencoder.latent_channels),
            vae=build_autoencoder(config),
            schedule=schedule_from_config(config.diffusion),
            params=params,
            frozen=frozen,
            mesh=mesh if mesh is not None else sharding_lib.inference_mesh(config),
        )


def load_from_workdir(workdir: str | pathlib.Path, step: int | None = None) -> LatentDiffusion:
    """The EMA parameters of the latest (or given) checkpoint of an `ldm` training run."""
    from ldm_jax.train.checkpointing import Checkpointer

    workdir = pathlib.Path(workdir)
    if not (workdir / "config.json").exists() or not (workdir / "checkpoints").exists():
        raise NoCheckpointError(
            f"no checkpoint in {workdir}: train one first with "
            f"`ldm-jax train --config configs/shapes.py --workdir {workdir}`"
        )
    config = read_config(workdir / "config.json")
    if config.stage not in ("ldm", "distill"):
        raise ValueError(
            f"{workdir} holds a {config.stage!r} run; sampling needs an 'ldm' or 'distill' run"
        )
    checkpointer = Checkpointer(workdir, read_only=True)
    step = checkpointer.latest_step() if step is None else step
    if step is None:
        raise NoCheckpointError(f"no checkpoint in {workdir / 'checkpoints'}")
    state = checkpointer.restore_raw(step)
    frozen = {k: v for k, v in state["frozen"].items() if k != "teacher"}  # a distill run's
    return LatentDiffusion.from_config(config, params=state["ema_params"], frozen=frozen)


def encode_prompts(ldm: LatentDiffusion, prompts: Sequence[str]) -> np.ndarray:
    return ldm.tokenizer(list(prompts))


def encode_init_images(ldm: LatentDiffusion, frozen, images, seeds) -> jax.Array:
    """img2img's init latents f32[B, h, w, c]: a posterior sample of each image (f32[B, H, W, 3]
    in [0, 1]) times latent_scale, as the ldm stage trains on; its noise from the image's seed."""
    posterior = ldm.vae.apply(frozen["vae"], images * 2 - 1, method=ldm.vae.encode)
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), 2))(seeds)
    eps = jax.vmap(lambda k, m: rng_lib.normal(k, m.shape))(keys, posterior.mean)
    return (posterior.mean + posterior.std * eps) * frozen["latent_scale"]


def _sample_fn(
    ldm: LatentDiffusion,
    sampler: str,
    num_steps: int,
    sampler_options: tuple,
    start_step: int | None = None,
):
    """jit(params, frozen, cond_ids, uncond_ids, guidance[B], seeds[B]) -> uint8[B,H,W,3]; with
    `start_step` (img2img) one more argument, the init images f32[B, H, W, 3] in [0, 1]."""
    key = (sampler, num_steps, sampler_options, start_step)
    if key in ldm._compiled:
        return ldm._compiled[key]
    sample = sampler_lib.get_sampler(sampler)
    lat = latent_size(ldm.config)
    channels = ldm.config.autoencoder.latent_channels
    prediction_type = ldm.config.diffusion.prediction_type

    def fn(params, frozen, cond_ids, uncond_ids, guidance, seeds, init_images=None):
        embed = lambda ids: ldm.text_encoder.apply(params["text_encoder"], ids).last_hidden_state
        cond, uncond = embed(cond_ids), embed(uncond_ids)
        apply = lambda x, t, ctx: ldm.unet.apply(params["unet"], x, t, ctx)
        model_fn = classifier_free_guidance(apply, cond, uncond, guidance)
        # Per-image noise from per-image seeds: an image does not depend on its batch-mates.
        noise = jax.vmap(lambda s: rng_lib.normal(jax.random.key(s), (lat, lat, channels)))(seeds)
        rng = jax.random.fold_in(jax.random.key(seeds[0]), 1)
        options = dict(sampler_options)
        if start_step is not None:
            init_latents = encode_init_images(ldm, frozen, init_images, seeds)
            options.update(start_step=start_step, init_latents=init_latents)
        latents = sample(
            model_fn,
            noise,
            ldm.schedule,
            num_steps,
            rng,
            prediction_type=prediction_type,
            **options,
        )
        images = ldm.vae.apply(
            frozen["vae"], latents / frozen["latent_scale"], method=ldm.vae.decode
        )
        return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

    # Parameters keep the layout training gave them (FSDP / tensor parallel per the config's
    # rules; replicated for a data-parallel mesh), the batch is split over the data axes.
    rules = sharding_lib.rules_from_config(ldm.config)
    params = sharding_lib.tree_shardings(ldm.params, ldm.mesh, rules)
    frozen = sharding_lib.tree_shardings(ldm.frozen, ldm.mesh, rules)
    batch = sharding_lib.batch_sharding(ldm.mesh)
    batched = (batch,) * (4 if start_step is None else 5)
    compiled = jax.jit(fn, in_shardings=(params, frozen, *batched), out_shardings=batch)
    ldm._compiled[key] = compiled
    return compiled


def generate(
    ldm: LatentDiffusion,
    prompts: Sequence[str],
    *,
    seeds: Sequence[int],
    negative_prompts: Sequence[str] | None = None,
    guidance_scale: float | Sequence[float] = 4.0,
    num_steps: int = 25,
    sampler: str = "ddim",
    batch_size: int = 16,
    sampler_options: dict | None = None,
    progress: bool = False,
    init_image=None,
    strength: float = 0.8,
) -> np.ndarray:
    """One image per (prompt, seed) pair -> uint8[N, H, W, 3].

    guidance_scale: one value or one per image (diffusers' convention: 1 = conditional model,
    0 = unconditional). negative_prompts replace the empty unconditional prompt.
    init_image: img2img from one picture or one per image (a path, PIL image or uint8 array,
    resized to the model's size), with `strength` as in diffusers: the first
    num_steps - int(num_steps * strength) steps are skipped and the sampler starts from a
    posterior sample of the image's latents (seeded by the image's seed) noised to that step.
    """
    from ldm_jax import sd_pipeline

    n = len(prompts)
    if len(seeds) != n:
        raise ValueError(f"{n} prompts but {len(seeds)} seeds")
    negative_prompts = list(negative_prompts) if negative_prompts is not None else [""] * n
    if len(negative_prompts) != n:
        raise ValueError(f"{n} prompts but {len(negative_prompts)} negative prompts")
    guidance = np.broadcast_to(np.asarray(guidance_scale, np.float32), (n,))
    if not np.all(np.isfinite(guidance)):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
    seeds = rng_lib.seed_array(seeds)
    devices = ldm.mesh.devices.size
    batch_size = -(-batch_size // devices) * devices  # a multiple of the device count
    start_step, arrays = None, []
    if init_image is not None:
        start_step = sd_pipeline.img2img_start_step(num_steps, strength)
        sd_pipeline.check_img2img_support(sampler)
        size = ldm.config.data.image_size
        init = sd_pipeline.images_per_prompt(init_image, n, size, size, per="image")
        arrays = [init.astype(np.float32)]
    options = dict(sampler_options or {})
    if sampler == ldm.config.sample.sampler:  # the run's own defaults (a student's DDIM grid)
        options = {**dict(ldm.config.sample.get("sampler_options", None) or {}), **options}
    student_steps = ldm.config.distill.student_steps if ldm.config.stage == "distill" else None
    if student_steps is not None and (sampler, num_steps) != ("ddim", student_steps):
        log.warning(
            "this student was distilled for %d DDIM steps, not %s at %d steps",
            student_steps,
            sampler,
            num_steps,
        )
    options = tuple(sorted(options.items()))
    fn = _sample_fn(ldm, sampler, num_steps, options, start_step)
    cond_ids = ldm.tokenizer(list(prompts))
    uncond_ids = ldm.tokenizer(negative_prompts)
    out = []
    starts = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="sampling", unit="batch")
    for start in starts:
        sl = slice(start, start + batch_size)
        pad = batch_size - len(seeds[sl])
        padded = [
            np.concatenate([a[sl], np.repeat(a[sl][-1:], pad, axis=0)])
            for a in (cond_ids, uncond_ids, guidance, seeds, *arrays)
        ]
        images = fn(ldm.params, ldm.frozen, *padded)
        out.append(np.asarray(images)[: batch_size - pad])
    return np.concatenate(out)


def check_output_dir(path: str | pathlib.Path, flag: str = "--out") -> None:
    """FileExistsError naming `flag` when `path` is a file: `output_dir` would refuse it; checked
    before slow work (loading a checkpoint) that precedes the folder's creation."""
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{flag} {path} is a file, not a folder; choose a folder")


def output_dir(path: str | pathlib.Path, flag: str = "--out") -> pathlib.Path:
    """The folder to write outputs into, made before any work so that a bad path fails first.

    `path` when it is new or empty; when it already holds files (an earlier sample or
    evaluation), its first free numbered subfolder `path/001`, `path/002`, ..., so nothing
    written before is overwritten. A path that is a file is a FileExistsError naming `flag`.
    """
    check_output_dir(path, flag)
    path = pathlib.Path(path)
    if path.is_dir() and any(path.iterdir()):
        index = 1
        while (path / f"{index:03d}").exists():
            index += 1
        log.warning("%s %s already holds files; writing to %s", flag, path, path / f"{index:03d}")
        path = path / f"{index:03d}"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot make this folder ({e})") from e
    return path


def save_outputs(
    images: np.ndarray,
    records: list[dict],
    out_dir: str | pathlib.Path,
    grid_columns: int | None = None,
) -> pathlib.Path:
    """One PNG per image, `grid.png` and `manifest.json` (one record per image) in out_dir."""
    from ldm_jax.train.images import make_grid, save_png

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = []
    for i, (image, record) in enumerate(zip(images, records)):
        name = f"{i:05d}.png"
        save_png(image, out_dir / name)
        manifest.append({"file": name, **record})
    save_png(
        make_grid(images, grid_columns), out_dir / "grid.png", scale=max(1, 256 // images.shape[1])
    )
    # allow_nan=False: a NaN would make the file invalid JSON (generate refuses them anyway).
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    return out_dir
