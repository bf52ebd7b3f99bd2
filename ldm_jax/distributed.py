"""Joining the processes of a multi-host run with `jax.distributed`, before any JAX computation.

Where the coordinates come from (the first that applies wins):

1. the config: `distributed.coordinator_address` ("host:port" of process 0), `.num_processes`,
   `.process_id`;
2. the environment: `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` (what
   `launch/local.sh`, `launch/slurm.sbatch` and `launch/gke/` set; JAX itself reads the first);
3. a cluster that JAX detects by itself (Cloud TPU pod slices, GKE TPU, SLURM, Open MPI):
   `jax.distributed.initialize()` without arguments, when `distributed.auto_detect` is true;
4. otherwise one process, and nothing is initialized.

Per-process values (the process id) come from the environment in practice; the config fields
exist for one-off runs and tests.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("ldm_jax")

ENV_ADDRESS, ENV_NUM_PROCESSES, ENV_PROCESS_ID = (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
)


def detected_cluster() -> str | None:
    """Name of the cluster environment JAX's own auto-detection would use, or None.

    Uses the ClusterEnv registry of `jax._src.clusters` (what `jax.distributed.initialize()`
    consults); if that private API moves, auto-detection is simply off.
    """
    try:
        from jax._src import clusters
    except ImportError:  # pragma: no cover - depends on the JAX version
        return None
    for env in clusters.ClusterEnv._cluster_types:
        if not env.opt_in_only_method and env.is_env_present():
            return env.name or env.__name__
    return None


def resolve(dist_config, environ=None) -> dict | None:
    """Keyword arguments for `jax.distributed.initialize`, or None for a single-process run.

    dist_config: the `distributed` config group (coordinator_address, num_processes, process_id,
    auto_detect, initialization_timeout); environ: defaults to `os.environ`. Raises ValueError when
    the coordinates are given only in part.
    """
    environ = os.environ if environ is None else environ
    address = dist_config.coordinator_address or environ.get(ENV_ADDRESS, "")
    num = int(dist_config.num_processes or environ.get(ENV_NUM_PROCESSES, 0) or 0)
    pid_text = environ.get(ENV_PROCESS_ID, "")
    pid = int(dist_config.process_id) if dist_config.process_id >= 0 else None
    if pid is None and pid_text != "":
        pid = int(pid_text)
    timeout = int(dist_config.initialization_timeout)
    if address or num or pid is not None:
        missing = [
            name
            for name, absent in (
                ("coordinator_address", not address),
                ("num_processes", num <= 0),
                ("process_id", pid is None),
            )
            if absent
        ]
        if missing:
            raise ValueError(
                "multi-process run given in part: set distributed."
                + ", distributed.".join(missing)
                + f" (or the environment variables {ENV_ADDRESS}, {ENV_NUM_PROCESSES}, "
                f"{ENV_PROCESS_ID}); have address={address!r}, num_processes={num}, "
                f"process_id={pid}"
            )
        if not 0 <= pid < num:
            raise ValueError(f"process_id {pid} is not in [0, num_processes={num})")
        return dict(
            coordinator_address=address,
            num_processes=num,
            process_id=pid,
            initialization_timeout=timeout,
        )
    if dist_config.auto_detect and detected_cluster() is not None:
        return dict(initialization_timeout=timeout)  # JAX fills in the rest from the cluster
    return None


def initialize(config) -> bool:
    """Join the other processes of this run if there are any; True if `jax.distributed` is up.

    Must run before anything initializes a JAX backend (jax.devices(), any computation).
    """
    dist_config = config.get("distributed")
    if dist_config is None:
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs = resolve(dist_config)
    if kwargs is None:
        return False
    # Cross-process collectives of the CPU backend (the tests; harmless on GPU/TPU hosts).
    jax.config.update("jax_cpu_collectives_implementation", dist_config.cpu_collectives)
    jax.distributed.initialize(**kwargs)
    how = "from the cluster environment" if "process_id" not in kwargs else "from config/env"
    log.info(
        "jax.distributed initialized %s: process %d of %d, %d local / %d global devices",
        how,
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def barrier(name: str, timeout_s: float = 600.0) -> None:
    """Wait until every process reaches `name` (no-op with one process).

    Goes through the coordination service, not through device collectives: the gloo CPU
    collectives give up after 30 s when one process reaches its first collective much later than
    another (as when it loads data or compiles more slowly), and the trainer calls this before
    its first collective so such skew is absorbed here.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed

    jax_distributed.global_state.client.wait_at_barrier(f"ldm_jax:{name}", int(timeout_s * 1000))
