"""Progressive distillation of a text-to-image LDM (Salimans & Ho 2022, Algorithm 2),
with the teacher's classifier-free guidance distilled in (Meng et al. 2023, a student for one
guidance scale): one round halves the number of DDIM steps.

  ldm-jax train --config configs/shapes.py:distill --workdir runs/shapes/distill_4 \
      --config.distill.teacher_workdir=runs/shapes/ldm --config.distill.student_steps=4
  ldm-jax train --config configs/shapes.py:distill --workdir runs/shapes/distill_2 \
      --config.distill.teacher_workdir=runs/shapes/distill_4 --config.distill.student_steps=2

The first round's teacher is an `ldm` run or a pretrained SD 1.x / 2.x checkpoint (a diffusers
folder or single file in `teacher_workdir`: one `Model` either way), sampled with DDIM at 2N
steps and guidance `distill.guidance_scale` (cond and uncond in one batched call); a later round's teacher is the
previous round's student (already guided: one conditional call per step), whose own
`student_steps` must be 2N. The student starts as a copy of the teacher (U-Net and text
encoder, both trained) and is sampled like any run: `ldm-jax sample --workdir ... --steps N
--guidance-scale 1 --sampler ddim`; the run's config makes "trailing" its default DDIM spacing
(the grid it was distilled on).
"""

from __future__ import annotations

import logging
import pathlib

import jax
import jax.numpy as jnp

from ldm_jax import model as model_lib
from ldm_jax import rng as rng_lib
from ldm_jax.data.pipeline import StepIndexedBatches
from ldm_jax.data.tokenizers import token_ids
from ldm_jax.diffusion import distillation
from ldm_jax.diffusion.guidance import classifier_free_guidance
from ldm_jax.diffusion.objectives import add_noise, training_target, weighted_mse
from ldm_jax.model import Model
from ldm_jax.runs import as_json, read_run_config
from ldm_jax.train.objectives import Task
from ldm_jax.train.objectives import ldm as ldm_stage

log = logging.getLogger("ldm_jax")


def signature(config, teacher: Model | None = None) -> dict:
    """The parameter shapes (those of the teacher) and which round this run is."""
    if teacher is not None and teacher.kind != model_lib.RUN_KIND:  # a pretrained checkpoint
        from ldm_jax.convert import configs as convert_configs

        unet = convert_configs.unet_to_config(teacher.unet)
        return {"kind": teacher.kind, "unet": unet, "student_steps": config.distill.student_steps}
    return {**ldm_stage.signature(config), "student_steps": config.distill.student_steps}


# Checkpoints a student can be distilled from: one text encoder, no added conditioning.
PRETRAINED_TEACHERS = ("sd1", "sd2")


def load_teacher(config) -> tuple[Model, float]:
    """(the teacher model, the guidance scale it is sampled with in the targets)."""
    workdir = config.distill.teacher_workdir
    if not workdir:
        raise ValueError(
            "config.distill.teacher_workdir is empty: give an `ldm` run (first round) or the "
            "previous round's `distill` run"
        )
    path = pathlib.Path(workdir)
    if not model_lib.is_run(path):  # a pretrained checkpoint (diffusers folder, single file)
        teacher = model_lib.load_pretrained(path)
        if teacher.kind not in PRETRAINED_TEACHERS:
            raise ValueError(
                f"{path} is a {teacher.kind} checkpoint; distillation takes "
                f"{', '.join(PRETRAINED_TEACHERS)} checkpoints or runs trained here"
            )
        return teacher, float(config.distill.guidance_scale)
    teacher_config = read_run_config(path, model_lib.RUN_STAGES, what="a teacher")
    want, have = ldm_stage.signature(config), ldm_stage.signature(teacher_config)
    if as_json(want) != as_json(have):
        differing = sorted(k for k in want if as_json(want[k]) != as_json(have.get(k)))
        raise ValueError(
            f"the teacher in {path} has other model fields than this config: {differing}"
        )
    if as_json(config.diffusion.to_dict()) != as_json(teacher_config.diffusion.to_dict()):
        raise ValueError(f"the teacher in {path} was trained with another noise schedule")
    student_steps = config.distill.student_steps
    guidance = float(config.distill.guidance_scale)
    if teacher_config.stage == "distill":
        if teacher_config.distill.student_steps != 2 * student_steps:
            raise ValueError(
                f"the teacher in {path} samples {teacher_config.distill.student_steps} steps; "
                f"its student takes half as many, not {student_steps}"
            )
        guidance = 1.0  # guidance is already distilled into it: one conditional call per step
    return model_lib.load_run(path), guidance


def make_loss_fn(student: Model, teacher: Model, config, guidance: float):
    """loss_fn(params, frozen, batch, rng): the student's one DDIM step from z_t against the
    teacher's two (Algorithm 2), in the student's parameterization; frozen["teacher"] holds the
    teacher's weights."""
    grid = distillation.distillation_timesteps(student.schedule, config.distill.student_steps)
    grid = {k: jnp.asarray(v) for k, v in grid.items()}
    prediction_type = teacher.prediction_type  # (a run's is its config.diffusion's)
    empty_ids = jnp.asarray(token_ids(teacher.get_tokenizers()[0], [""])[0])

    def teacher_fn(params, ids):
        embed = lambda i: (
            teacher.text_encoders[0].apply(params["text_encoder"], i).last_hidden_state
        )
        apply = lambda x, t, ctx: teacher.unet.apply(params["unet"], x, t, ctx)
        cond = embed(ids)
        if guidance == 1.0:
            return lambda x, t: apply(x, t, cond)
        uncond = embed(jnp.broadcast_to(empty_ids, ids.shape))
        return classifier_free_guidance(apply, cond, uncond, guidance)

    def loss_fn(params, frozen, batch, rng):
        k_z, k_cap, k_step, k_eps = jax.random.split(rng, 4)
        x0 = ldm_stage.sample_latents(batch, frozen, k_z)
        b = x0.shape[0]
        ids = ldm_stage.caption_ids(config, batch, k_cap)
        k = jax.random.randint(k_step, (b,), 0, config.distill.student_steps)
        at = lambda name: grid[name][k]
        z_t = add_noise(x0, rng_lib.normal(k_eps, x0.shape), at("abar_t"))
        # Two teacher DDIM steps z_t -> z_mid -> z_end (no gradient: the teacher is fixed).
        teacher_model = teacher_fn(jax.lax.stop_gradient(frozen["teacher"]), ids)
        z_mid = distillation.ddim_step(
            teacher_model(z_t, at("t")), z_t, at("abar_t"), at("abar_mid"), prediction_type
        )
        z_end = distillation.ddim_step(
            teacher_model(z_mid, at("t_mid")), z_mid, at("abar_mid"), at("abar_end"),
            prediction_type,
        )  # fmt: skip
        x_target = distillation.distillation_target(z_t, z_end, at("abar_t"), at("abar_end"))
        # The (x~, eps~) pair consistent with z_t gives the target in any parameterization.
        a = at("abar_t").reshape(b, 1, 1, 1)
        eps_target = (z_t - jnp.sqrt(a) * x_target) / jnp.sqrt(1.0 - a)
        target = jax.lax.stop_gradient(
            training_target(x_target, eps_target, at("abar_t"), prediction_type)
        )
        context = student.text_encoders[0].apply(params["text_encoder"], ids).last_hidden_state
        pred = student.unet.apply(params["unet"], z_t, at("t"), context)
        return weighted_mse(
            pred, target, at("abar_t"), prediction_type, config.loss_weighting,
            config.min_snr_gamma,
        )  # fmt: skip

    return loss_fn


def build(config, workdir: str | pathlib.Path) -> Task:
    """The student's groups "unet" and "text_encoder", starting as the teacher's; frozen: the
    teacher, its VAE and latent scale."""
    workdir = pathlib.Path(workdir)
    teacher_dir = pathlib.Path(config.distill.teacher_workdir or ".")
    if teacher_dir.exists() and workdir.resolve() == teacher_dir.resolve():
        raise ValueError(f"--workdir {workdir} is the teacher's run; give the student a new one")
    teacher, guidance = load_teacher(config)
    distillation.distillation_timesteps(teacher.schedule, config.distill.student_steps)  # checks
    log.info(
        "distilling %s: %d DDIM steps (guidance %g) -> %d student steps",
        config.distill.teacher_workdir,
        2 * config.distill.student_steps,
        guidance,
        config.distill.student_steps,
    )
    if teacher.kind == model_lib.RUN_KIND:
        student = model_lib.from_config(config)  # the teacher's fields, this run's dtype
    else:
        student = model_lib.student_of(teacher, config)
    teacher_params = jax.device_get(teacher.run_params())
    vae = jax.device_get(teacher.run_frozen())  # the teacher's VAE and latent scale

    # --- Data: as the ldm stage, under the teacher's VAE. ---
    arrays = ldm_stage.training_arrays(config, student, vae["vae"])
    batches = StepIndexedBatches(arrays, config.batch_size, config.seed)

    # --- Student = a copy of the teacher. The teacher rides in `frozen`, so a checkpoint holds
    # it too (a model trained here is small) and a resumed round keeps the teacher it began with.
    def init_fn(teacher_params, vae):
        frozen = {"vae": vae["vae"], "latent_scale": vae["latent_scale"], "teacher": teacher_params}
        return dict(teacher_params), frozen

    return Task(
        groups=("unet", "text_encoder"),
        init_fn=init_fn,
        init_args=(teacher_params, vae),
        phases=make_loss_fn(student, teacher, config, guidance),
        batches=batches,
        signature=signature(config, teacher),
        on_sample=ldm_stage.sample_grid_fn(student, config, workdir),
    )
