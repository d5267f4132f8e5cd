"""Train the bundled default model from scratch on procedural data, and save it in diffusers format.

    python -m diffserve.bundled.train --out /tmp/default_model [--device cuda] [--budget-s 480]

Two phases, both on freshly rendered batches (data.render on the training device, so the data is unlimited):
1. the AutoencoderKL, as an autoencoder (MSE + L1 + a small KL term); then the latent mean and standard
   deviation are written into its config as shift_factor / scaling_factor, the way FLUX's VAE has them;
2. the FluxTransformer2DModel together with both text encoders (all three small, so they learn the
   caption words jointly; frozen random encoders would leave the words' meaning to the DiT alone), with
   FLUX's rectified-flow objective: x_t = (1 - t) x0 + t noise, predict noise - x0. The model inputs are
   those FluxPipeline builds at sampling time: its _pack_latents and _prepare_latent_image_ids, timestep
   in [0, 1], prompts padded to max_sequence_length 512 (prompt_ids/encode_text reproduce encode_prompt, which
   tests/unit/test_bundled.py checks). Training times t are logit-normal, then shifted with the same
   resolution-dependent mu that FluxPipeline computes from the scheduler config, so they concentrate where
   the sampler's sigmas lie.

Each phase stops at its step count or its share of --budget-s, whichever comes first; the learning rate
follows the larger of the two fractions, so a phase cut short by time still ends its cosine decay. The DiT
and text encoders are saved from an exponential moving average of their weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from diffserve.bundled import data
from diffserve.bundled.build import DEFAULTS, T5_MAX_LENGTH, build_pipeline, save_pipeline


class Clock:
    """Progress of a phase in [0, 1]: the larger of steps done / steps and seconds spent / seconds allowed."""

    def __init__(self, steps: int, seconds: float):
        self.steps, self.seconds, self.start, self.step = steps, seconds, time.monotonic(), 0

    @property
    def progress(self) -> float:
        return max(self.step / self.steps, (time.monotonic() - self.start) / self.seconds)

    def lr_scale(self, warmup: int) -> float:
        if self.step < warmup:
            return (self.step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(self.progress, 1.0)))


def images_for(examples: list[data.Example], size: int, device) -> torch.Tensor:
    """Pictures in [-1, 1], the VAE's input range (diffusers' VaeImageProcessor convention)."""
    return data.render([e.scene for e in examples], size, device) * 2 - 1


def train_vae(vae, args, device, log) -> None:
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    rng = random.Random(f"vae:{args.seed}")
    clock = Clock(args.vae_steps, args.budget_s * args.vae_share)
    while clock.progress < 1:
        for group in opt.param_groups:
            group["lr"] = args.vae_lr * clock.lr_scale(warmup=100)
        x = images_for(data.draw_examples(rng, args.vae_batch), args.size, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample.float()
        mse = F.mse_loss(recon, x)
        loss = mse + 0.5 * F.l1_loss(recon, x) + args.kl_weight * posterior.kl().float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        clock.step += 1
        if clock.step % args.log_every == 0 or clock.progress >= 1:
            log(
                f"vae step {clock.step} mse {mse.item():.5f} psnr {10 * math.log10(4 / max(mse.item(), 1e-10)):.1f}"
            )
    vae.eval()


@torch.no_grad()
def set_latent_stats(vae, args, device, log) -> None:
    """FLUX convention: DiT latents are (z - shift_factor) * scaling_factor, with unit variance overall."""
    rng = random.Random(f"stats:{args.seed}")
    zs = [
        vae.encode(images_for(data.draw_examples(rng, 64), args.size, device)).latent_dist.mode()
        for _ in range(8)
    ]
    z = torch.cat(zs).float()
    shift, std = z.mean().item(), z.std().item()
    vae.register_to_config(shift_factor=round(shift, 6), scaling_factor=round(1.0 / std, 6))
    log(f"latent shift_factor {shift:.4f} scaling_factor {1 / std:.4f}")


def shifted_times(n: int, mu: float, device) -> torch.Tensor:
    """Logit-normal t (10% uniform, to cover the ends), then FLUX's exponential shift with the sampler's mu."""
    t = torch.sigmoid(torch.randn(n, device=device))
    uniform = torch.rand(n, device=device) < 0.1
    t = torch.where(uniform, torch.rand(n, device=device), t)
    return math.exp(mu) / (math.exp(mu) + (1 / t.clamp(1e-4, 1 - 1e-4) - 1))


def prompt_ids(tokenizer, captions: list[str], max_length: int) -> torch.Tensor:
    """Token ids as FluxPipeline makes them (padding="max_length", truncation, right padding with the pad id),
    computed as "longest" and padded here: padding 512 ids per caption inside the tokenizer cost more than a
    whole DiT training step."""
    ids = tokenizer(captions, padding="longest", return_tensors="pt").input_ids
    if ids.shape[1] > max_length:  # a caption the tokenizer must truncate: let it do so
        return tokenizer(
            captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        ).input_ids
    return F.pad(ids, (0, max_length - ids.shape[1]), value=tokenizer.pad_token_id)


def encode_text(pipe, clip_ids: torch.Tensor, t5_ids: torch.Tensor):
    """What FluxPipeline.encode_prompt computes from the ids: T5's last hidden state, CLIP's pooled output."""
    pooled = pipe.text_encoder(clip_ids, output_hidden_states=False).pooler_output
    embeds = pipe.text_encoder_2(t5_ids, output_hidden_states=False)[0]
    return embeds, pooled


def host_batch(pipe, rng: random.Random, n: int) -> dict[str, torch.Tensor]:
    """Scene parameters and token ids for one step, in pinned CPU memory (built on a helper thread, copied
    to the GPU without stalling it)."""
    examples = data.draw_examples(rng, n)
    captions = [e.caption for e in examples]
    batch = {
        "scenes": data.scene_params([e.scene for e in examples]),
        "clip_ids": prompt_ids(pipe.tokenizer, captions, pipe.tokenizer_max_length),
        "t5_ids": prompt_ids(pipe.tokenizer_2, captions, T5_MAX_LENGTH),
    }
    return {k: v.pin_memory() if torch.cuda.is_available() else v for k, v in batch.items()}


def train_dit(pipe, args, device, log) -> dict[str, torch.nn.Module]:
    """Joint training of DiT + text encoders; returns EMA copies of the three trained modules."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    trained = {
        "transformer": pipe.transformer,
        "text_encoder": pipe.text_encoder,
        "text_encoder_2": pipe.text_encoder_2,
    }
    ema = {name: copy.deepcopy(m).requires_grad_(False) for name, m in trained.items()}
    params = [p for m in trained.values() for p in m.parameters()]
    for m in trained.values():
        m.train()
    # Eager attention in the text encoders while training: T5's trainable relative-position bias, broadcast
    # over the batch, is a fragile case for the fused kernels' backward (the first H100 run died at the first
    # backward pass). Eager costs little at this width; saved configs do not keep this choice.
    for m in (pipe.text_encoder, pipe.text_encoder_2):
        m.set_attn_implementation("eager")
    pipe.vae.requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    rng = random.Random(f"dit:{args.seed}")
    clock = Clock(args.dit_steps, args.budget_s * (1 - args.vae_share))
    vae_cfg = pipe.vae.config
    latent_side = args.size // pipe.vae_scale_factor
    channels = pipe.transformer.config.in_channels // 4
    img_ids = pipe._prepare_latent_image_ids(1, latent_side // 2, latent_side // 2, device, torch.float32)
    sched = pipe.scheduler.config
    mu = calculate_shift(
        (latent_side // 2) ** 2,
        sched.base_image_seq_len,
        sched.max_image_seq_len,
        sched.base_shift,
        sched.max_shift,
    )
    log(f"dit: mu {mu:.4f}, {sum(p.numel() for p in params) / 1e6:.2f}M trained parameters")
    text_ids = torch.zeros(T5_MAX_LENGTH, 3, device=device)  # FluxPipeline's text positions: all zero
    running, last_checkpoint = None, time.monotonic()
    n = args.batch
    # One step ahead on a helper thread: captions, tokenization and scene rows are CPU work the GPU need not
    # wait for (the tokenizers release the GIL).
    prefetch = ThreadPoolExecutor(max_workers=1)
    upcoming = prefetch.submit(host_batch, pipe, rng, n)
    while clock.progress < 1:
        for group in opt.param_groups:
            group["lr"] = args.lr * clock.lr_scale(warmup=200)
        batch = {k: v.to(device, non_blocking=True) for k, v in upcoming.result().items()}
        upcoming = prefetch.submit(host_batch, pipe, rng, n)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            with torch.no_grad():
                pixels = data.render_params(batch["scenes"], args.size) * 2 - 1
                z = pipe.vae.encode(pixels).latent_dist.mode().float()
                x0 = (z - vae_cfg.shift_factor) * vae_cfg.scaling_factor
                x0 = pipe._pack_latents(x0, n, channels, latent_side, latent_side)
            prompt_embeds, pooled = encode_text(pipe, batch["clip_ids"], batch["t5_ids"])
            t = shifted_times(n, mu, device)
            noise = torch.randn_like(x0)
            xt = (1 - t.view(n, 1, 1)) * x0 + t.view(n, 1, 1) * noise
            pred = pipe.transformer(
                hidden_states=xt,
                timestep=t,
                guidance=None,
                pooled_projections=pooled,
                encoder_hidden_states=prompt_embeds,
                txt_ids=text_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]
        loss = F.mse_loss(pred.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        clock.step += 1
        decay = min(args.ema, (1 + clock.step) / (10 + clock.step))
        with torch.no_grad():
            for name, m in trained.items():
                torch._foreach_lerp_(list(ema[name].parameters()), list(m.parameters()), 1 - decay)
        # A running mean kept on the device: reading the loss every step would stall the GPU queue.
        running = loss.detach() if running is None else running.lerp(loss.detach(), 0.02)
        if clock.step % args.log_every == 0 or clock.progress >= 1:
            log(f"dit step {clock.step} loss {running.item():.4f} lr {opt.param_groups[0]['lr']:.2e}")
        if args.checkpoint_s and time.monotonic() - last_checkpoint > args.checkpoint_s:
            last_checkpoint = time.monotonic()
            save(pipe, ema, args, log)
    prefetch.shutdown(wait=True, cancel_futures=True)
    return ema


def save(pipe, ema, args, log) -> Path:
    """Save a copy of the pipeline that holds the EMA weights (the live ones may keep training)."""
    saved = copy.copy(pipe)
    saved.register_modules(**ema)
    out = save_pipeline(saved, args.out)
    if args.tar:
        with tarfile.open(args.tar, "w") as tar:
            tar.add(out, arcname="default_model")
        # Parts of at most 15 MiB, for transports with a per-file limit: `cat NAME.part* > NAME` rejoins them.
        blob = Path(args.tar).read_bytes()
        for i in range(0, len(blob), 15 << 20):
            Path(f"{args.tar}.part{i // (15 << 20)}").write_bytes(blob[i : i + (15 << 20)])
        Path(args.tar).unlink()
    log(f"saved {out}")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for the diffusers-format model")
    p.add_argument("--tar", help="also pack the model directory into this .tar")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--init", help="continue training a saved model (skips the VAE phase, keeps its latent stats)"
    )
    p.add_argument("--size", type=int, default=DEFAULTS["default_width"])
    p.add_argument("--budget-s", type=float, default=480.0, help="wall time for both phases together")
    p.add_argument("--vae-share", type=float, default=0.2, help="fraction of the budget for the VAE")
    p.add_argument("--vae-steps", type=int, default=4000)
    p.add_argument("--vae-batch", type=int, default=64)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-7)
    p.add_argument("--dit-steps", type=int, default=20000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--checkpoint-s", type=float, default=0.0, help="save every N seconds during DiT training")
    p.add_argument("--log-file", help="append the log here too")
    p.add_argument("--sdpa-math", action="store_true", help="only PyTorch's reference attention kernel")
    p.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on CUDA)"
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.amp is None:
        args.amp = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    # cuDNN's fused attention failed in its backward pass on the H100 (torch 2.11: "mha_graph.execute ...
    # is_good()"); flash / memory-efficient attention serve the same calls.
    torch.backends.cuda.enable_cudnn_sdp(False)
    if args.sdpa_math:
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
    started = time.monotonic()

    def log(msg: str) -> None:
        line = f"[{time.monotonic() - started:7.1f}s] {msg}"
        print(line, flush=True)
        if args.log_file:
            with open(args.log_file, "a") as f:
                f.write(line + "\n")

    if args.init:
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(args.init, torch_dtype=torch.float32).to(device)
        args.vae_share = 0.0  # the whole budget goes to the DiT and text encoders
    else:
        pipe = build_pipeline(args.seed).to(device)
    log(
        f"training on {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}): {vars(args)}"
    )
    if not args.init:
        train_vae(pipe.vae, args, device, log)
        set_latent_stats(pipe.vae, args, device, log)
    ema = train_dit(pipe, args, device, log)
    # Provenance next to the weights (diffusers ignores the file): how this model was trained.
    Path(args.out).mkdir(parents=True, exist_ok=True)
    summary = {"seconds": round(time.monotonic() - started, 1), "args": vars(args)}
    Path(args.out, "training.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    save(pipe, ema, args, log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
