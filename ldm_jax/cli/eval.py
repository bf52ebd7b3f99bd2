"""`ldm-jax eval ...`: prompt adherence, FID / KID, CLIP score and FID reference statistics.

The commands' functions and their argument parsers; `ldm_jax.cli.main` dispatches to them.
"""

from __future__ import annotations

import json
import os
import pathlib

from ldm_jax.cli import args as args_lib


def _eval_adherence(args, overrides):
    del overrides
    from ldm_jax import model as model_lib
    from ldm_jax import runs as run_io
    from ldm_jax.eval import adherence

    args_lib.check_counts(args, "num_per_prompt", "steps", "batch_size")
    args_lib.check_finite(args, "guidance_scales")
    records = adherence.adherence_prompts(concepts=args.concept)  # names a wrong concept
    args_lib.check_seed(args.seed, len(records) * args.num_per_prompt)
    loras = args_lib.check_lora_files(args)
    from ldm_jax.diffusion.samplers import get_sampler

    get_sampler(args.sampler)  # ValueError listing the valid names
    if args.out:
        run_io.check_output_dir(args.out)
    ldm = model_lib.with_lora(model_lib.load_run(args.workdir), loras)
    out = run_io.output_dir(args.out or pathlib.Path(args.workdir) / "adherence")
    result = adherence.evaluate(
        ldm,
        guidance_scales=args.guidance_scales,
        num_per_prompt=args.num_per_prompt,
        num_steps=args.steps,
        sampler=args.sampler,
        seed=args.seed,
        batch_size=args.batch_size,
        concepts=args.concept,
        out_dir=out,
    )
    print(result["table"])
    print(f"(saved to {out})")


def _inception(args):
    """The FID Inception from --inception-weights or $LDM_JAX_INCEPTION_WEIGHTS."""
    from ldm_jax.eval import fid

    path = args.inception_weights or os.environ.get("LDM_JAX_INCEPTION_WEIGHTS")
    if not path:
        raise ValueError(
            "FID needs the weights of its Inception network: pass --inception-weights FILE "
            "(pytorch-fid's pt_inception-2015-12-05-6726825d.pth, or torch-fidelity's "
            "weights-inception-2015-12-05-6726825d.pth) or set LDM_JAX_INCEPTION_WEIGHTS"
        )
    return fid.InceptionFeatures.from_file(
        path, preprocessing=args.preprocessing, batch_size=args.batch_size
    )


def _eval_fid(args, overrides):
    """FID / KID of a folder of images against reference statistics, or of a model trained
    here, sampled with each --sampler x --steps, against its dataset's split."""
    del overrides
    from ldm_jax.eval import fid

    if bool(args.workdir) == bool(args.images):
        raise ValueError("eval fid takes exactly one of --workdir (a model) or --images (a folder)")
    if args.images and not args.reference:
        raise ValueError("--images needs --reference (statistics from `eval fid-reference`)")
    args_lib.check_inputs(args)
    args_lib.check_counts(args, "steps", "num_images", "batch_size", "kid_subset_size")
    args_lib.check_finite(args, "guidance_scale")
    args_lib.check_seed(args.seed, args.num_images or 1)
    if args.workdir:  # a wrong sampler name or step count fails before anything is loaded
        from ldm_jax.diffusion.samplers import network_evaluations

        for sampler in args.sampler:
            for steps in args.steps:
                if network_evaluations(sampler, steps) is None:
                    raise ValueError(f"{sampler} cannot run {steps} steps")
    reference = fid.load_statistics(args.reference) if args.reference else None
    extractor = _inception(args)
    scorer = None
    if args.clip:
        from ldm_jax.eval.clip_score import ClipScorer

        scorer = ClipScorer.from_folder(args.clip, batch_size=args.batch_size)
    if args.images:
        fid.check_comparable(reference, extractor.metadata, args.reference)
        files = fid.image_files(args.images)[: args.num_images]
        prompts = _manifest_prompts(args.images, files) if scorer else None
        stats, features = fid.feature_statistics(extractor, fid.read_images(files))
        result = fid.scores(stats, features, reference, kid_subset_size=args.kid_subset_size)
        if scorer:
            from ldm_jax.eval.clip_score import summarize

            result.update(summarize(scorer.scores(list(fid.read_images(files)), prompts)))
        print(json.dumps(result, indent=2))
        return
    from ldm_jax import model as model_lib
    from ldm_jax import runs as run_io

    if args.out:
        run_io.check_output_dir(args.out)
    ldm = model_lib.load_run(args.workdir)
    out = run_io.output_dir(args.out or pathlib.Path(args.workdir) / "fid")
    # The prompts are the split's captions; its images are the reference unless --reference.
    made, prompts = fid.dataset_reference(
        ldm.config,
        None if reference else extractor,
        split=args.split,
        num_images=args.num_images,
    )
    reference = reference or made
    runs = [(sampler, steps) for sampler in args.sampler for steps in args.steps]
    result = fid.evaluate_samplers(
        ldm,
        extractor,
        reference,
        prompts,
        runs=runs,
        guidance_scale=args.guidance_scale,
        sampler_options=args_lib.sampler_options(args.sampler_option),
        seed=args.seed,
        batch_size=args.batch_size,
        kid_subset_size=args.kid_subset_size,
        clip_scorer=scorer,
        out_dir=out,
    )
    print(result["table"])
    print(f"(saved to {out})")


def _manifest_prompts(folder, files) -> list[str]:
    """The prompt of each file, from the folder's manifest.json (what `sample` writes)."""
    path = pathlib.Path(folder) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"CLIP score needs the prompts: {path} (written by sample) is missing"
        )
    try:
        by_file = {r["file"]: r["prompt"] for r in json.loads(path.read_text())}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path} is not a sample manifest (records with file and prompt): {e}"
        ) from e
    missing = [f.name for f in files if f.name not in by_file]
    if missing:
        raise ValueError(f"{path} has no prompt for {len(missing)} images, e.g. {missing[:3]}")
    return [by_file[f.name] for f in files]


def _eval_clip_score(args, overrides):
    """CLIP score of a folder of samples against the prompts in its manifest.json."""
    del overrides
    from ldm_jax.eval import fid
    from ldm_jax.eval.clip_score import ClipScorer, summarize

    args_lib.check_inputs(args)
    args_lib.check_counts(args, "num_images", "batch_size")
    files = fid.image_files(args.images)[: args.num_images]
    prompts = _manifest_prompts(args.images, files)
    scorer = ClipScorer.from_folder(args.clip, batch_size=args.batch_size)
    result = {
        "num_images": len(files),
        **summarize(scorer.scores(list(fid.read_images(files)), prompts)),
    }
    print(json.dumps(result, indent=2))


def _eval_fid_reference(args, overrides):
    """Reference statistics (mu, sigma, features) of a folder of images or a config's dataset."""
    from ldm_jax.eval import fid

    out = pathlib.Path(args.out)
    if out.exists():
        raise FileExistsError(f"--out {out} exists; choose a new file")
    if bool(args.images) == bool(args.config):
        raise ValueError("eval fid-reference takes exactly one of --images or --config")
    args_lib.check_inputs(args)
    args_lib.check_counts(args, "num_images", "batch_size")
    extractor = _inception(args)
    if args.images:
        files = fid.image_files(args.images)[: args.num_images]
        stats, features = fid.feature_statistics(extractor, fid.read_images(files))
        metadata = {**extractor.metadata, "images": str(pathlib.Path(args.images).resolve())}
    else:
        from ldm_jax.config import load_config

        config = load_config(args.config, overrides)
        made, _ = fid.dataset_reference(
            config, extractor, split=args.split, num_images=args.num_images
        )
        stats = fid.FeatureStatistics()
        stats.update(made["features"])
        features, metadata = made["features"], made["metadata"]
    fid.save_statistics(out, stats, features=features, metadata=metadata)
    print(f"wrote statistics of {stats.num} images to {out}")


def add_parser(sub) -> None:
    """The `eval` command and its subcommands, on the top-level parser's subparsers."""
    p = sub.add_parser("eval", help="evaluations")
    eval_sub = p.add_subparsers(dest="evaluation", required=True)
    p = eval_sub.add_parser("adherence", help="prompt adherence on the shapes prompt set")
    args_lib.add_sampling_args(p)
    p.add_argument("--guidance-scales", type=float, nargs="+", default=[0.0, 4.0])
    p.add_argument("--num-per-prompt", type=int, default=8)
    p.add_argument(
        "--concept",
        action="append",
        default=[],
        help="prompts with this held-out concept of the data (cross, navy) in place of the "
        "base colours or shapes; repeat to combine (navy cross)",
    )
    args_lib.add_lora_arg(p)
    p.add_argument(
        "--out",
        default="",
        help="folder for the table, JSON and grids (default: WORKDIR/adherence)",
    )
    p.set_defaults(fn=_eval_adherence)

    p = eval_sub.add_parser(
        "fid", help="FID / KID of a model's samples (by sampler and steps) or of an image folder"
    )
    p.add_argument("--workdir", help="an `ldm` training run to sample from")
    p.add_argument("--images", help="a folder of images (e.g. `sample --out`) instead of --workdir")
    p.add_argument(
        "--reference",
        help="statistics from `eval fid-reference` (or pytorch-fid / clean-fid .npz); "
        "default with --workdir: the run's dataset split, computed here",
    )
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument(
        "--num-images",
        type=int,
        help="samples (and reference images; with --images: the first N files); default: all",
    )
    p.add_argument("--sampler", nargs="+", default=["ddim"], help="one or more sampler names")
    p.add_argument("--steps", type=int, nargs="+", default=[25], help="one or more step counts")
    p.add_argument("--sampler-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="folder for table.md, results.json, grids")
    p.add_argument("--clip", help=_CLIP_HELP + "; adds the CLIP score of the samples")
    _add_inception_args(p)
    p.set_defaults(fn=_eval_fid)

    p = eval_sub.add_parser("clip-score", help="CLIP score of a `sample --out` folder")
    p.add_argument("--images", required=True, help="a folder with manifest.json (from sample)")
    p.add_argument("--clip", required=True, help=_CLIP_HELP)
    p.add_argument("--num-images", type=int, help="the first N files (default: all)")
    p.add_argument("--batch-size", type=int, default=64, help="images per compiled batch")
    p.set_defaults(fn=_eval_clip_score)

    p = eval_sub.add_parser(
        "fid-reference", help="FID reference statistics of an image folder or a config's dataset"
    )
    p.add_argument("--images", help="a folder of images")
    p.add_argument("--config", help="configs/<name>.py[:arg]: its dataset (--config.* overrides)")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--num-images", type=int, help="the first N images (default: all)")
    p.add_argument("--out", required=True, help="a new .npz file")
    _add_inception_args(p)
    p.set_defaults(fn=_eval_fid_reference, takes_overrides=True)


_CLIP_HELP = "a transformers CLIPModel folder, e.g. openai/clip-vit-large-patch14 on disk"


def _add_inception_args(p):
    p.add_argument(
        "--inception-weights",
        help="the FID Inception's weights (pt_inception-2015-12-05-6726825d.pth); "
        "default: $LDM_JAX_INCEPTION_WEIGHTS",
    )
    p.add_argument(
        "--preprocessing",
        default="tf1",
        choices=("tf1", "pytorch_fid"),
        help="resize + scaling before the network: TF 1.x (the FID paper's code) or pytorch-fid's",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per compiled batch")
    p.add_argument("--kid-subset-size", type=int, default=1000)
