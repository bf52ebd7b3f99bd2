"""The embedded default: text-to-image latent diffusion on the procedural `shapes` dataset.

Two stages, each one command (this is what `make demo` runs):

  ldm-jax train --config configs/shapes.py:autoencoder --workdir runs/shapes/autoencoder
  ldm-jax train --config configs/shapes.py:ldm --workdir runs/shapes/ldm \
      --config.autoencoder_workdir=runs/shapes/autoencoder

A third, optional stage distills the ldm model to fewer steps (one round per command; see
ldm_jax/train/objectives/distill.py and experiments/distillation/):

  ldm-jax train --config configs/shapes.py:distill --workdir runs/shapes/student_4 \
      --config.distill.teacher_workdir=runs/shapes/ldm --config.distill.student_steps=4

Two more teach the trained model a held-out concept of the dataset (`cross`, a new shape, or
`navy`, a new colour: ldm_jax/data/shapes.py), from 512 examples that all have it, with the
objectives that work on any checkpoint (ldm_jax/train/objectives/lora.py, finetune.py;
experiments/lora/; `,replay` mixes in examples of the main distribution):

  ldm-jax train --config configs/shapes.py:lora,cross --workdir runs/shapes/lora_cross \
      --config.pretrained=runs/shapes/ldm
  ldm-jax train --config configs/shapes.py:finetune,cross --workdir runs/shapes/finetune_cross \
      --config.pretrained=runs/shapes/ldm

Append `,smoke` to the argument (`configs/shapes.py:ldm,smoke`) for a run of seconds on a CPU with
tiny widths and the 512-example `smoke` split; the tests use it. `,64` selects 64x64 images.
Expected (2-core CPU, see README): color+shape adherence >= 80% at guidance 4, 25 DDIM steps.
"""

import pathlib

import ml_collections

from ldm_jax.config import load_config_file, param_groups
from ldm_jax.data import shapes

COMMON = pathlib.Path(__file__).with_name("common.py")

SD15_LORA = pathlib.Path(__file__).with_name("sd15_lora.py")

STAGES = ("autoencoder", "ldm", "distill", "lora", "finetune")
ADAPT_STAGES = ("lora", "finetune")  # of a trained model, to a held-out concept
OPTIONS = ("smoke", "64", "replay", *shapes.CONCEPTS)


def _parse(arg):
    parts = [p for p in (arg or "ldm").split(",") if p]
    stage = [p for p in parts if p in STAGES]
    concept = [p for p in parts if p in shapes.CONCEPTS]
    unknown = [p for p in parts if p not in STAGES + OPTIONS]
    bad_concept = len(concept) > 1 or (concept and stage and stage[0] not in ADAPT_STAGES)
    if unknown or len(stage) > 1 or bad_concept:
        raise ValueError(
            f"configs/shapes.py: bad argument {arg!r}; use one stage of {STAGES} "
            f"plus options from {OPTIONS}, comma-separated (a concept only with "
            f"{' or '.join(ADAPT_STAGES)})"
        )
    stage = stage[0] if stage else "ldm"
    if stage in ADAPT_STAGES and "64" in parts:
        raise ValueError(f"configs/shapes.py: {stage} has 32x32 concept data only; drop ',64'")
    if stage not in ADAPT_STAGES and "replay" in parts:
        raise ValueError(f"configs/shapes.py: 'replay' goes with {' or '.join(ADAPT_STAGES)}")
    concept = concept[0] if concept else "cross"
    return stage, "smoke" in parts, "64" in parts, concept, "replay" in parts


def get_config(arg=None):
    stage, smoke, big, concept, replay = _parse(arg)
    if stage in ADAPT_STAGES:
        return _adapt_config(stage, smoke, concept, replay)
    c = load_config_file(str(COMMON))  # mesh, precision, checkpoints, multi-host, wandb
    c.unlock()  # (loaded locked) this config adds its own fields
    c.stage = stage

    c.data = dict(
        name="shapes",
        config_name="64" if big else "32",  # TFDS builder config of ldm_jax/data/shapes_tfds.py
        data_dir="~/tensorflow_datasets",
        image_size=64 if big else 32,
    )
    # Sharding, precision and memory switches: configs/common.py (float32 here, no remat).
    if stage == "autoencoder":
        # XLA:CPU's YNNPACK fusions (on by default in jax 0.10) run this narrow convolutional
        # network's step 1.2-1.5x slower than XLA's own kernels (benchmarks/README.md).
        c.cpu_compiler_options = {"xla_cpu_experimental_ynn_fusion_type": ""}

    # Stage 1: AutoencoderKL (Rombach et al. 2022, Sec. 3): f=4, 4 latent channels.
    c.autoencoder = dict(
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
    )
    c.autoencoder_loss = dict(
        reconstruction="l2",  # "l1" or "l2" (l2 learns the 8 colours much faster here)
        kl_weight=1e-6,
        # Room for the LDM paper's perceptual and adversarial terms (a later issue): weights 0 = off.
        lpips_weight=0.0,
        discriminator_weight=0.0,
    )

    # Stage 2: text encoder (trained jointly, as LDM's text-to-image model) + U-Net on latents.
    c.autoencoder_workdir = ""  # where stage 1 wrote its checkpoint (required for stage "ldm")
    # Whole words of the captions' 31-word vocabulary (ldm_jax/data/tokenizers.py WordTokenizer);
    # or name="byte" (any text, 77 bytes) or name="clip", path=<folder with the BPE files>.
    c.tokenizer = dict(
        name="words", path="", context_length=16, vocabulary=tuple(sorted(shapes.CAPTION_WORDS))
    )
    c.text_encoder = dict(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_act="quick_gelu",
    )
    c.unet = dict(
        # 64 channels at both levels: with word tokens, (64, 128) learned no better in the same
        # time (README, "How the demo config was chosen"); (64, 64) takes 0.11 s a step, not 0.17.
        block_out_channels=(64, 64),
        # Cross-attention at 4x4 and in the middle block only: adding it at 8x8 cost ~45% more
        # step time on a 2-core CPU (0.33 -> 0.48 s at batch 64), which the demo cannot afford.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        attention_head_dim=4,
        norm_num_groups=16,
    )
    c.diffusion = dict(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.0001,
        beta_end=0.02,
        rescale_betas_zero_snr=False,
        prediction_type="epsilon",
    )
    # Min-SNR-5 (Hang et al. 2023); with lr 1e-3 -> 2e-3 it took color+shape adherence from 36%
    # to 62% at 1200 steps (README, "How the demo config was chosen").
    c.loss_weighting = "min_snr"  # or "none"
    c.min_snr_gamma = 5.0
    c.p_uncond = 0.1  # probability of training on the empty prompt (classifier-free guidance)
    c.canonical_caption_prob = 0.5  # else a paraphrase / short form from the dataset
    c.ema_decay = 0.995 if stage == "ldm" else 0.99  # runs are short: a short EMA window
    # Each trainable group may set its own optimizer fields and EMA decay (None: the above).
    c.param_groups = param_groups(
        *(("vae",) if stage == "autoencoder" else ("unet", "text_encoder"))
    )

    c.optimizer = dict(
        learning_rate=2e-3 if stage == "ldm" else 3e-3,
        warmup_steps=200 if stage == "ldm" else 50,
        lr_schedule="cosine",  # "cosine" (to 10% at the end) or "constant"
        weight_decay=0.01,
        b1=0.9,
        b2=0.99,
        grad_clip_norm=1.0,
    )
    # The autoencoder learns more from more, smaller batches: 1600 steps of 8 reconstruct shapes
    # better than 600 of 64 in a quarter of the time (README). On a 2-core CPU: ~16 AE steps/s,
    # ~9 LDM steps/s at batch 32.
    c.batch_size = {"autoencoder": 8, "ldm": 32, "distill": 64}[stage]
    c.num_train_steps = {"autoencoder": 1600, "ldm": 3000, "distill": 1000}[stage]
    # Stop at the first non-finite loss (the update is skipped): common.py's default.
    # A checkpoint and a sample grid halfway and at the end: each costs ~3 s on 2 CPU cores.
    c.checkpoint_every = c.num_train_steps // 2
    c.sample_every = c.num_train_steps // 2  # sample grid (or reconstructions) of fixed prompts
    c.sample = dict(
        prompts=(
            "a red circle",
            "a green square",
            "a blue triangle",
            "a yellow circle",
            "a orange square",
            "a purple triangle",
            "a cyan circle",
            "a magenta square",
        ),
        sampler="ddim",
        num_steps=25,
        guidance_scale=4.0,
    )

    if stage == "distill":
        # Progressive distillation (ldm_jax/train/objectives/distill.py): one round, 2N teacher DDIM steps
        # -> N student steps; the student is sampled without guidance (it is distilled in).
        # student_steps is also the sample grid's step count: one FieldReference, set either.
        steps = ml_collections.FieldReference(4)
        c.distill = dict(teacher_workdir="", student_steps=steps, guidance_scale=4.0)
        c.optimizer.update(learning_rate=3e-4, warmup_steps=50, lr_schedule="constant")
        c.ema_decay = 0.99
        c.sample.update(guidance_scale=1.0, sampler_options={"timestep_spacing": "trailing"})
        c.sample.num_steps = steps

    if smoke:
        c.data.config_name = "smoke"
        c.data.image_size = 32
        c.autoencoder.block_out_channels = (8, 16)
        c.autoencoder.norm_num_groups = 4
        c.text_encoder.update(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        )
        c.unet.update(block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=2)
        c.batch_size = 16
        c.num_train_steps = 6
        c.optimizer.warmup_steps = 2
        c.log_every = 2
        c.checkpoint_every = 3
        c.sample_every = 6
        c.sample.prompts = ("a red circle", "a blue square")
        if stage == "distill":
            c.distill.student_steps = 2  # and so sample.num_steps
        else:
            c.sample.num_steps = 3
        c.wandb.mode = "disabled"
    return c


def _adapt_config(stage, smoke, concept, replay):
    """LoRA or full fine-tuning of a trained shapes model (`pretrained`: its ldm workdir) on one
    held-out concept: the objectives and fields of configs/sd15_lora.py (finetune.py's recipe),
    with the shapes data, the base run's own loss weighting and sampling, and sizes for a CPU.
    `replay`: half of the examples are of the main distribution (the concept's `_replay` data),
    so that the model keeps what it knew (DreamBooth's prior preservation, with real data)."""
    c = load_config_file(f"{SD15_LORA}:")
    c.unlock()
    c.stage = stage
    c.pretrained = ""  # the ldm run to adapt, e.g. runs/shapes/ldm (required)
    c.compute_dtype = "float32"
    c.data = dict(
        name="shapes",
        # 512 train examples, all with the concept, or 1024, every second one with it (replay)
        config_name=f"{concept}_replay" if replay else concept,
        data_dir="~/tensorflow_datasets",
        image_size=32,
        # No flips: a mirrored "left" would be a shape at the right under a caption saying left.
        random_flip=False,
        random_crop=False,
        precomputed_latents_dir="",
    )
    c.loss_weighting = "min_snr"  # as the base model was trained
    c.batch_size = 32
    c.num_train_steps = 400
    c.checkpoint_every = 200
    c.sample_every = 400
    c.log_every = 50
    c.optimizer.update(warmup_steps=20, lr_schedule="constant")
    if stage == "lora":
        c.lora.rank = 16
        c.lora.alpha = 16.0
        # Every Dense and Conv layer of the blocks: a new shape is drawn by the convolutions,
        # not only chosen by the cross-attention (experiments/lora/README.md compares).
        c.lora.targets = (
            *c.lora.targets,
            "proj_in",
            "proj_out",
            "ff.net.0.proj",
            "ff.net.2",
            "conv1",
            "conv2",
            "time_emb_proj",
        )
        c.optimizer.learning_rate = 2e-3
    else:
        del c["lora"]
        c.param_groups = param_groups("unet")
        c.optimizer.learning_rate = 2e-4
    c.ema_decay = 0.0
    key, value = shapes.CONCEPTS[concept]
    others = shapes.SHAPES if key == "color" else tuple(shapes.COLORS)[:4]
    c.sample = dict(
        prompts=tuple(
            f"a {value} {other}" if key == "color" else f"a {other} {value}" for other in others
        ),
        num_inference_steps=25,
        guidance_scale=4.0,
        sampler="ddim",
        seed=0,
    )
    if smoke:
        c.batch_size = 8
        c.num_train_steps = 3
        c.optimizer.warmup_steps = 1
        c.log_every = 1
        c.checkpoint_every = 2
        c.sample_every = 3
        c.sample.num_inference_steps = 2
        c.wandb.mode = "disabled"
    return c
