"""The FID Inception's weights (pytorch-fid's / torch-fidelity's file) into
`models.inception.FIDInceptionV3`'s parameters."""

from __future__ import annotations

import pathlib

from ldm_jax.convert.naming import state_dict_to_params
from ldm_jax.convert.state_dict import read_state_dict
from ldm_jax.models.inception import abstract_params


def load_inception_params(path: str | pathlib.Path) -> dict:
    """The FID Inception's weights from pytorch-fid's / torch-fidelity's file (a `.pth`, read with
    `torch.load(weights_only=True)`, so torch must be installed) or the same tensors as
    `.safetensors`. Strict: every missing, unexpected or misshapen tensor is a CheckpointError
    naming it. Returns {"params": ...} for `FIDInceptionV3().apply`."""
    state_dict = read_state_dict(path)
    params = state_dict_to_params(
        state_dict,
        abstract_params(),
        component="inception",
        # batch-norm step counters are buffers, not weights
        rename=lambda key: None if key.endswith("num_batches_tracked") else key,
    )
    return {"params": params}
