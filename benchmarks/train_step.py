"""The demo's two training steps, ldm_jax against the same networks in diffusers + torch AdamW.

One update of each stage of `make demo` (configs/shapes.py): the autoencoder step (encode,
posterior sample, decode, L2 + KL) and the latent-diffusion step (posterior sample, caption
choice and dropout, text encoder, noised latents, U-Net, Min-SNR-weighted MSE), each followed by
global-norm clipping, AdamW and the EMA update. ldm_jax runs the trainers' own jitted step
(`state.jit_update_fn` over `autoencoder.make_loss_fn` / `ldm.make_loss_fn`, as `ldm-jax train`
compiles it). PyTorch runs diffusers' `AutoencoderKL` / `UNet2DConditionModel` and transformers'
`CLIPTextModel` built from the same config, `torch.optim.AdamW` (foreach), clipping and an EMA in
place. Both start from the same random weights (copied into ldm_jax by its converters, and the
outputs compared) and train on the same batch. Prints medians of interleaved timed steps
(timing.py) and the ratio JAX / PyTorch, measured in the same run.

    python benchmarks/train_step.py --repeats 20          # both stages of the demo config
    python benchmarks/train_step.py --stage ldm --override batch_size=64
    python benchmarks/train_step.py --config-arg smoke --repeats 2   # CPU check of the script
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Runnable as a plain script from a checkout: timing.py beside it, ldm_jax one level up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp
import numpy as np
from timing import interleaved_times, summary, thread_report

from ldm_jax import model as model_lib
from ldm_jax import sharding as sharding_lib
from ldm_jax.config import load_config
from ldm_jax.convert.diffusers import convert_state_dict
from ldm_jax.data import shapes
from ldm_jax.models.builders import build_autoencoder, latent_size
from ldm_jax.train import state as state_lib
from ldm_jax.train.objectives import autoencoder as autoencoder_stage
from ldm_jax.train.objectives import ldm as ldm_stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = os.path.join(REPO, "configs", "shapes.py")


# --- The same networks in diffusers / transformers -------------------------------------------


def torch_autoencoder(config):
    from diffusers import AutoencoderKL

    ae = config.autoencoder
    n = len(ae.block_out_channels)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(ae.block_out_channels),
        layers_per_block=ae.layers_per_block,
        latent_channels=ae.latent_channels,
        norm_num_groups=ae.norm_num_groups,
        sample_size=config.data.image_size,
    )


def torch_text_encoder(config, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    te = config.text_encoder
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=te.hidden_size,
            intermediate_size=te.intermediate_size,
            num_hidden_layers=te.num_hidden_layers,
            num_attention_heads=te.num_attention_heads,
            max_position_embeddings=tokenizer.context_length,
            hidden_act=te.hidden_act,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def torch_unet(config):
    from diffusers import UNet2DConditionModel

    u = config.unet
    return UNet2DConditionModel(
        sample_size=latent_size(config),
        in_channels=config.autoencoder.latent_channels,
        out_channels=config.autoencoder.latent_channels,
        down_block_types=tuple(u.down_block_types),
        up_block_types=tuple(u.up_block_types),
        block_out_channels=tuple(u.block_out_channels),
        layers_per_block=u.layers_per_block,
        attention_head_dim=u.attention_head_dim,
        cross_attention_dim=config.text_encoder.hidden_size,
        norm_num_groups=u.norm_num_groups,
    )


def to_jax(component: str, module, torch_module) -> dict:
    state = {k: v.detach().numpy() for k, v in torch_module.state_dict().items()}
    if component == "text_encoder":  # transformers keeps a position_ids buffer; not a weight
        state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    return jax.tree.map(jnp.asarray, convert_state_dict(component, module, state))


# --- One PyTorch update: loss, backward, clip, AdamW, EMA --------------------------------------


def torch_updater(modules, loss_fn, config):
    """() -> loss: one update of `modules`' parameters, as state.make_update_fn does it."""
    import torch

    params = [p for m in modules for p in m.parameters()]
    opt = config.optimizer
    optimizer = torch.optim.AdamW(
        params,
        lr=opt.learning_rate,
        betas=(opt.b1, opt.b2),
        weight_decay=opt.weight_decay,
        foreach=True,
    )
    ema = [p.detach().clone() for p in params]

    def step():
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, opt.grad_clip_norm)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - config.ema_decay)
        return float(loss.detach())

    return step


def min_snr_weight_torch(alpha_bar, gamma):
    """Min-SNR-gamma weight of the epsilon loss (Hang et al. 2023): min(SNR, gamma) / SNR."""
    import torch

    snr = alpha_bar / (1.0 - alpha_bar)
    return torch.clamp(snr, max=gamma) / snr


# --- The two stages ----------------------------------------------------------------------------


def jax_updater(config, loss_fn, init_fn, groups):
    """(mesh, fresh state, {name: jitted update}): the trainer's update step as `ldm-jax train`
    compiles it, and when the config sets `cpu_compiler_options`, also without them."""
    mesh = sharding_lib.mesh_from_config(config)
    rules = sharding_lib.rules_from_config(config)
    shardings = sharding_lib.tree_shardings(jax.eval_shape(init_fn), mesh, rules)
    state = jax.jit(init_fn, out_shardings=shardings)()
    updates = {"ldm_jax": state_lib.jit_update_fn(config, loss_fn, groups, mesh, rules, shardings)}
    if config.get("cpu_compiler_options"):
        with config.unlocked():
            config.cpu_compiler_options = {}
        updates["ldm_jax, XLA defaults"] = state_lib.jit_update_fn(
            config, loss_fn, groups, mesh, rules, shardings
        )
    return mesh, state, updates


def autoencoder_contenders(config, rng, with_torch: bool):
    size, b = config.data.image_size, config.batch_size
    images = rng.integers(0, 256, (b, size, size, 3)).astype(np.uint8)
    model = build_autoencoder(config)
    groups = state_lib.groups_from_config(config, ("vae",))
    variables = None
    torch_step, agreement = None, None
    if with_torch:
        import torch

        torch.manual_seed(config.seed)
        net = torch_autoencoder(config)
        variables = to_jax("vae", model, net)
        x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)

        def torch_loss():
            posterior = net.encode(x).latent_dist
            err = net.decode(posterior.sample()).sample - x
            # ldm_jax's KL is the per-example sum (diffusers' posterior.kl()), averaged.
            return torch.mean(err**2) + config.autoencoder_loss.kl_weight * posterior.kl().mean()

        torch_step = torch_updater([net], torch_loss, config)
        with torch.no_grad():
            want = net.decode(net.encode(x).latent_dist.mode()).sample.numpy().transpose(0, 2, 3, 1)
        xj = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
        have = model.apply(
            variables, model.apply(variables, xj, method=model.encode).mode(), method=model.decode
        )
        agreement = float(np.abs(np.asarray(have) - want).max())
    if variables is None:
        variables = model.init(jax.random.key(config.seed), jnp.zeros((1, size, size, 3)))
    loss_fn = autoencoder_stage.make_loss_fn(model, config.autoencoder_loss)
    mesh, state, updates = jax_updater(
        config, loss_fn, lambda: state_lib.init_state({"vae": variables}, groups), groups
    )
    return mesh, state, updates, {"image": images}, torch_step, agreement


def ldm_contenders(config, rng, with_torch: bool):
    ldm = model_lib.from_config(config)
    tok = ldm.tokenizers[0]
    b, lat, ch = config.batch_size, latent_size(config), config.autoencoder.latent_channels
    examples = [shapes.sample_attributes(rng) for _ in range(b)]
    captions = [shapes.random_caption(a, rng) for a in examples]
    captions += [shapes.canonical_caption(a) for a in examples]
    batch = {
        "latent_mean": rng.normal(size=(b, lat, lat, ch)).astype(np.float32),
        "latent_std": np.full((b, lat, lat, ch), 0.05, np.float32),
        "caption_ids": tok(captions[:b]),
        "canonical_ids": tok(captions[b:]),
    }
    empty_ids = tok([""])[0]
    groups = state_lib.groups_from_config(config, ("unet", "text_encoder"))
    params, torch_step, agreement = None, None, None
    if with_torch:
        import torch

        torch.manual_seed(config.seed)
        text, unet = torch_text_encoder(config, tok), torch_unet(config)
        params = {
            "text_encoder": to_jax("text_encoder", ldm.text_encoders[0], text),
            "unet": to_jax("unet", ldm.unet, unet),
        }
        alphas_cumprod = torch.from_numpy(np.array(ldm.schedule.alphas_cumprod, np.float32))
        mean, std = (
            torch.from_numpy(batch[k]).permute(0, 3, 1, 2) for k in ("latent_mean", "latent_std")
        )
        ids = {
            k: torch.from_numpy(np.asarray(batch[k], np.int64))
            for k in ("caption_ids", "canonical_ids")
        }
        empty = torch.from_numpy(np.asarray(empty_ids, np.int64))[None]

        def torch_loss():
            z = mean + std * torch.randn_like(mean)
            canonical = torch.rand(b, 1) < config.canonical_caption_prob
            chosen = torch.where(canonical, ids["canonical_ids"], ids["caption_ids"])
            chosen = torch.where(torch.rand(b, 1) < config.p_uncond, empty, chosen)
            context = text(chosen).last_hidden_state
            t = torch.randint(0, len(alphas_cumprod), (b,))
            noise = torch.randn_like(z)
            a = alphas_cumprod[t][:, None, None, None]
            pred = unet(a.sqrt() * z + (1 - a).sqrt() * noise, t, context).sample
            mse = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
            return (min_snr_weight_torch(a.flatten(), config.min_snr_gamma) * mse).mean()

        torch_step = torch_updater([text, unet], torch_loss, config)
        x = rng.normal(size=(b, lat, lat, ch)).astype(np.float32)
        t = np.linspace(999, 0, b).astype(np.float32)
        with torch.no_grad():
            ctx = text(ids["caption_ids"]).last_hidden_state
            want = unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), ctx).sample
        ctx_j = ldm.text_encoders[0].apply(params["text_encoder"], batch["caption_ids"])
        have = ldm.unet.apply(params["unet"], x, t, ctx_j.last_hidden_state)
        agreement = float(np.abs(np.asarray(have) - want.numpy().transpose(0, 2, 3, 1)).max())

    def init_fn():
        p = params
        if p is None:
            k_text, k_unet = jax.random.split(jax.random.key(config.seed))
            context = jnp.zeros((1, tok.context_length, config.text_encoder.hidden_size))
            p = {
                "text_encoder": ldm.text_encoders[0].init(
                    k_text, jnp.zeros((1, tok.context_length), jnp.int32)
                ),
                "unet": ldm.unet.init(
                    k_unet, jnp.zeros((1, lat, lat, ch)), jnp.zeros((1,)), context
                ),
            }
        return state_lib.init_state(p, groups, {"latent_scale": jnp.asarray(1.0)})

    loss_fn = ldm_stage.make_loss_fn(ldm, config, empty_ids)
    mesh, state, updates = jax_updater(config, loss_fn, init_fn, groups)
    return mesh, state, updates, batch, torch_step, agreement


def measure(stage: str, args, rng) -> dict:
    spec = f"{SHAPES}:{','.join([stage, *filter(None, [args.config_arg])])}"
    config = load_config(spec, args.override)
    options = dict(config.get("cpu_compiler_options") or {})
    build = autoencoder_contenders if stage == "autoencoder" else ldm_contenders
    mesh, state, updates, batch, torch_step, agreement = build(config, rng, not args.no_torch)
    global_batch = sharding_lib.global_batch(mesh, batch)
    fns, notes = {}, []
    for name, update in updates.items():
        start = time.perf_counter()
        compiled = update.lower(state, global_batch).compile()
        flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
        notes.append(f"{name}: compiled in {time.perf_counter() - start:.1f} s")
        # Each contender updates its own copy of the state (the step donates its input).
        box = {"state": jax.tree.map(jnp.copy, state)}

        def step(compiled=compiled, box=box):
            box["state"], metrics = compiled(box["state"], global_batch)
            return float(metrics["loss"])  # blocks until the step is done

        fns[name] = step
    if torch_step is not None:
        fns["torch"] = torch_step
    times = interleaved_times(fns, args.repeats, warmup=args.warmup)
    print(f"\n== {stage}: batch {config.batch_size}, XLA's count {flops / 1e9:.2f} GFLOP per step")
    print("  " + "; ".join(notes) + (f"; cpu_compiler_options {options}" if options else ""))
    if agreement is not None:
        print(f"  same weights, forward outputs differ by at most {agreement:.2e}")
    for name, seconds in times.items():
        print(f"  {name:22s} {summary(seconds)}  ({1 / np.median(seconds):.2f} steps/s)")
    medians = {name: float(np.median(s)) for name, s in times.items()}
    for name in medians:
        if name != "torch" and "torch" in medians:
            print(f"  ratio {name} / torch (time per step): {medians[name] / medians['torch']:.2f}")
    return medians


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=("autoencoder", "ldm", "both"), default="both")
    parser.add_argument("--config-arg", default="", help="options after the stage, e.g. smoke")
    parser.add_argument(
        "--override", action="append", default=[], metavar="KEY=VALUE", help="a config field"
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed steps of each contender")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each contender")
    parser.add_argument("--no-torch", action="store_true", help="ldm_jax only")
    args = parser.parse_args(argv)
    print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind} x {jax.device_count()}")
    print(thread_report())
    rng = np.random.default_rng(0)
    stages = ("autoencoder", "ldm") if args.stage == "both" else (args.stage,)
    for stage in stages:
        measure(stage, args, rng)


if __name__ == "__main__":
    main()
