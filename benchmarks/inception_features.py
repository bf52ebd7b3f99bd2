"""FID Inception features per second: ldm_jax against torch-fidelity (PyTorch), same weights.

    python benchmarks/inception_features.py --batch 50 --size 256 --repeats 5

Random weights (the 2015 file cannot be downloaded here; speed does not depend on the values),
He-scaled so that the features are O(1), drawn in JAX and saved as the PyTorch state dict that
torch-fidelity's `FeatureExtractorInceptionV3` loads, so both run the same network; the features
are compared too. uint8 images of --size px are resized to 299 inside both (TF 1.x bilinear).
Also times the Fréchet distance at d = 2048 (the FID of two 2048-d Gaussians, host float64).
Without torch-fidelity installed (`pip install --no-deps torch-fidelity==0.4.0`) only JAX runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
import types

# Runnable as a plain script from a checkout: timing.py beside it, ldm_jax one level up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp
import numpy as np
from timing import interleaved_times, summary, thread_report

from ldm_jax.convert.naming import params_to_state_dict
from ldm_jax.eval import fid
from ldm_jax.models import inception


def random_params(seed: int = 0):
    model = inception.FIDInceptionV3()
    params = model.init(jax.random.key(seed), jnp.zeros((1, 75, 75, 3), jnp.uint8))["params"]
    return jax.tree_util.tree_map_with_path(
        lambda p, v: v * np.sqrt(2.0) if p[-1].key == "kernel" else v, params
    )


def torch_fidelity_extractor(params):
    """torch-fidelity's network with `params`, or None when torch-fidelity is not installed.
    Only its feature-extractor module is imported (its package __init__ needs torchvision)."""
    if "torch_fidelity" not in sys.modules:
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None:
            return None
        stub = types.ModuleType("torch_fidelity")
        stub.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = stub
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    state = {k: torch.from_numpy(np.array(v)) for k, v in params_to_state_dict(params).items()}
    for key in [k for k in state if k.endswith("running_mean")]:
        state[key.replace("running_mean", "num_batches_tracked")] = torch.tensor(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "weights.pth")
        torch.save(state, path)
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--size", type=int, default=256, help="input image side, px")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(thread_report())
    print(f"jax {jax.__version__} on {jax.default_backend()}; batch {args.batch}, {args.size} px")

    params = {"params": random_params()}
    images = np.random.default_rng(0).integers(0, 256, (args.batch, args.size, args.size, 3))
    images = images.astype(np.uint8)
    apply = jax.jit(lambda p, x: inception.FIDInceptionV3().apply(p, x)["pool"])
    start = time.perf_counter()
    jax_features = np.asarray(apply(params, images))
    print(f"ldm_jax compile + first call: {time.perf_counter() - start:.1f} s")
    fns = {"ldm_jax": lambda: apply(params, images).block_until_ready()}

    net = torch_fidelity_extractor(params["params"])
    if net is not None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        net = net.to(device)
        batch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)

        def run_torch():
            with torch.no_grad():
                out = net(batch)[0]
            if device == "cuda":
                torch.cuda.synchronize()
            return out

        torch_features = run_torch().cpu().numpy()
        diff = np.abs(jax_features - torch_features).max()
        print(
            f"features: max |ldm_jax - torch-fidelity| = {diff:.2e} "
            f"(mean |feature| {np.abs(torch_features).mean():.3f})"
        )
        fns["torch-fidelity"] = run_torch
    else:
        print("torch-fidelity not installed: timing ldm_jax only")

    times = interleaved_times(fns, args.repeats)
    for name, seconds in times.items():
        rate = args.batch / float(np.median(seconds))
        print(f"{name:15s} {summary(seconds)}  {rate:7.1f} images/s")
    if "torch-fidelity" in times:
        ratio = np.median(times["ldm_jax"]) / np.median(times["torch-fidelity"])
        print(f"time ratio ldm_jax / torch-fidelity: {ratio:.2f}")

    rng = np.random.default_rng(1)
    stats = []
    for _ in range(2):
        s = fid.FeatureStatistics()
        s.update(
            rng.standard_normal((4096, inception.FEATURE_DIM)) @ rng.uniform(0, 0.1, (2048, 2048))
        )
        stats.append(s)
    start = time.perf_counter()
    value = fid.frechet_distance(stats[0].mu, stats[0].sigma, stats[1].mu, stats[1].sigma)
    print(f"frechet_distance at d=2048: {time.perf_counter() - start:.2f} s (FID {value:.3f})")


if __name__ == "__main__":
    main()
