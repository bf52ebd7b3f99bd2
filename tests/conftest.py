"""Test setup: 8 simulated CPU devices so that sharding is exercised everywhere.

XLA_FLAGS must be set before jax is imported anywhere, which is why this happens at the top of
conftest.py (pytest imports it before any test module).
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib
import tempfile

import jax
import pytest

# Several tests train the same smoke models (fresh runs, resumed runs): a persistent compilation
# cache for the session lets identical steps compile once.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="ldm_jax_xla_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def clip_tokenizer_dir():
    path = SHARED / "data" / "clip_tokenizer"
    if not path.exists():
        pytest.skip(f"CLIP tokenizer files not found at {path}")
    return path
