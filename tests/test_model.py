"""The one model bundle (issue 13, item 1): a run's config read as the same `Model` a checkpoint
loads into, its scheduler config meaning what its training used."""

import numpy as np
import pytest

from conftest import REPO
from ldm_jax import model as model_lib
from ldm_jax.config import load_config
from ldm_jax.diffusion.schedules import schedule_from_config

SHAPES = str(REPO / "configs" / "shapes.py")


@pytest.mark.parametrize("overrides", [[], ["diffusion.beta_schedule=squaredcos_cap_v2"]])
def test_a_run_config_is_a_model(overrides):
    config = load_config(SHAPES + ":ldm,smoke", overrides)
    model = model_lib.from_config(config)
    assert model.kind == "run" and not model.is_sdxl and not model.is_inpainting
    assert model.text_encoder_slots == ("text_encoder",)
    # The schedule generate() and the trainers read from the scheduler config is the one the
    # run trains with (the same betas, bit for bit).
    np.testing.assert_array_equal(
        np.asarray(model.schedule.alphas_cumprod),
        np.asarray(schedule_from_config(config.diffusion).alphas_cumprod),
    )
    assert model.prediction_type == config.diffusion.prediction_type
    assert model.default_size == config.data.image_size
    assert model.sampling == {
        "sampler": "ddim",
        "sampler_options": {},
        "num_inference_steps": config.sample.num_steps,
        "guidance_scale": config.sample.guidance_scale,
    }
    assert model.vae_scale_factor == 2 ** (len(config.autoencoder.block_out_channels) - 1)
    assert model.get_tokenizers()[0]([""]).shape == (1, config.tokenizer.context_length)


def test_a_students_sampling_defaults_are_its_own():
    config = load_config(SHAPES + ":distill,smoke")
    model = model_lib.from_config(config)
    assert model.sampling["num_inference_steps"] == config.distill.student_steps
    assert model.sampling["guidance_scale"] == 1.0
    assert model.sampling["sampler_options"] == {"timestep_spacing": "trailing"}


def test_run_params_round_trip():
    config = load_config(SHAPES + ":ldm,smoke")
    params = {"unet": {"params": {"w": np.ones(2)}}, "text_encoder": {"params": {"e": np.zeros(3)}}}
    frozen = {"vae": {"params": {"v": np.ones(1)}}, "latent_scale": np.float32(0.37)}
    model = model_lib.from_config(config, params, frozen)
    assert model.run_params() is not params and model.run_params()["unet"] is params["unet"]
    assert model.scaling_factor == pytest.approx(0.37)
    assert model.run_frozen()["latent_scale"] == np.float32(0.37)  # float32 survives the trip
    other = model.with_run_params({"unet": 1, "text_encoder": 2})
    assert other.cache is model.cache  # copies share generate()'s compiled functions
    assert other.vae_params is model.vae_params


def test_no_run_is_named():
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        model_lib.load_run("/nonexistent/run")
