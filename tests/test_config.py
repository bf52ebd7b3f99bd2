"""Config files and `--config.a.b=value` overrides."""

import pytest

from conftest import REPO
from ldm_jax.config import ConfigError, load_config

SHAPES = str(REPO / "configs" / "shapes.py")


def test_stages_and_smoke_variant():
    ldm = load_config(SHAPES)
    assert ldm.stage == "ldm" and ldm.p_uncond == 0.1
    ae = load_config(SHAPES + ":autoencoder,smoke")
    assert ae.stage == "autoencoder" and ae.data.config_name == "smoke"
    assert load_config(SHAPES + ":ldm,64").data.image_size == 64
    # Adapting a trained model to a held-out concept: the fine-tuning objectives' fields.
    lora = load_config(SHAPES + ":lora,navy")
    assert lora.stage == "lora" and lora.data.config_name == "navy" and not lora.data.random_flip
    assert lora.sample.prompts == ("a navy circle", "a navy square", "a navy triangle")
    full = load_config(SHAPES + ":finetune,smoke")
    assert full.data.config_name == "cross" and "lora" not in full and full.num_train_steps == 3
    assert load_config(SHAPES + ":lora,cross,replay").data.config_name == "cross_replay"
    for bad in ("ldm,cross", "lora,cross,navy", "lora,64", "ldm,replay"):
        with pytest.raises(ValueError, match="bad argument|concept data only|'replay' goes"):
            load_config(f"{SHAPES}:{bad}")


def test_overrides_are_typed():
    c = load_config(
        SHAPES,
        [
            "unet.block_out_channels=(8,16)",
            "p_uncond=0.2",
            "sample.sampler=ddpm",
            "num_train_steps=7",
            "ema_decay=1",
        ],
    )
    assert c.unet.block_out_channels == (8, 16)
    assert c.p_uncond == 0.2 and c.sample.sampler == "ddpm" and c.num_train_steps == 7
    assert c.ema_decay == 1.0  # an int is accepted for a float field


def test_unknown_key_names_it():
    with pytest.raises(ConfigError, match=r"unet\.nope.*no field 'nope'.*block_out_channels"):
        load_config(SHAPES, ["unet.nope=1"])
    with pytest.raises(ConfigError, match="no field 'learning_rat'"):
        load_config(SHAPES, ["optimizer.learning_rat=1e-3"])


def test_bad_value_and_bad_files():
    with pytest.raises(ConfigError, match="num_train_steps"):
        load_config(SHAPES, ["num_train_steps=many"])
    with pytest.raises(ConfigError, match="must look like"):
        load_config(SHAPES, ["p_uncond"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/nope.py")
    with pytest.raises(ValueError, match="bad argument"):
        load_config(SHAPES + ":ldm,fast")
