"""LoRA fine-tuning (Hu et al. 2021) of a pretrained checkpoint or a model trained here.

  ldm-jax train --config configs/sd15_lora.py --workdir runs/sd15_lora \
      --config.pretrained=models/stable-diffusion-v1-5 --config.data.path=/data/my_photos

The fine-tuning objective (`finetune.py`: data, VAE posterior, caption dropout, SDXL's
micro-conditioning, the denoising loss) with one difference: the U-Net is frozen and a low-rank
adapter of its `config.lora.targets` layers is the only trainable group ("lora"), applied
unfused (`models/adapters/lora.py`: y = W x + alpha / r B(A x), the base never copied). The
optimizer state and the checkpoints hold the adapter alone; the frozen U-Net, VAE and text
encoders are read from `config.pretrained` again on resume and checked by fingerprint.

At the end the adapter (its EMA if the group keeps one) is written in diffusers' format with its
alpha in the metadata, `<workdir>/pytorch_lora_weights.safetensors`, which diffusers'
`load_lora_weights(<workdir>)` loads.
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
    """The trainable group "lora"; frozen: the U-Net, VAE and text encoder(s), out of the
    checkpoints."""
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

    def init_fn(frozen):
        key = jax.random.key(config.seed)
        adapter = lora.init(frozen["unet"], spec.targets, spec.rank, key, init=spec.init)
        return {"lora": adapter}, frozen

    def loss_fn(params, frozen, batch, rng):
        draws = finetune.sample_draws(objective, rng, batch["input_ids"][0].shape[0])
        adapter = lora.Adapter(params["lora"], float(spec.alpha))
        with lora.intercept([adapter], model=UNet2DConditionModel):
            return finetune.loss_with_draws(objective, frozen["unet"], frozen, batch, draws)

    def fused_unet(state):
        adapter = lora.Adapter(state.averaged()["lora"], float(spec.alpha))
        return lora.fuse(state.frozen["unet"], [adapter])

    def finish(state):
        if jax.process_index() != 0:
            return
        adapter = lora.Adapter(jax.device_get(state.averaged()["lora"]), float(spec.alpha))
        path = save_lora(workdir, {"unet": adapter}, targets=list(spec.targets))
        log.info("wrote the LoRA of step %d to %s", int(state.step), path)
        if model.kind != model_lib.RUN_KIND:
            log.info("diffusers: pipe.load_lora_weights(%r)", str(workdir))

    return Task(
        groups=("lora",),
        init_fn=init_fn,
        init_args=(frozen,),
        phases=loss_fn,
        batches=batches,
        signature={**finetune.signature(model), "lora": _signature(spec)},
        on_sample=finetune.make_on_sample(config, model, workdir, unet_params=fused_unet),
        frozen_fingerprint=params_fingerprint(frozen),
        finish=finish,
    )


def _signature(spec) -> dict:
    return {"rank": int(spec.rank), "targets": list(spec.targets)}
