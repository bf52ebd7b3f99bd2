"""Host memory of loading an SD1.5-size diffusers folder with `ldm_jax.convert.load_pretrained`.

The issue-3 requirement: tensors stream from safetensors, so loading needs little more host memory
than the loaded weights themselves. A random SD1.5-architecture `StableDiffusionPipeline`
(diffusers, torch; U-Net 859.5M, VAE 83.7M, CLIP ViT-L/14 123.1M parameters) is saved once as a
diffusers folder (`--folder`, reused when it exists), then each contender loads it in a fresh
process that samples its own memory every 5 ms:

- `ldm_jax`: `load_pretrained(folder)`, the Flax variables on the default device;
- `numpy`: every safetensors file read whole with `safetensors.numpy.load_file` (the arrays,
  nothing converted): the floor of any loader that holds the whole checkpoint at once.

Reported: the peak of anonymous resident memory (RssAnon: heap and device buffers, what the
process needs; file pages of the memory-mapped safetensors are clean and not counted there) and
of all resident memory (VmHWM, file pages included), each above the process's memory before the
load, against the float32 weights' size.

    python benchmarks/load_memory.py --folder /tmp/sd15_random    # ~4.3 GB on disk
    python benchmarks/load_memory.py --folder /tmp/sd15_fp16 --fp16   # the weights as fp16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def status_kib(field: str) -> int:
    """A /proc/self/status field in KiB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure(contender: str, folder: str) -> dict:
    """Run one contender in this process; its memory figures in bytes."""
    import jax

    jax.devices()  # the backend's own start-up memory is not the loader's
    before_anon, before_rss = status_kib("RssAnon"), status_kib("VmRSS")
    peak = [before_anon]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], status_kib("RssAnon"))
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    if contender == "ldm_jax":
        from ldm_jax.convert import load_pretrained

        model = load_pretrained(folder)
        trees = (model.unet_params, model.vae_params, *model.text_encoder_params)
        jax.block_until_ready(trees)
        loaded = sum(x.nbytes for t in trees for x in jax.tree.leaves(t))
    else:
        from safetensors.numpy import load_file

        arrays = [
            load_file(os.path.join(root, name))
            for root, _, files in os.walk(folder)
            for name in files
            if name.endswith(".safetensors")
        ]
        loaded = sum(a.nbytes for d in arrays for a in d.values())
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    peak[0] = max(peak[0], status_kib("RssAnon"))
    return {
        "seconds": seconds,
        "loaded_bytes": loaded,
        "peak_anon_bytes": (peak[0] - before_anon) * 1024,
        "peak_rss_bytes": (status_kib("VmHWM") - before_rss) * 1024,
        "end_anon_bytes": (status_kib("RssAnon") - before_anon) * 1024,
    }


def build_folder(folder: str, tokenizer: str, fp16: bool) -> None:
    import torch
    from text_to_image import torch_pipeline

    start = time.perf_counter()
    pipe = torch_pipeline("sd15", tokenizer)
    if fp16:
        pipe = pipe.to(torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    print(f"built and saved {folder} in {time.perf_counter() - start:.0f} s", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", required=True, help="the diffusers folder (made if absent)")
    parser.add_argument(
        "--tokenizer",
        default=os.path.join(os.path.dirname(REPO), "shared", "data", "clip_tokenizer"),
        help="CLIP tokenizer files for the folder",
    )
    parser.add_argument("--fp16", action="store_true", help="save the weights as float16")
    parser.add_argument("--contenders", default="ldm_jax,numpy")
    parser.add_argument("--_run", help=argparse.SUPPRESS)  # internal: one contender, JSON out
    args = parser.parse_args(argv)
    if args._run:
        print(json.dumps(measure(args._run, args.folder)))
        return
    if not os.path.exists(os.path.join(args.folder, "model_index.json")):
        build_folder(args.folder, args.tokenizer, args.fp16)
    disk = sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, files in os.walk(args.folder)
        for name in files
        if name.endswith(".safetensors")
    )
    print(f"{args.folder}: safetensors {disk / 2**30:.2f} GiB on disk")
    gib = lambda b: f"{b / 2**30:6.2f} GiB"
    for contender in args.contenders.split(","):
        out = subprocess.run(
            [sys.executable, __file__, "--folder", args.folder, "--_run", contender],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{contender:8s} loaded {gib(r['loaded_bytes'])} in {r['seconds']:5.1f} s; peak "
            f"anonymous {gib(r['peak_anon_bytes'])} ({r['peak_anon_bytes'] / r['loaded_bytes']:.2f}"
            f" x loaded), peak resident {gib(r['peak_rss_bytes'])}, anonymous at the end "
            f"{gib(r['end_anon_bytes'])}",
            flush=True,
        )


if __name__ == "__main__":
    main()
