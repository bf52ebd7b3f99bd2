"""One model bundle for everything downstream: a run trained here and a pretrained checkpoint
load into the same `Model`, which `ldm_jax.pipeline.generate`, the trainers and the evaluations
take.

  model = load_run("runs/shapes/ldm")                    # the EMA weights of a run trained here
  model = load_pretrained("models/stable-diffusion-v1-5")  # diffusers folder, single file, orbax

A `Model` holds the modules and their float32 Flax variables, the tokenizers, the noise schedule
as a diffusers `scheduler_config` dict (a run's `config.diffusion` uses the same field names), the
prediction type, the sampling defaults (a run's own `config.sample`; a checkpoint's scheduler) and
what conditioning the U-Net takes (one text encoder, or SDXL's two with pooled embeddings and
micro-conditioning; a 9-channel inpainting U-Net).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.schedules import (
    SD_SCHEDULER_DEFAULTS,
    NoiseSchedule,
    sampler_from_scheduler_config,
)
from ldm_jax.models.clip import CLIPTextTransformer
from ldm_jax.models.unet import UNet2DConditionModel
from ldm_jax.models.vae import AutoencoderKL

log = logging.getLogger("ldm_jax")

TEXT_ENCODER_SLOTS = ("text_encoder", "text_encoder_2")
# The kind of a run trained here: one text encoder read at its last hidden state (as SD 1.x).
RUN_KIND = "run"

# diffusers' pipeline defaults, for checkpoints (a run has its own in config.sample).
PRETRAINED_SAMPLING = {"num_inference_steps": 50, "guidance_scale": 7.5}


@dataclasses.dataclass
class Model:
    """Modules, their float32 variables and how to sample them.

    kind: "sd1", "sd2", "sdxl" or "sdxl-refiner" for checkpoints, with "-inpaint" for 9-channel
      U-Nets; "run" for a model trained here (one text encoder, as SD 1.x).
    unet_params, vae_params, text_encoder_params[i]: Flax variables `{"params": ...}`.
    scaling_factor: latents seen by the U-Net are `vae.encode(x).sample() * scaling_factor` (a
      run's latent scale, 1 / std of its training latents: LDM Sec. 4.3.2).
    text_encoders / tokenizers: in slot order (`text_encoder`, `text_encoder_2`), only those the
      model has: SD1/2 one, SDXL two, the SDXL refiner one (its `text_encoder_2`, with
      projection). tokenizers is () for a single file loaded without tokenizer folders.
    scheduler_config: a diffusers `scheduler_config.json` dict ({} if the source has none).
    sampling: defaults for `generate` (sampler, sampler_options, num_inference_steps,
      guidance_scale); `sampler` None means the scheduler_config's own class.
    configs: the raw component configs of a checkpoint ("unet", "vae", "text_encoder", ...,
      "model_index"), kept for export; `config`: a run's training config (None otherwise).
    sharding_rules: the logical-axis rules a run was trained with (its parameters keep that
      layout when sampled); None: replicated.
    """

    kind: str
    unet: UNet2DConditionModel
    unet_params: Any
    vae: AutoencoderKL
    vae_params: Any
    scaling_factor: float
    text_encoders: tuple[CLIPTextTransformer, ...] = ()
    text_encoder_params: tuple[Any, ...] = ()
    tokenizers: tuple[Any, ...] = ()
    scheduler_config: dict = dataclasses.field(default_factory=dict)
    sampling: dict = dataclasses.field(default_factory=dict)
    configs: dict = dataclasses.field(default_factory=dict)
    config: Any = None
    sharding_rules: Any = None
    source: str = ""
    mesh: Any = dataclasses.field(default=None, repr=False)
    # generate()'s compiled functions and progress-bar state, shared by copies made with
    # `dataclasses.replace` (new parameters do not recompile).
    cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    # --- What the model is ---

    @property
    def text_encoder_slots(self) -> tuple[str, ...]:
        """The diffusers folder names of `text_encoders`, e.g. ("text_encoder_2",) for a refiner."""
        return text_encoder_slots(self.kind)

    @property
    def is_sdxl(self) -> bool:
        return self.kind.startswith("sdxl")

    @property
    def requires_aesthetics_score(self) -> bool:
        """SDXL refiner: micro-conditioning on an aesthetic score instead of the target size."""
        return "refiner" in self.kind

    @property
    def is_inpainting(self) -> bool:
        """A U-Net that also reads the mask and the masked image's latents (9 channels for SD)."""
        return self.unet.in_channels != self.vae.latent_channels

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each axis (8 for SD)."""
        return self.vae.downsampling_factor

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type") or "epsilon"

    @property
    def schedule(self) -> NoiseSchedule:
        """The training noise schedule, as diffusers' training scripts read it:
        `DDPMScheduler.from_config(scheduler_config)` (the betas and rescale_betas_zero_snr of
        whatever class the config names; fields it lacks take DDPMScheduler's defaults)."""
        return training_schedule(self.scheduler_config)

    @property
    def default_size(self) -> int:
        """Image side when none is given: a run's training size; a checkpoint's
        unet.config.sample_size * vae_scale_factor (diffusers), or the releases' sizes."""
        if self.config is not None:
            return int(self.config.data.image_size)
        size = self.configs.get("unet", {}).get("sample_size")
        if size:
            return int(size) * self.vae_scale_factor
        if self.is_sdxl:
            return 1024
        v = self.prediction_type == "v_prediction"
        return 768 if self.kind.startswith("sd2") and v else 512

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        """SDXL's pipeline flag (model_index.json): without a negative prompt the unconditional
        embeddings are zeros instead of the encoded empty prompt. diffusers' default: True for
        SDXL base pipelines, False for the refiner (img2img) and for SD 1/2."""
        flag = self.configs.get("model_index", {}).get("force_zeros_for_empty_prompt")
        if flag is None:
            return self.is_sdxl and not self.requires_aesthetics_score
        return bool(flag)

    def get_tokenizers(self) -> tuple[Any, ...]:
        """`tokenizers`, or an error explaining how to supply them (single-file checkpoints)."""
        if len(self.tokenizers) != len(self.text_encoders):
            raise ValueError(
                f"{self.source or 'this checkpoint'} has {len(self.text_encoders)} text "
                f"encoder(s) but {len(self.tokenizers)} tokenizer(s) (single-file checkpoints "
                "carry none): pass tokenizer_dir= (and tokenizer_2_dir= for SDXL) to "
                "load_pretrained (`--tokenizer` / `--tokenizer-2` on the command line), e.g. the "
                "`tokenizer/` folder of the diffusers release of the same model"
            )
        return self.tokenizers

    def frozen_params(self) -> dict:
        """{"vae": ..., "text_encoders": {slot: ...}}: what fine-tuning keeps fixed."""
        slots = self.text_encoder_slots
        return {"vae": self.vae_params, "text_encoders": dict(zip(slots, self.text_encoder_params))}

    # --- A run's parameter trees (the train state's layout) ---

    def run_params(self) -> dict:
        """{"unet": ..., "text_encoder": ...}: the trainable trees of a run trained here."""
        return {"unet": self.unet_params, "text_encoder": self.text_encoder_params[0]}

    def run_frozen(self) -> dict:
        """{"vae": ..., "latent_scale": f32[]}: the frozen part of a run's train state."""
        return {"vae": self.vae_params, "latent_scale": np.float32(self.scaling_factor)}

    def with_run_params(self, params: dict, frozen: dict | None = None) -> Model:
        """This model with a run's parameter trees (e.g. a train state's EMA weights)."""
        changes = dict(unet_params=params["unet"], text_encoder_params=(params["text_encoder"],))
        if frozen is not None:
            changes.update(vae_params=frozen["vae"], scaling_factor=float(frozen["latent_scale"]))
        return dataclasses.replace(self, **changes)


def training_schedule(scheduler_config: dict) -> NoiseSchedule:
    """`DDPMScheduler.from_config(scheduler_config)`'s betas; SD's without a config."""
    config = dict(scheduler_config or SD_SCHEDULER_DEFAULTS, _class_name="DDPMScheduler")
    return sampler_from_scheduler_config(config)[2]


def text_encoder_slots(kind: str) -> tuple[str, ...]:
    base = kind.removesuffix("-inpaint")
    if base == "sdxl-refiner":
        return ("text_encoder_2",)
    return TEXT_ENCODER_SLOTS if base == "sdxl" else ("text_encoder",)


# --- Text encoding -------------------------------------------------------------------------------


def _final_layer_norm(encoder, params, h):
    """CLIP's final LayerNorm on an intermediate hidden state (diffusers' clip_skip for SD1/2)."""
    ln_params = params["params"] if "params" in params else params
    return nn.LayerNorm(epsilon=encoder.layer_norm_eps).apply(
        {"params": ln_params["final_layer_norm"]}, h
    )


def encode_prompt(model, params, ids, clip_skip=None, *, negative: bool = False):
    """Token ids per encoder -> (encoder_hidden_states f32[B,L,D], pooled f32[B,P] or None), as
    diffusers' `encode_prompt`. SD1/2: the last hidden state (SD2's checkpoints already drop the
    last OpenCLIP layer), or with clip_skip the final-LN'd hidden state clip_skip layers earlier.
    SDXL: every encoder's penultimate hidden state (clip_skip more layers back) concatenated on
    the feature axis, and the projected pooled output of the encoder that has a projection.
    diffusers ignores clip_skip for negative prompts; so do we, to give the same images."""
    skip = None if negative else clip_skip
    if not model.kind.startswith("sdxl"):
        encoder, p = model.text_encoders[0], params[0]
        out = encoder.apply(p, ids[0], output_hidden_states=skip is not None)
        if skip is None:
            return out.last_hidden_state, None
        return _final_layer_norm(encoder, p, out.hidden_states[-(skip + 1)]), None
    states, pooled = [], None
    for encoder, p, x in zip(model.text_encoders, params, ids):
        out = encoder.apply(p, x, output_hidden_states=True)
        states.append(out.hidden_states[-(2 + (skip or 0))])
        if pooled is None and out.text_embeds is not None:
            pooled = out.text_embeds
    return jnp.concatenate(states, axis=-1), pooled


# --- Runs trained here ---------------------------------------------------------------------------

# The stages whose checkpoints are text-to-image models: trained here from scratch, distilled,
# or fine-tuned (from a checkpoint or from a run trained here; `load_run` reads the base).
RUN_STAGES = ("ldm", "distill", "finetune")


def run_scheduler_config(config) -> dict:
    """A run's `config.diffusion` as a diffusers scheduler config: the training betas and the
    prediction type. DDIM without x0 clipping (diffusers' class default clips to [-1, 1], which
    would cut latents of unit variance); other fields take each sampler's own defaults."""
    d = config.diffusion
    return {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": int(d.num_train_timesteps),
        "beta_schedule": d.beta_schedule,
        "beta_start": float(d.beta_start),
        "beta_end": float(d.beta_end),
        "rescale_betas_zero_snr": bool(d.get("rescale_betas_zero_snr", False)),
        "prediction_type": d.prediction_type,
        "clip_sample": False,
    }


def run_sampling(config) -> dict:
    """A run's sampling defaults (`Model.sampling`) from its config.sample."""
    sample = config.sample
    return {
        "sampler": sample.sampler,
        "sampler_options": dict(sample.get("sampler_options", None) or {}),
        "num_inference_steps": int(sample.num_steps),
        "guidance_scale": float(sample.guidance_scale),
    }


def distilled_from_checkpoint(config) -> str | None:
    """The pretrained checkpoint at the root of a distillation run's chain of teachers (a
    student of a student of ... a checkpoint), or None when the chain starts at a run trained
    here, whose config describes the modules."""
    from ldm_jax.runs import read_run_config

    seen = set()
    while config.stage == "distill":
        teacher = pathlib.Path(config.distill.teacher_workdir)
        if not is_run(teacher):
            return str(teacher) if teacher.exists() else None
        if teacher.resolve() in seen:
            raise ValueError(f"the chain of teachers loops back to {teacher}")
        seen.add(teacher.resolve())
        config = read_run_config(teacher)
    return None


def student_of(teacher: Model, config) -> Model:
    """A distillation student: the teacher's modules with the student run's sampling defaults."""
    return dataclasses.replace(teacher, sampling=run_sampling(config), config=config)


def from_config(config, params: dict | None = None, frozen: dict | None = None) -> Model:
    """The Model of a run trained here with `config` (its modules; parameters when given: the
    train state's {"unet", "text_encoder"} trees and {"vae", "latent_scale"})."""
    from ldm_jax import sharding as sharding_lib
    from ldm_jax.data.tokenizers import tokenizer_from_config
    from ldm_jax.models import builders

    tokenizer = tokenizer_from_config(config.tokenizer)
    model = Model(
        kind=RUN_KIND,
        unet=builders.build_unet(config, config.autoencoder.latent_channels),
        unet_params=None,
        vae=builders.build_autoencoder(config),
        vae_params=None,
        scaling_factor=1.0,
        text_encoders=(builders.build_text_encoder(config, tokenizer),),
        text_encoder_params=(None,),
        tokenizers=(tokenizer,),
        scheduler_config=run_scheduler_config(config),
        sampling=run_sampling(config),
        config=config,
        sharding_rules=sharding_lib.rules_from_config(config),
        mesh=sharding_lib.inference_mesh(config),
    )
    if params is not None:
        model = model.with_run_params(params, frozen)
    return model


def load_run(workdir: str | pathlib.Path, step: int | None = None) -> Model:
    """The EMA parameters of the latest (or given) checkpoint of an `ldm` or `distill` run."""
    from ldm_jax.runs import averaged_params, open_run

    config, state, step = open_run(workdir, RUN_STAGES, step, what="sampling")
    averaged = averaged_params(state)
    if config.stage == "distill" and (root := distilled_from_checkpoint(config)) is not None:
        student = student_of(load_pretrained(root), config)
        student = student.with_run_params(averaged, state["frozen"])
        return dataclasses.replace(student, source=str(workdir))
    if config.stage != "finetune":
        return from_config(config, averaged, state["frozen"])
    # A fine-tuning run holds the U-Net (and its EMA); the rest is its base, which must be the
    # one it was trained from (checkpoints may leave the frozen weights out).
    base = load(
        config.pretrained,
        variant=config.variant or None,
        tokenizer_dir=config.tokenizer_dir or None,
        tokenizer_2_dir=config.tokenizer_2_dir or None,
    )
    saved_frozen = state.get("frozen")
    frozen = saved_frozen or base.frozen_params()
    if not saved_frozen:
        from ldm_jax.runs import Checkpointer, params_fingerprint

        meta = Checkpointer(pathlib.Path(workdir), read_only=True).read_meta(step)
        saved = meta.get("frozen_fingerprint")
        if saved is not None and saved != params_fingerprint(frozen):
            raise ValueError(
                f"{config.pretrained} no longer holds the VAE and text encoder(s) that {workdir} "
                f"was fine-tuned with (fingerprint {saved})"
            )
    slots = base.text_encoder_slots
    return dataclasses.replace(
        base,
        unet_params=averaged["unet"],
        vae_params=frozen["vae"],
        text_encoder_params=tuple(frozen["text_encoders"][s] for s in slots),
        source=str(workdir),
    )


def parse_lora(spec: str) -> tuple[str, float]:
    """ "FILE[:WEIGHT]" (the CLI's --lora) -> (file, weight), weight 1 by default."""
    path, sep, weight = spec.rpartition(":")
    if sep:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return spec, 1.0


def with_lora(model: Model, loras) -> Model:
    """`model` with LoRA files fused into its U-Net's and text encoders' kernels (diffusers'
    `load_lora_weights` then `fuse_lora`, several files with their weights: `set_adapters(names,
    weights)`).

    loras: [(file, weight) or file, ...]: diffusers / PEFT or kohya / A1111 LoRA files
    (`convert.lora.read_lora`). A weight is a number, or per component as diffusers'
    `set_adapters` takes it: {"unet": a number or per-block weights {"down": ..., "mid": ...,
    "up": ...} (`lora.block_weights`), "text_encoder": a number, "text_encoder_2": ...}, 1 for
    what it leaves out.
    The model's own parameters are not modified (a new Model). A file made for another base
    (another architecture or size) is refused, naming the layers that do not fit.
    """
    from ldm_jax.convert.lora import read_lora
    from ldm_jax.models.adapters import lora as lora_lib

    slots = ("unet", *model.text_encoder_slots)
    params = dict(zip(slots, (model.unet_params, *model.text_encoder_params), strict=True))
    adapters: dict[str, list] = {slot: [] for slot in slots}
    layers = {slot: lora_lib.layer_paths(params[slot]) for slot in slots}
    for item in loras:
        path, weight = (item, 1.0) if isinstance(item, str | pathlib.Path) else item
        weights = _component_weights(weight, slots, layers["unet"])
        found = read_lora(path, 1.0, layers)
        other = sorted(set(found) - set(slots))
        if other:
            raise ValueError(
                f"{path} holds LoRA weights for {other}; this {model.kind} has {slots}"
            )
        for slot, adapter in found.items():
            adapter = dataclasses.replace(adapter, weight=weights[slot])
            try:
                lora_lib.check_targets(params[slot], [adapter])
            except ValueError as e:
                raise ValueError(
                    f"{path} does not fit this {model.kind} {slot} (a LoRA made for another "
                    f"base?): {e}"
                ) from None
            adapters[slot].append(adapter)
    fused = {s: lora_lib.fuse(params[s], a) if a else params[s] for s, a in adapters.items()}
    return dataclasses.replace(
        model,
        unet_params=fused["unet"],
        text_encoder_params=tuple(fused[s] for s in model.text_encoder_slots),
    )


def _component_weights(weight, slots, unet_layers) -> dict:
    """{slot: a number, or {layer path: number}} of one LoRA's weight (see `with_lora`)."""
    from ldm_jax.models.adapters import lora as lora_lib

    if not isinstance(weight, Mapping):
        return dict.fromkeys(slots, float(weight))
    unknown = sorted(set(weight) - set(slots))
    if unknown:
        hint = (
            ' (per-block weights go under "unet")' if set(unknown) & {"down", "mid", "up"} else ""
        )
        raise ValueError(f"LoRA weights for {unknown}; this model has {list(slots)}{hint}")
    out = {}
    for slot in slots:
        value = weight.get(slot, 1.0)
        if isinstance(value, Mapping):
            if slot != "unet":
                raise ValueError(f"per-block LoRA weights are for the U-Net, not the {slot}")
            value = lora_lib.block_weights(unet_layers, value)
        else:
            value = float(value)
        out[slot] = value
    return out


def is_run(path) -> bool:
    """Whether `path` is a run trained here (a workdir with config.json), not a checkpoint."""
    path = pathlib.Path(path)
    return path.is_dir() and (path / "config.json").is_file()


def load(path, **kwargs) -> Model:
    """A run trained here (`load_run`) or a pretrained checkpoint (`load_pretrained`, which
    takes the keyword arguments)."""
    return load_run(path) if is_run(path) else load_pretrained(path, **kwargs)


# --- Pretrained checkpoints ----------------------------------------------------------------------


def load_pretrained(
    path: str | pathlib.Path,
    *,
    variant: str | None = None,
    tokenizer_dir: str | pathlib.Path | None = None,
    tokenizer_2_dir: str | pathlib.Path | None = None,
    mesh=None,
    **overrides,
) -> Model:
    """A diffusers folder, single-file checkpoint or orbax export (`ldm_jax.convert.diffusers.
    load_pretrained` reads them); overrides: module fields for every module, e.g.
    dtype=jnp.bfloat16 (compute dtype)."""
    from ldm_jax.convert.diffusers import load_pretrained as load

    model = load(
        path,
        variant=variant,
        tokenizer_dir=tokenizer_dir,
        tokenizer_2_dir=tokenizer_2_dir,
        **overrides,
    )
    return with_mesh(model, mesh)


def with_mesh(model: Model, mesh=None) -> Model:
    """`model` on `mesh` (default: data parallel over every device)."""
    from ldm_jax import sharding as sharding_lib

    if mesh is None:
        mesh = model.mesh if model.mesh is not None else sharding_lib.make_mesh({"data": -1})
    if mesh is model.mesh:
        return model
    return dataclasses.replace(model, mesh=mesh, cache={})  # compiled for another mesh
