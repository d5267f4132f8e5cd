"""The DiT shapes the benchmarks run: full-size and tiny configs of FLUX.1-dev and Wan2.1-1.3B, their
inputs, and their FLOP counts per forward (the rules are in bench_dit.py's docstring). Shared by
bench_dit.py, bench_pipeline.py and bench_parallel.py, so every figure is of the same model.
"""

from __future__ import annotations

import torch

# fmt: off
FULL = {
    "flux": dict(
        config=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                    guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        shape=dict(height=1024, width=1024, text_tokens=512),
        label="FLUX.1-dev 1024x1024",
    ),
    "wan": dict(
        config=dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                    out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
        shape=dict(height=480, width=832, frames=81, text_tokens=512),
        label="Wan2.1-1.3B 480x832x81",
    ),
}
TINY = {
    "flux": dict(
        config=dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24,
                    guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
        shape=dict(height=128, width=128, text_tokens=16),
        label="tiny FLUX 128x128",
    ),
    "wan": dict(
        config=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                    out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True),
        shape=dict(height=64, width=64, frames=9, text_tokens=16),
        label="tiny Wan 64x64x9",
    ),
}
# fmt: on


# ---------------------------------------------------------------- FLOP counts (see bench_dit.py)


def _lin(tokens: int, fan_in: int, fan_out: int) -> int:
    return 2 * tokens * fan_in * fan_out


def _attn(lq: int, lk: int, head_dim: int, heads: int) -> int:
    return 4 * lq * lk * head_dim * heads


def flux_flops(c: dict, batch: int, n_img: int, n_txt: int) -> int:
    hd, h = c["attention_head_dim"], c["num_attention_heads"]
    d, n = hd * h, n_img + n_txt

    def stream(t: int) -> int:  # q, k, v, out projections and the 4x MLP of one dual-block stream
        return _lin(t, d, 3 * d) + _lin(t, d, d) + _lin(t, d, 4 * d) + _lin(t, 4 * d, d)

    dual = stream(n_img) + stream(n_txt) + _attn(n, n, hd, h) + 2 * _lin(1, d, 6 * d)
    single = (
        _lin(n, d, 3 * d) + _lin(n, d, 4 * d) + _lin(n, 5 * d, d) + _attn(n, n, hd, h) + _lin(1, d, 3 * d)
    )
    mlp_embedders = 2 if c["guidance_embeds"] else 1  # timestep (+ guidance): 256 -> d -> d
    embed = (
        _lin(n_img, c["in_channels"], d)
        + _lin(n_txt, c["joint_attention_dim"], d)
        + mlp_embedders * (_lin(1, 256, d) + _lin(1, d, d))
        + _lin(1, c["pooled_projection_dim"], d)
        + _lin(1, d, d)
    )
    out = _lin(1, d, 2 * d) + _lin(n_img, d, c["patch_size"] ** 2 * c["in_channels"])
    return batch * (c["num_layers"] * dual + c["num_single_layers"] * single + embed + out)


def wan_flops(c: dict, batch: int, n_vid: int, n_txt: int) -> int:
    hd, h, f = c["attention_head_dim"], c["num_attention_heads"], c["ffn_dim"]
    d = hd * h
    patch = c["patch_size"][0] * c["patch_size"][1] * c["patch_size"][2]
    self_attn = _lin(n_vid, d, 3 * d) + _attn(n_vid, n_vid, hd, h) + _lin(n_vid, d, d)
    cross_attn = _lin(n_vid, d, d) + _lin(n_txt, d, 2 * d) + _attn(n_vid, n_txt, hd, h) + _lin(n_vid, d, d)
    block = self_attn + cross_attn + _lin(n_vid, d, f) + _lin(n_vid, f, d)
    embed = (
        _lin(n_vid, c["in_channels"] * patch, d)
        + _lin(n_txt, c["text_dim"], d)
        + _lin(n_txt, d, d)
        + _lin(1, c["freq_dim"], d)
        + _lin(1, d, d)
        + _lin(1, d, 6 * d)
    )
    out = _lin(n_vid, d, c["out_channels"] * patch)
    return batch * (c["num_layers"] * block + embed + out)


# ---------------------------------------------------------------- inputs


def make_inputs(family: str, config: dict, shape: dict, batch: int, device, dtype):
    gen = torch.Generator(device=device).manual_seed(1)
    rand = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=gen)  # noqa: E731
    n_txt = shape["text_tokens"]
    if family == "flux":
        # VAE /8, then 2x2 packing: 1024^2 -> 64x64 tokens of 16*4 = 64 channels.
        h, w = shape["height"] // 16, shape["width"] // 16
        ids = torch.zeros(h, w, 3, device=device)
        ids[..., 1] = torch.arange(h, device=device)[:, None]
        ids[..., 2] = torch.arange(w, device=device)[None, :]
        inputs = dict(
            hidden_states=rand(batch, h * w, config["in_channels"]),
            encoder_hidden_states=rand(batch, n_txt, config["joint_attention_dim"]),
            pooled_projections=rand(batch, config["pooled_projection_dim"]),
            timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
            img_ids=ids.reshape(-1, 3),
            txt_ids=torch.zeros(n_txt, 3, device=device),
            guidance=torch.full((batch,), 3.5, device=device) if config["guidance_embeds"] else None,
        )
        return inputs, h * w, n_txt, flux_flops(config, batch, h * w, n_txt)
    # Wan VAE: 4x temporal (first frame kept), 8x spatial; then the 1x2x2 patch.
    frames = (shape["frames"] - 1) // 4 + 1
    lh, lw = shape["height"] // 8, shape["width"] // 8
    pt, ph, pw = config["patch_size"]
    n_vid = (frames // pt) * (lh // ph) * (lw // pw)
    inputs = dict(
        hidden_states=rand(batch, config["in_channels"], frames, lh, lw),
        timestep=torch.full((batch,), 500.0, device=device),
        encoder_hidden_states=rand(batch, n_txt, config["text_dim"]),
    )
    return inputs, n_vid, n_txt, wan_flops(config, batch, n_vid, n_txt)
