"""The FID Inception-v3 against torch-fidelity's PyTorch port of the same 2015 TensorFlow graph.

torch-fidelity (installed with --no-deps by `make install-test`: its package __init__ imports
torchvision, whose PyPI wheel does not load with the CPU torch here) has its own implementation of
the network and of TensorFlow 1.x's bilinear resize. Only its feature-extractor module is imported,
through a package stub, so nothing of torchvision is needed. The weights are random: the real
file cannot be downloaded here, and random weights with scale-preserving statistics test every
layer, name and layout just the same.
"""

import importlib.util
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.convert.inception import load_inception_params
from ldm_jax.convert.state_dict import CheckpointError
from ldm_jax.models import inception

torch = pytest.importorskip("torch")


def _torch_fidelity_inception_class():
    if "torch_fidelity" not in sys.modules:
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None:
            pytest.fail("torch-fidelity is not installed (make install-test installs it)")
        stub = types.ModuleType("torch_fidelity")  # skip the package __init__ (torchvision)
        stub.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = stub
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(torch-fidelity's network with random weights, the weights saved as a .pth file)."""
    cls = _torch_fidelity_inception_class()
    # Build it without weights (its constructor loads a file or a URL), then draw them: He-normal
    # convs and batch-norm statistics near 1, so activations keep their scale through 94 layers
    # (PyTorch's default init shrinks them ~100x, which would make any tolerance meaningless).
    original = cls.load_state_dict
    cls.load_state_dict = lambda self, state_dict: None
    try:
        import torch_fidelity.feature_extractor_inceptionv3 as module

        fetch = module.load_state_dict_from_url
        module.load_state_dict_from_url = lambda *a, **k: {}
        try:
            net = cls("inception-v3-compat", ["2048", "logits"])
        finally:
            module.load_state_dict_from_url = fetch
    finally:
        cls.load_state_dict = original
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if name.endswith("conv.weight"):
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            elif name.endswith(("bn.weight", "bn.running_var")):
                tensor.copy_(0.6 + 0.8 * torch.rand(tensor.shape, generator=gen))
            elif name.endswith(("bn.bias", "bn.running_mean")):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=gen))
            elif name.startswith("fc."):
                tensor.copy_(0.05 * torch.randn(tensor.shape, generator=gen))
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(net.state_dict(), path)
    return net, path


def _images(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("size", [32, 320])  # upsampled (generated images) and downsampled
def test_features_match_torch_fidelity(reference, size):
    net, path = reference
    images = _images((3, size, size + 8, 3), size)  # non-square: the two axes' scales differ
    with torch.no_grad():
        pool_ref, logits_ref = net(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    params = load_inception_params(path)
    out = jax.jit(inception.FIDInceptionV3().apply)(params, images)
    # Features are O(1) (mean |pool| is printed on failure); 1e-4 absolute is float32 round-off
    # over 94 layers with differently ordered convolution sums.
    scale = float(pool_ref.abs().mean())
    assert scale > 0.05, scale
    np.testing.assert_allclose(out["pool"], pool_ref.numpy(), atol=1e-4 * max(1.0, scale), rtol=0)
    np.testing.assert_allclose(out["logits"], logits_ref.numpy(), atol=1e-4, rtol=0)


def test_tf1_resize_matches_torch_fidelity():
    """The TF 1.x resize alone, exactly (same float32 arithmetic, same order of lerps)."""
    _torch_fidelity_inception_class()
    from torch_fidelity.interpolate_compat_tensorflow import (
        interpolate_bilinear_2d_like_tensorflow1x,
    )

    x = _images((2, 37, 23, 3), 1).astype(np.float32)
    want = interpolate_bilinear_2d_like_tensorflow1x(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), align_corners=False
    )
    got = inception.resize_tf1(jnp.asarray(x), 299)
    np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", [32, 400])
def test_pytorch_fid_preprocessing_matches_torch_interpolate(size):
    """pytorch-fid: F.interpolate(bilinear, align_corners=False) of x / 255, then 2x - 1."""
    x = _images((2, size, size, 3), 2)
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    want = 2 * torch.nn.functional.interpolate(t, (299, 299), mode="bilinear", align_corners=False)
    got = inception.preprocess(jnp.asarray(x), "pytorch_fid")
    np.testing.assert_allclose(got, (want - 1).permute(0, 2, 3, 1).numpy(), atol=1e-5, rtol=0)


def test_unknown_preprocessing_is_refused():
    with pytest.raises(ValueError, match="pytorch_fid"):
        inception.preprocess(jnp.zeros((1, 8, 8, 3), jnp.uint8), "bicubic")


def test_wrong_weights_are_named(reference, tmp_path):
    _, path = reference
    state = torch.load(path, weights_only=True)
    state["Mixed_6b.branch1x1.conv.weight"] = state["Mixed_6b.branch1x1.conv.weight"][:10]
    del state["fc.bias"]
    state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(CheckpointError) as info:
        load_inception_params(bad)
    message = str(info.value)
    assert "fc.bias" in message and "AuxLogits.fc.weight" in message
    del state["AuxLogits.fc.weight"]
    state["fc.bias"] = torch.zeros(1008)
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match=r"Mixed_6b.branch1x1.conv.weight: checkpoint \(10,"):
        load_inception_params(bad)
