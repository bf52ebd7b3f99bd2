"""Datasets: the local image-caption builder, public TFDS datasets (mocked), batching, latents.

Nothing downloads: local fixtures are written here, public datasets go through
`tfds.testing.mock_data`.
"""

import csv
import json
import logging

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from conftest import REPO
from ldm_jax import cli
from ldm_jax import model as model_lib
from ldm_jax.config import load_config
from ldm_jax.data import image_caption
from ldm_jax.data import latents as latents_lib
from ldm_jax.data.pipeline import (
    CIFAR10_CLASSES,
    RecordTable,
    StepIndexedBatches,
    imagenet_class_names,
    load_dataset,
)
from ldm_jax.runs import params_fingerprint
from ldm_jax.train import trainer
from ldm_jax.train.objectives import autoencoder, ldm

CONFIGS = REPO / "configs"
SIZE = 16  # pixels per side of the local collection's examples
# (height, width) of the six good images: square, wide, tall, larger (downscaled), RGBA, gray.
GOOD = {
    "a.png": ((16, 16), "RGB"),
    "b.png": ((16, 24), "RGB"),
    "sub/c.png": ((26, 16), "RGB"),
    "d.png": ((20, 30), "RGB"),
    "sub/e.png": ((16, 16), "RGBA"),
    "f.png": ((16, 20), "L"),
}


def _write_png(path, shape, mode, rng):
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (*shape, channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """A folder of 6 good PNGs + captions, 2 corrupt images, 1 image without a caption; a CSV."""
    root = tmp_path_factory.mktemp("collection")
    rng = np.random.default_rng(0)
    (root / "sub").mkdir()
    for i, (name, (shape, mode)) in enumerate(GOOD.items()):
        _write_png(root / name, shape, mode, rng)
        (root / name).with_suffix(".txt").write_text(f"  caption of image {i}\n")
    (root / "garbage.png").write_bytes(b"this is not an image")
    (root / "garbage.txt").write_text("a broken file")
    _write_png(root / "truncated.png", (16, 16), "RGB", rng)
    (root / "truncated.png").write_bytes((root / "truncated.png").read_bytes()[:100])
    (root / "truncated.txt").write_text("a truncated file")
    _write_png(root / "no_caption.png", (16, 16), "RGB", rng)
    table = root.parent / f"{root.name}_table.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text"])
        for i, name in enumerate(GOOD):
            writer.writerow([f"{root.name}/{name}", f"table caption {i}"])
        writer.writerow([f"{root.name}/missing.png", "a file that does not exist"])
    return root, table


def _config(name="cifar10"):
    """The smoke config of configs/<name>.py (its data section has every field)."""
    return load_config(str(CONFIGS / f"{name}.py") + ":ldm,smoke")


def _expected_image(path):
    """Independent reference: torch's antialiased bilinear resize, then the center crop."""
    import torch

    pixels = np.asarray(Image.open(path).convert("RGB"), np.float32)
    h, w = pixels.shape[:2]
    new = (SIZE, int(SIZE * w / h)) if h <= w else (int(SIZE * h / w), SIZE)
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None]
    if new != (h, w):
        x = torch.nn.functional.interpolate(x, size=new, mode="bilinear", antialias=True)
    x = x[0].permute(1, 2, 0).numpy()
    top, left = round((new[0] - SIZE) / 2), round((new[1] - SIZE) / 2)
    return x[top : top + SIZE, left : left + SIZE]


def test_resize_and_center_crop():
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    # No resize needed: exactly the middle 16 columns.
    np.testing.assert_array_equal(image_caption.resize_and_center_crop(wide, 16), wide[:, 4:20])
    tall = rng.integers(0, 256, (25, 10, 3), dtype=np.uint8)
    assert image_caption.resize_and_center_crop(tall, 8).shape == (8, 8, 3)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        image_caption.resize_and_center_crop(wide[..., :2], 8)


def test_folder_collection_counts_skipped_files(collection, tmp_path, caplog):
    root, _ = collection
    config = _config()
    config.data.update(
        name="image_caption", path=str(root), image_size=SIZE, data_dir=str(tmp_path)
    )
    with caplog.at_level(logging.WARNING, logger="ldm_jax"):
        data = load_dataset(config)
    # Sorted relative paths of the usable files; corrupt and caption-less files are left out.
    names = sorted(GOOD)
    assert list(data["caption"]) == [
        f"caption of image {list(GOOD).index(n)}" for n in names
    ]  # stripped
    assert data["image"].shape == (6, SIZE, SIZE, 3) and data["image"].dtype == np.uint8
    for image, name in zip(data["image"], names):
        # PIL rounds to 8 bits between its two resize passes: within 2 levels of torch.
        diff = np.abs(image.astype(np.float32) - _expected_image(root / name))
        assert diff.max() <= 2.0, (name, diff.max())
    assert "skipped 3 file(s) (2 unreadable images, 1 without a caption)" in caplog.text

    builder = image_caption.make_builder(root, resolution=SIZE, data_dir=tmp_path)
    skipped = builder.info.metadata["skipped"]  # restored from the prepared dataset
    assert (skipped["unreadable"], skipped["no_caption"]) == (2, 1)
    assert sorted(f.split(":")[0] for f in skipped["files"]) == [
        "garbage.png",
        "no_caption.png",
        "truncated.png",
    ]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_table_collection(collection, tmp_path, caplog, suffix):
    root, table = collection
    if suffix == ".parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        with open(table, newline="") as f:
            rows = list(csv.DictReader(f))
        table = tmp_path / "table.parquet"
        pq.write_table(pa.table({k: [r[k] for r in rows] for k in rows[0]}), table)
        (tmp_path / root.name).symlink_to(root)  # the paths are relative to the table
    config = _config()
    config.data.update(
        name="image_caption", path=str(table), image_size=SIZE, data_dir=str(tmp_path / "tfds")
    )
    with caplog.at_level(logging.WARNING, logger="ldm_jax"):
        data = load_dataset(config)
    assert list(data["caption"]) == [f"table caption {i}" for i in range(6)]  # table order
    for image, name in zip(data["image"], GOOD):
        expected = image_caption.read_image(root / name, SIZE)
        np.testing.assert_array_equal(image, expected)
    assert "skipped 1 file(s) (1 unreadable images, 0 without a caption)" in caplog.text


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_caption.make_builder(tmp_path / "nowhere", resolution=8, data_dir=tmp_path)
    table = tmp_path / "t.csv"
    table.write_text("picture,words\nx.png,hello\n")
    builder = image_caption.make_builder(table, resolution=8, data_dir=tmp_path)
    with pytest.raises(ValueError, match="no image-path column"):
        image_caption.prepare(builder)
    config = _config()
    config.data.update(name="image_caption", path="")
    with pytest.raises(ValueError, match="config.data.path is empty"):
        load_dataset(config)
    config.data.name = "mnist"
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset(config)


def test_lazy_and_in_memory_batches_agree_and_split_over_processes(
    collection, tmp_path, monkeypatch
):
    root, _ = collection
    config = _config()
    config.data.update(
        name="image_caption", path=str(root), image_size=SIZE, data_dir=str(tmp_path)
    )
    arrays = load_dataset(config)
    config.data.in_memory = False
    table = load_dataset(config)
    assert isinstance(table, RecordTable)
    lazy = StepIndexedBatches({k: table[k] for k in ("image", "caption")}, 4, seed=3)
    eager = StepIndexedBatches({k: arrays[k] for k in ("image", "caption")}, 4, seed=3)
    seen = set()
    for step in range(5):  # 6 examples, batch 4: one batch per epoch, a new permutation each
        a, b = lazy[step], eager[step]
        np.testing.assert_array_equal(a["image"], b["image"])
        assert list(a["caption"]) == list(b["caption"])
        seen.add(tuple(lazy.indices(step)))
    assert len(seen) > 1  # epochs are reshuffled
    # A rebuilt loader (a resumed run) gives the same batch for the same (seed, step).
    again = StepIndexedBatches({"image": table["image"]}, 4, seed=3)
    np.testing.assert_array_equal(again[3]["image"], eager[3]["image"])
    other_seed = StepIndexedBatches({"image": arrays["image"]}, 4, seed=4)
    assert any(not np.array_equal(other_seed.indices(s), eager.indices(s)) for s in range(5))
    # Two processes each read their contiguous half of the same global batch.
    reference = eager[2]["image"]
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    parts = []
    for index in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        parts.append(StepIndexedBatches({"image": table["image"]}, 4, seed=3)[2]["image"])
    assert parts[0].shape == (2, SIZE, SIZE, 3)
    np.testing.assert_array_equal(np.concatenate(parts), reference)


def _check_batch(config, data, captions_from):
    batches = StepIndexedBatches(
        {"image": data["image"], "caption": data["caption"]}, config.batch_size, config.seed
    )
    batch = batches[1]
    size = config.data.image_size
    assert batch["image"].shape == (config.batch_size, size, size, 3)
    assert batch["image"].dtype == np.uint8
    assert len(batch["caption"]) == config.batch_size
    idx = batches.indices(1)
    assert list(batch["caption"]) == [captions_from(i) for i in idx]


def test_cifar10_smoke_config_mocked():
    config = _config("cifar10")
    with tfds.testing.mock_data(num_examples=40):
        data = load_dataset(config)
    assert data["image"].shape == (40, 32, 32, 3)
    labels = data["label"]
    article = {"airplane": "an", "automobile": "an"}
    _check_batch(
        config,
        data,
        lambda i: (
            f"a photo of {article.get(CIFAR10_CLASSES[labels[i]], 'a')} "
            f"{CIFAR10_CLASSES[labels[i]]}"
        ),
    )


def test_imagenet_smoke_config_mocked(tmp_path):
    config = _config("imagenet")
    assert config.data.in_memory is False
    with tfds.testing.mock_data(num_examples=40):
        with pytest.raises(FileNotFoundError, match="ILSVRC2012_img_train.tar"):
            load_dataset(config)
        for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
            (tmp_path / name).write_bytes(b"")
        config.data.manual_dir = str(tmp_path)
        data = load_dataset(config)
        assert isinstance(data, RecordTable)  # read by index, batch by batch
        labels = np.asarray(data["label"][:])
        names = imagenet_class_names()
        assert names[0] == "tench" and names[281] == "tabby"
        article = lambda name: "an" if name[0] in "aeiou" else "a"
        _check_batch(
            config, data, lambda i: f"a photo of {article(names[labels[i]])} {names[labels[i]]}"
        )


def test_coco_smoke_config_mocked():
    """TFDS's random mock cannot build COCO's caption sequences, so its source is given here."""
    import io

    rng = np.random.default_rng(0)
    examples = []
    for i in range(24):
        buffer = io.BytesIO()
        shape = (int(rng.integers(20, 60)), int(rng.integers(20, 60)), 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buffer, "JPEG")
        texts = np.array([f"first caption {i}".encode(), b"second"], dtype=object)
        examples.append({"image": buffer.getvalue(), "captions": {"text": texts}})
    seen_splits = []

    def as_data_source(self, split, **kwargs):
        seen_splits.append(split)
        return examples

    config = _config("coco")
    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        data = load_dataset(config)
        _check_batch(config, data, lambda i: f"first caption {i}")
        assert load_dataset(config, "test")["image"][:3].shape == (3, 32, 32, 3)
    assert seen_splits == ["train+restval", "val"]


def test_new_configs_keep_shapes_defaults_and_reject_unknown_keys():
    shapes = load_config(str(CONFIGS / "shapes.py") + ":ldm,smoke")
    for name in ("cifar10", "imagenet", "coco"):
        config = load_config(str(CONFIGS / f"{name}.py") + ":autoencoder,smoke")
        assert config.stage == "autoencoder" and config.data.image_size == 32
        assert config.autoencoder.to_dict() == shapes.autoencoder.to_dict()
        with pytest.raises(Exception, match="unknown config key 'data.pth'"):
            load_config(str(CONFIGS / f"{name}.py") + ":smoke", ["data.pth=x"])
        with pytest.raises(ValueError, match="bad argument"):
            load_config(str(CONFIGS / f"{name}.py") + ":ldm,64")


# --- Precomputed latents. ---


@pytest.fixture(scope="module")
def autoencoder_run(tmp_path_factory):
    """(tfds data dir, autoencoder workdir) holding an initialized, untrained smoke VAE.

    Written directly as a checkpoint (as `loop.run` would write it) rather than trained: the
    latents only need to come from one fixed VAE, and a VAE training step costs minutes of
    compilation on a loaded 2-core machine.
    """
    import jax.numpy as jnp

    from ldm_jax.config import save_config
    from ldm_jax.models.builders import build_autoencoder
    from ldm_jax.runs import Checkpointer
    from ldm_jax.train import state as state_lib

    root = tmp_path_factory.mktemp("latents")
    config = load_config(
        str(CONFIGS / "shapes.py") + ":autoencoder,smoke", [f"data.data_dir={root / 'tfds'}"]
    )
    vae = build_autoencoder(config)
    params = jax.jit(vae.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    state = state_lib.init_state({"vae": params}, state_lib.groups_from_config(config, ("vae",)))
    (root / "ae").mkdir()
    save_config(config, root / "ae" / "config.json")
    checkpointer = Checkpointer(root / "ae")
    meta = {"signature": autoencoder.signature(config), "state_layout": state_lib.STATE_LAYOUT}
    checkpointer.save(1, state, meta, force=True)
    checkpointer.close()
    return root / "tfds", root / "ae"


def _ldm_config(data_dir, ae, latents_dir=""):
    config = load_config(
        str(CONFIGS / "shapes.py") + ":ldm,smoke",
        [f"data.data_dir={data_dir}", f"autoencoder_workdir={ae}"],
    )
    config.num_train_steps = config.log_every = config.checkpoint_every = 1
    with config.unlocked():  # shapes' data section has no such field (yet)
        config.data.precomputed_latents_dir = str(latents_dir)
    return config


@pytest.fixture(scope="module")
def encoded(autoencoder_run, tmp_path_factory):
    """The shapes smoke train split encoded through `ldm-jax encode`: (data dir, ae, out)."""
    data_dir, ae = autoencoder_run
    out = tmp_path_factory.mktemp("encoded") / "latents"
    argv = ["encode", "--workdir", str(ae), "--config", str(CONFIGS / "shapes.py") + ":ldm,smoke"]
    assert cli.main([*argv, "--out", str(out), f"--config.data.data_dir={data_dir}"]) == 0
    return data_dir, ae, out


def test_encode_stores_the_trainers_latents_and_tokens(encoded, capsys):
    data_dir, ae, out = encoded
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_examples"] == 512 and meta["latent_shape"] == [16, 16, 4]
    assert not (out / "arrays").exists()  # only the TFDS copy is kept

    # The stored arrays equal encoding the images in the trainer, within float32 round-off.
    config = _ldm_config(data_dir, ae, out)
    vae_params = ldm.load_autoencoder(config)
    stored = latents_lib.load(config, vae_params)
    model = model_lib.from_config(config)
    images = load_dataset(config)
    mean, std = ldm.encode_dataset(model.vae, vae_params, images["image"])
    np.testing.assert_allclose(stored["latent_mean"], mean, rtol=0, atol=1e-5)
    np.testing.assert_allclose(stored["latent_std"], std, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(
        stored["caption_ids"], model.tokenizers[0](list(images["caption"]))
    )
    canonical = model.tokenizers[0](list(images["canonical_caption"]))
    np.testing.assert_array_equal(stored["canonical_ids"], canonical)
    lazy = latents_lib.load(config, vae_params, in_memory=False)
    np.testing.assert_array_equal(lazy["latent_std"][7:9], stored["latent_std"][7:9])

    # Latents of another tokenizer or VAE are refused, naming what differs.
    other = _ldm_config(data_dir, ae, out)
    other.tokenizer.context_length = 32
    with pytest.raises(ValueError, match="another tokenizer"):
        latents_lib.load(other, vae_params)
    changed = jax.tree.map(lambda x: x + 1e-3, vae_params)
    with pytest.raises(ValueError, match="another VAE parameters"):
        latents_lib.load(config, changed)
    argv = ["encode", "--workdir", str(ae), "--config", str(CONFIGS / "shapes.py") + ":smoke"]
    assert cli.main([*argv, "--out", str(out)]) == 2
    assert "already holds encoded latents" in capsys.readouterr().err


@pytest.mark.slow  # two 1-step LDM trainings: ~1.5 min of CPU time, mostly compilation
def test_precomputed_latents_give_the_same_first_step_loss(encoded, tmp_path, monkeypatch):
    data_dir, ae, out = encoded
    # Sampling at the last step is skipped: it is not what is compared, and compiles for long.
    monkeypatch.setattr(
        ldm, "generate", lambda m, prompts, **kw: np.zeros((len(prompts), 32, 32, 3), np.uint8)
    )
    losses = {}
    for name, latents_dir in (("images", ""), ("latents", out)):
        trainer.train_and_evaluate(_ldm_config(data_dir, ae, latents_dir), tmp_path / name)
        (row,) = [
            json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        ]
        losses[name] = row["loss"]
    print("first-step losses", losses)
    assert losses["latents"] == pytest.approx(losses["images"], rel=1e-5), losses
    # An ldm run carries its VAE: `encode --workdir <ldm run>` finds the same parameters.
    _, from_ldm = latents_lib.load_vae(tmp_path / "latents")
    _, from_ae = latents_lib.load_vae(ae)
    assert params_fingerprint(from_ldm) == params_fingerprint(from_ae)
