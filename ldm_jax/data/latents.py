"""Precomputed latents: a dataset's images encoded once by a frozen VAE, read by a trainer.

  ldm-jax encode --workdir runs/shapes/autoencoder --config configs/shapes.py:ldm --out DIR
  ldm-jax train --config configs/shapes.py:ldm --workdir runs/shapes/ldm \
      --config.autoencoder_workdir=runs/shapes/autoencoder --config.data.precomputed_latents_dir=DIR

`encode` writes, for every example of the split, the VAE posterior's mean and std
(float32[h, w, c] each: the ldm stage samples z ~ N(mean, std^2) at every step, Sec. 3 of Rombach
et al. 2022, as `ldm.encode_dataset` does in memory) and the captions' token ids (int32[context]).
Token ids rather than text embeddings: the ldm stage trains its text encoder jointly with the U-Net
(as LDM's text-to-image model did), so embeddings computed now would be stale after one step. A
frozen text encoder (fine-tuning a pretrained model) could store embeddings instead; not done here.
The finetune stage writes its own columns through the same writer (`ldm_jax.train.objectives.finetune`:
the checkpoint's VAE, flipped images too, captions as text).

The arrays are written as .npy files (memory-mapped, so the encoder streams over the dataset),
then turned into a TFDS dataset by the `PrecomputedLatents` builder (array_record, random access)
in `DIR/tfds`; `DIR/meta.json` records what produced them (VAE fingerprint, tokenizer, dataset),
and `load` refuses latents from another VAE or tokenizer than the config's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("ldm_jax")

VERSION = "1.0.0"
# The latent scale (1/std of sampled latents, LDM Sec. 4.3.2) is estimated from at most this many
# examples in stored order: all of them for the shapes data (24,000), a bounded read for ImageNet.
MAX_SCALE_EXAMPLES = 65_536


def latent_scale(latent_mean, latent_std, seed: int, max_examples: int = MAX_SCALE_EXAMPLES):
    """1 / std of z ~ N(mean, std^2) over the first examples: float32 scalar.

    latent_mean, latent_std: float32[N, h, w, c] (numpy arrays or lazy columns).
    The noise is `default_rng(seed).standard_normal`, so the value is a function of the data and
    the seed alone (the same with images encoded in the trainer or read from `encode`'s output).
    """
    n = min(len(latent_mean), max_examples)
    mean, std = np.asarray(latent_mean[:n]), np.asarray(latent_std[:n])
    latents = mean + std * np.random.default_rng(seed).standard_normal(mean.shape)
    return np.float32(1.0 / latents.std())


def load_vae(workdir: str | os.PathLike):
    """(run config, VAE params) of an `autoencoder` run (EMA weights) or an `ldm` run (its VAE)."""
    from ldm_jax.runs import averaged_params, open_run

    run_config, state, _ = open_run(workdir, ("autoencoder", "ldm"), what="encoding")
    if run_config.stage == "autoencoder":
        return run_config, averaged_params(state)["vae"]
    return run_config, state["frozen"]["vae"]


def encode(
    config,
    workdir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split: str = "train",
    batch_size: int = 256,
    keep_arrays: bool = False,
) -> dict:
    """Encodes `config`'s dataset split with the VAE of run `workdir` into `out_dir`; its meta.

    The VAE must match `config.autoencoder` and `config.data.image_size`. Captions are tokenized
    with `config.tokenizer`; datasets without a second caption store `canonical_ids` =
    `caption_ids`. Returns the meta dict also written to `out_dir/meta.json`.
    """
    from ldm_jax.data.pipeline import load_dataset
    from ldm_jax.data.tokenizers import tokenizer_from_config
    from ldm_jax.models.builders import autoencoder_signature, build_autoencoder
    from ldm_jax.runs import as_json, params_fingerprint

    out_dir = check_new_output(out_dir)
    run_config, vae_params = load_vae(workdir)
    want, have = autoencoder_signature(config), autoencoder_signature(run_config)
    if as_json(want) != as_json(have):
        raise ValueError(f"the VAE in {workdir} ({have}) does not match this config ({want})")
    tokenizer = tokenizer_from_config(config.tokenizer)
    data = load_dataset(config, split)
    images = data["image"]
    n = len(images)
    vae = build_autoencoder(config)
    # The same function as `ldm.encode_dataset`: pixels in [-1, 1] -> posterior (mean, std).
    encode_fn = jax.jit(
        lambda p, x: vae.apply(p, x.astype(jnp.float32) / 127.5 - 1.0, method=vae.encode)
    )
    size, ch = config.data.image_size, config.autoencoder.latent_channels
    lat = jax.eval_shape(encode_fn, vae_params, jax.ShapeDtypeStruct((1, size, size, 3), jnp.uint8))
    latent_shape = tuple(lat.mean.shape[1:])
    length = tokenizer.context_length
    columns = {
        "latent_mean": (latent_shape, "float32"),
        "latent_std": (latent_shape, "float32"),
        "caption_ids": ((length,), "int32"),
        "canonical_ids": ((length,), "int32"),
    }
    arrays_dir = out_dir / "arrays"
    out = open_arrays(arrays_dir, n, columns)
    canonical = data.get("canonical_caption", data["caption"])
    for start, stop, batch in padded_batches(images, batch_size):
        posterior = encode_fn(vae_params, batch)
        out["latent_mean"][start:stop] = np.asarray(posterior.mean)[: stop - start]
        out["latent_std"][start:stop] = np.asarray(posterior.std)[: stop - start]
        out["caption_ids"][start:stop] = tokenizer(list(data["caption"][start:stop]))
        out["canonical_ids"][start:stop] = tokenizer(list(canonical[start:stop]))
        log.info("encoded %d / %d examples", stop, n)
    meta = {
        "stage": "ldm",
        "num_examples": n,
        "split": split,
        "latent_shape": list(latent_shape),
        "latent_channels": ch,
        "context_length": length,
        "dataset": {
            k: v for k, v in config.data.to_dict().items() if k != "precomputed_latents_dir"
        },
        "autoencoder_signature": as_json(want),
        "tokenizer": config.tokenizer.to_dict(),
        "vae_fingerprint": params_fingerprint(vae_params),
        "vae_workdir": os.fspath(pathlib.Path(workdir).absolute()),
        "text": "caption token ids (the ldm stage trains its text encoder; no embeddings stored)",
    }
    finish(out_dir, meta, out, keep_arrays=keep_arrays)
    log.info("wrote %d precomputed latents %s to %s", n, latent_shape, out_dir)
    return meta


def check_new_output(out_dir) -> pathlib.Path:
    """`out_dir` as a Path, if it is empty or absent; else an error (nothing there is touched:
    TFDS would take a dataset left by an earlier, interrupted encode as already prepared)."""
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file, not a folder; choose another --out")
    if (out_dir / "meta.json").exists():
        raise FileExistsError(f"{out_dir} already holds encoded latents; choose another --out")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(
            f"{out_dir} is not empty but holds no meta.json (an encode that did not finish?); "
            "remove it or choose another --out"
        )
    return out_dir


def padded_batches(images, batch_size: int):
    """(start, stop, uint8[batch_size, H, W, 3]) over `images` in order; the last batch is padded
    with copies of its last image (one compiled shape), rows from stop - start on are padding."""
    n = len(images)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        batch = np.asarray(images[start:stop])
        if len(batch) < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - len(batch), axis=0)])
        yield start, stop, batch


def open_arrays(arrays_dir: pathlib.Path, n: int, columns: dict) -> dict:
    """Writable arrays of `n` rows for `columns` {name: (shape, dtype)}: memory-mapped .npy files
    in `arrays_dir` for numbers, a list (kept in memory, written by `finish`) for "string"."""
    arrays_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for key, (shape, dtype) in columns.items():
        if dtype == "string":
            out[key] = [""] * n
        else:
            out[key] = np.lib.format.open_memmap(
                arrays_dir / f"{key}.npy", mode="w+", dtype=np.dtype(dtype), shape=(n, *shape)
            )
    return out


def finish(out_dir: pathlib.Path, meta: dict, arrays: dict, *, keep_arrays: bool = False):
    """Turns the filled `open_arrays` of `out_dir/arrays` into the TFDS dataset of `out_dir`, then
    writes `out_dir/meta.json` (last: its presence means the latents are complete). `meta` gets
    the column spec under "columns"."""
    arrays_dir = out_dir / "arrays"
    columns = {}
    for key, values in arrays.items():
        if isinstance(values, list):
            (arrays_dir / f"{key}.json").write_text(json.dumps(values))
            columns[key] = {"shape": [], "dtype": "string"}
        else:
            values.flush()
            columns[key] = {"shape": list(values.shape[1:]), "dtype": str(values.dtype)}
    meta["columns"] = columns
    builder = make_builder(out_dir, meta, arrays_dir)
    builder.download_and_prepare(file_format="array_record")
    if not keep_arrays:
        shutil.rmtree(arrays_dir)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def column_spec(meta: dict) -> dict:
    """{name: {"shape", "dtype"}} of the stored columns (meta.json before "columns" existed held
    the ldm stage's four)."""
    if "columns" in meta:
        return meta["columns"]
    shape, length = list(meta["latent_shape"]), [meta["context_length"]]
    return {
        "latent_mean": {"shape": shape, "dtype": "float32"},
        "latent_std": {"shape": shape, "dtype": "float32"},
        "caption_ids": {"shape": length, "dtype": "int32"},
        "canonical_ids": {"shape": length, "dtype": "int32"},
    }


def make_builder(out_dir: pathlib.Path, meta: dict, arrays_dir: pathlib.Path | None = None):
    """The `PrecomputedLatents` TFDS builder of `out_dir` (its data in `out_dir/tfds`)."""
    import tensorflow_datasets as tfds

    @dataclasses.dataclass
    class LatentsConfig(tfds.core.BuilderConfig):
        columns: tuple = ()  # ((name, shape, dtype), ...)
        arrays_dir: str = ""
        split: str = "train"

    def feature(shape, dtype):
        if dtype == "string":
            return tfds.features.Text()
        return tfds.features.Tensor(shape=tuple(shape), dtype=np.dtype(dtype))

    # Defined per call (its features are the meta's): kept out of TFDS's registry of names.
    class PrecomputedLatents(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """VAE posteriors and captions (token ids or text), written by `ldm_jax.data.latents`."""

        VERSION = tfds.core.Version(VERSION)

        def _info(self):
            return self.dataset_info_from_configs(
                description=__doc__,
                features=tfds.features.FeaturesDict(
                    {
                        name: feature(shape, dtype)
                        for name, shape, dtype in self.builder_config.columns
                    }
                ),
                disable_shuffling=True,  # the dataset's own order: example i is image i
                metadata=tfds.core.MetadataDict(meta),
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {self.builder_config.split: self._generate_examples()}

        def _generate_examples(self):
            root = pathlib.Path(self.builder_config.arrays_dir)
            arrays = {}
            for name, _, dtype in self.builder_config.columns:
                if dtype == "string":
                    arrays[name] = json.loads((root / f"{name}.json").read_text())
                else:
                    arrays[name] = np.load(root / f"{name}.npy", mmap_mode="r")
            for i in range(meta["num_examples"]):  # strings as they are, arrays row by row
                yield (
                    i,
                    {
                        k: v[i] if isinstance(v, list) else np.asarray(v[i])
                        for k, v in arrays.items()
                    },
                )

    config = LatentsConfig(
        name="default",
        columns=tuple((k, tuple(c["shape"]), c["dtype"]) for k, c in column_spec(meta).items()),
        arrays_dir=os.fspath(arrays_dir or ""),
        split=meta["split"],
    )
    logging.getLogger("absl").setLevel(logging.ERROR)  # "Using custom data configuration"
    return PrecomputedLatents(config=config, data_dir=os.fspath(out_dir / "tfds"))


def open_table(out_dir: str | os.PathLike, encode_hint: str):
    """(meta, RecordTable of the stored columns) of the latents in `out_dir`; strings decoded.

    encode_hint: the command that writes them, for the error when there are none."""
    import tensorflow_datasets as tfds

    from ldm_jax.data.pipeline import RecordTable

    out_dir = pathlib.Path(os.path.expanduser(out_dir))
    if not (out_dir / "meta.json").exists():
        raise FileNotFoundError(
            f"no precomputed latents in {out_dir} (meta.json missing): write them with "
            f"`{encode_hint} --out {out_dir}`"
        )
    meta = json.loads((out_dir / "meta.json").read_text())
    builder = tfds.builder_from_directory(
        os.fspath(out_dir / "tfds" / "precomputed_latents" / "default" / VERSION)
    )
    source = builder.as_data_source(meta["split"])
    spec = column_spec(meta)

    def convert(example, columns):
        return {
            c: example[c].decode("utf-8") if spec[c]["dtype"] == "string" else example[c]
            for c in columns
        }

    return meta, RecordTable(source, convert, tuple(spec))


def load(config, vae_params, *, in_memory: bool | None = None):
    """The latents in `config.data.precomputed_latents_dir`, checked against config and VAE.

    Returns {column: float32[N, h, w, c] / int32[N, context]} in memory, or (in_memory False) a
    `RecordTable` whose columns are read on demand by example index.
    """
    from ldm_jax.models.builders import autoencoder_signature
    from ldm_jax.runs import as_json, params_fingerprint

    meta, table = open_table(
        config.data.precomputed_latents_dir,
        "ldm-jax encode --workdir <autoencoder run> --config <config>",
    )
    if meta.get("stage", "ldm") != "ldm":
        raise ValueError(
            f"the latents in {config.data.precomputed_latents_dir} were written for the "
            f"{meta['stage']} stage; encode again with the ldm config"
        )
    checks = {
        "autoencoder": (
            meta["autoencoder_signature"],
            as_json(autoencoder_signature(config)),
        ),
        "tokenizer": (meta["tokenizer"], config.tokenizer.to_dict()),
        "VAE parameters": (meta["vae_fingerprint"], params_fingerprint(vae_params)),
    }
    for what, (stored, wanted) in checks.items():
        if as_json(stored) != as_json(wanted):
            raise ValueError(
                f"the latents in {config.data.precomputed_latents_dir} were made with another "
                f"{what} ({stored}) than this run's ({wanted}); encode again with the config's "
                "autoencoder_workdir"
            )
    in_memory = config.data.get("in_memory", True) if in_memory is None else in_memory
    return table.to_numpy(chunk=4096) if in_memory else table
