"""LoRA fine-tuning (Hu et al. 2021) of a pretrained checkpoint or a model trained here.

  ldm-jax train --config configs/sd15_lora.py --workdir runs/sd15_lora \
      --config.pretrained=models/stable-diffusion-v1-5 --config.data.path=/data/my_photos

The fine-tuning objective (`finetune.py`: data, VAE posterior, caption dropout, SDXL's
micro-conditioning, the denoising loss) with one difference: the U-Net is frozen and a low-rank
adapter of its `config.lora.targets` layers is the only trainable group ("lora"), applied
unfused (`models/adapters/lora.py`: y = W x + alpha / r B(A x), the base never copied). The
optimizer state and the checkpoints hold the adapter alone; the frozen U-Net, VAE and text
encoders are read from `config.pretrained` again on resume and checked by fingerprint.

`config.lora.text_encoder_targets` (e.g. ("q_proj", "k_proj", "v_proj", "out_proj"), as
diffusers' `--train_text_encoder`; empty: off) adds a second group, "text_encoder_lora", an
adapter of every text encoder with the same rank and alpha, with its own optimizer fields via
`config.param_groups.text_encoder_lora` (diffusers' DreamBooth scripts' `text_encoder_lr`). It is
folded into the frozen encoders' kernels in each step (W + alpha / r B A, differentiable in A
and B): the encoders are small next to the U-Net, and fusing keeps the two encoders of SDXL,
which share their layer names, apart.

At the end the adapter (its EMA if the group keeps one) is written in diffusers' format with its
alpha in the metadata, `<workdir>/pytorch_lora_weights.safetensors`, which diffusers'
`load_lora_weights(<workdir>)` loads (`config.lora.export_layout="kohya"`: the kohya / A1111
layout instead).
"""

from __future__ import annotations

import logging
import pathlib

import jax
import numpy as np

from ldm_jax import model as model_lib
from ldm_jax.convert.lora import save_lora
from ldm_jax.data.caption_batches import make_batches
from ldm_jax.models.adapters import lora
from ldm_jax.models.unet import UNet2DConditionModel
from ldm_jax.runs import params_fingerprint
from ldm_jax.train.objectives import Task, finetune

log = logging.getLogger("ldm_jax")


def build(config, workdir: str | pathlib.Path) -> Task:
    """The trainable groups "lora" (and "text_encoder_lora"); frozen: the U-Net, VAE and text
    encoder(s), out of the checkpoints."""
    workdir = pathlib.Path(workdir)
    model = finetune.load_model(config)
    objective = finetune.make_objective(config, model)
    batches = make_batches(config, model)
    spec = config.lora
    frozen = jax.tree.map(np.asarray, {**finetune.frozen_params(model), "unet": model.unet_params})
    layers = lora.targeted_layers(frozen["unet"], spec.targets)
    if not layers:
        raise ValueError(f"config.lora.targets {list(spec.targets)} match no U-Net layer")
    log.info("LoRA rank %d, alpha %g on %d U-Net layers", spec.rank, spec.alpha, len(layers))
    alpha = float(spec.alpha)
    te_targets = tuple(spec.get("text_encoder_targets", ()))
    slots = model.text_encoder_slots
    groups = ("lora", "text_encoder_lora") if te_targets else ("lora",)
    for slot in slots if te_targets else ():
        found = lora.targeted_layers(frozen["text_encoders"][slot], te_targets)
        if not found:
            raise ValueError(
                f"config.lora.text_encoder_targets {list(te_targets)} match no {slot} layer"
            )
        log.info("LoRA on %d %s layers", len(found), slot)

    def init_fn(frozen):
        key = jax.random.key(config.seed)
        params = {"lora": lora.init(frozen["unet"], spec.targets, spec.rank, key, init=spec.init)}
        if te_targets:
            params["text_encoder_lora"] = {
                slot: lora.init(
                    frozen["text_encoders"][slot],
                    te_targets,
                    spec.rank,
                    jax.random.fold_in(key, 1 + i),
                    init=spec.init,
                )
                for i, slot in enumerate(slots)
            }
        return params, frozen

    def with_text_encoder_lora(params, frozen):
        if not te_targets:
            return frozen
        encoders = {
            slot: lora.fuse(tree, [lora.Adapter(params["text_encoder_lora"][slot], alpha)])
            for slot, tree in frozen["text_encoders"].items()
        }
        return {**frozen, "text_encoders": encoders}

    def loss_fn(params, frozen, batch, rng):
        draws = finetune.sample_draws(objective, rng, batch["input_ids"][0].shape[0])
        adapter = lora.Adapter(params["lora"], alpha)
        frozen = with_text_encoder_lora(params, frozen)
        with lora.intercept([adapter], model=UNet2DConditionModel):
            return finetune.loss_with_draws(objective, frozen["unet"], frozen, batch, draws)

    def fused_unet(state):
        adapter = lora.Adapter(state.averaged()["lora"], alpha)
        return lora.fuse(state.frozen["unet"], [adapter])

    def finish(state):
        if jax.process_index() != 0:
            return
        params = jax.device_get(state.averaged())
        adapters = {"unet": lora.Adapter(params["lora"], alpha)}
        targets = {"unet": list(spec.targets)}
        for slot in slots if te_targets else ():
            adapters[slot] = lora.Adapter(params["text_encoder_lora"][slot], alpha)
            targets[slot] = list(te_targets)
        layout = spec.get("export_layout", "diffusers")
        path = save_lora(workdir, adapters, targets=targets, layout=layout)
        log.info("wrote the LoRA of step %d to %s", int(state.step), path)
        if model.kind != model_lib.RUN_KIND:
            log.info("diffusers: pipe.load_lora_weights(%r)", str(workdir))

    return Task(
        groups=groups,
        init_fn=init_fn,
        init_args=(frozen,),
        phases=loss_fn,
        batches=batches,
        signature={**finetune.signature(model), "lora": _signature(spec)},
        on_sample=finetune.make_on_sample(
            config,
            model,
            workdir,
            unet_params=fused_unet,
            frozen=lambda state: with_text_encoder_lora(state.averaged(), state.frozen),
        ),
        frozen_fingerprint=params_fingerprint(frozen),
        finish=finish,
    )


def _signature(spec) -> dict:
    out = {"rank": int(spec.rank), "targets": list(spec.targets)}
    if spec.get("text_encoder_targets"):
        out["text_encoder_targets"] = list(spec.text_encoder_targets)
    return out
