"""The defaults every config in this folder shares: the device mesh and sharding, precision and
memory switches, multi-host start-up, logging, checkpointing and wandb. Each config starts from
`get_config()` here and sets what differs (`configs/shapes.py` for models trained here,
`configs/sd15_finetune.py` for checkpoints), so these fields have one name and one default.
"""

import ml_collections


def get_config(arg=None):
    if arg:
        raise ValueError(f"configs/common.py takes no argument, got {arg!r}")
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Sharding (ldm_jax/sharding.py): mesh axes data / fsdp / tensor, -1 = the rest. Parameters
    # and activations carry logical axis names (ldm_jax/models/axes.py); `sharding_rules`
    # ((logical, mesh axes), ...) maps them, () = sharding.DEFAULT_RULES. Data parallel by default;
    # FSDP on 8 devices: --config.mesh.data=2 --config.mesh.fsdp=4; tensor parallel:
    # --config.mesh.data=4 --config.mesh.tensor=2.
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    # Several TPU slices / GPU hosts: `mesh` is then the mesh within one slice and `dcn_mesh` the
    # factor of each axis across slices (slow network), e.g. 4 slices data-parallel over DCN and
    # FSDP within each: --config.mesh.data=1 --config.mesh.fsdp=-1 --config.dcn_mesh.data=4.
    c.dcn_mesh = dict(data=1, fsdp=1, tensor=1)
    c.sharding_rules = ()
    c.mesh_num_devices = 0  # > 0: only the first N devices (single-device references, debugging)
    # Precision and memory: activations in compute_dtype ("bfloat16" on GPU/TPU; parameters, norms,
    # softmax and the loss stay float32), U-Net block remat ("none", "full", "dots";
    # models/unet_blocks.py REMAT_POLICIES) and gradient accumulation over micro-batches (batch_size / grad_accum_steps
    # examples at a time, one update per batch).
    c.compute_dtype = "float32"
    c.remat_policy = "none"
    c.grad_accum_steps = 1
    # XLA compiler options of the training step when it runs on CPU devices (jax.jit's
    # compiler_options: XLA DebugOptions fields; not used on GPU/TPU).
    c.cpu_compiler_options = {}
    c.max_consecutive_nonfinite = 1  # skipped non-finite updates in a row before stopping

    c.log_every = 50
    # orbax checkpoints (async saves) in <workdir>/checkpoints: the newest
    # `max_checkpoints_to_keep`, plus every multiple of `keep_checkpoint_every` (0: none).
    c.checkpoint_every = 1000
    c.max_checkpoints_to_keep = 2
    c.keep_checkpoint_every = 0
    # Multi-host runs (ldm_jax/distributed.py): empty/0/-1 take the values from the environment
    # (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; see launch/), else from a
    # cluster JAX detects (TPU pod slice, SLURM, Open MPI) when auto_detect is on.
    c.distributed = dict(
        coordinator_address="",  # "host:port" of process 0
        num_processes=0,
        process_id=-1,
        auto_detect=True,
        initialization_timeout=300,  # seconds to wait for all processes to join
        cpu_collectives="gloo",  # cross-process collectives of the CPU backend
    )
    c.wandb = dict(mode="offline", project="ldm_jax", entity="")  # mode "disabled" to turn off
    return c
