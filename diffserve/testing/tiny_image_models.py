"""Tiny random models of the families that take an input image, in diffusers format (offline), for tests.

Same component layout, classes and config keys as the real checkpoints, loadable by diffusers' own pipelines:

- "flux-kontext": FLUX.1-Kontext-dev (FluxKontextPipeline; FLUX.1-dev's DiT, guidance embedding).
- "wan-i2v": Wan2.1-I2V-14B (WanImageToVideoPipeline): a CLIP vision encoder and its image processor, a DiT
  with 36 input channels (16 noise + 4 mask + 16 first-frame latents) and the image context's own key/value
  projections (image_dim, added_kv_proj_dim).
- "wan2.2-ti2v": Wan2.2-TI2V-5B (WanPipeline with expand_timesteps; WanImageToVideoPipeline loads it too):
  the Wan2.2 VAE (48 latent channels, 2x2 pixel patches, 16x spatial compression), one 48-channel DiT.
- "wan2.2-i2v": Wan2.2-I2V-A14B (WanImageToVideoPipeline): two 36-channel experts split at boundary_ratio
  0.9, no image encoder.
- "sd3-img2img": Stable Diffusion 3 saved as StableDiffusion3Img2ImgPipeline (served by the generic path).

Built by diffserve.testing.tiny_models.make_tiny_model, which dispatches here for these names.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffserve.testing.tiny_models import _flux, _sd3, _t5_encoder, randomize_zero_weights, t5_tokenizer

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # OpenAI CLIP's image normalisation (Wan2.1-I2V's processor)
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _flux_kontext():
    """FLUX.1-Kontext-dev: FLUX.1-dev's components (guidance embedding, dynamic shift) under
    FluxKontextPipeline; no IP-adapter image encoder (null in the real model_index.json too)."""
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline(**_flux(guidance_embeds=True).components)


def _clip_vision(hidden: int = 32, image_size: int = 32):
    """CLIPVisionModelWithProjection (Wan2.1-I2V ships ViT-H/14 at 224; here 32x32 with 8x8 patches) and its
    CLIPImageProcessor (shortest edge resized, centre-cropped, OpenAI normalisation)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=8,
        hidden_act="gelu",
    )
    processor = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=3,  # bicubic, as the real processor
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=_CLIP_MEAN,
        image_std=_CLIP_STD,
        do_convert_rgb=True,
    )
    return randomize_zero_weights(CLIPVisionModelWithProjection(config).eval()), processor


def _wan_dit(in_channels: int, out_channels: int, text_dim: int, image_dim: int | None = None):
    from diffusers import WanTransformer3DModel

    heads, head_dim = 2, 12
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=in_channels,
        out_channels=out_channels,
        text_dim=text_dim,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=image_dim,  # Wan2.1-I2V: the CLIP vision width (1280); None elsewhere
        added_kv_proj_dim=heads * head_dim if image_dim is not None else None,  # = the DiT width (5120)
        rope_max_seq_len=32,
    )
    return randomize_zero_weights(model.eval())


def _wan21_vae():
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(
        base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    return randomize_zero_weights(vae.eval())


def _wan22_vae():
    """The Wan2.2 VAE: 2x2 pixel patches in (12 channels), residual down/up blocks, 48 latent channels with
    their own normalisation, 16x spatial and 4x temporal compression."""
    from diffusers import AutoencoderKLWan

    g = torch.Generator().manual_seed(1)
    vae = AutoencoderKLWan(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=48,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
        latents_mean=[round(v, 4) for v in (torch.randn(48, generator=g) * 0.5).tolist()],
        latents_std=[round(v, 4) for v in (torch.rand(48, generator=g) + 0.5).tolist()],
    )
    return randomize_zero_weights(vae.eval())


def _unipc(flow_shift: float):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=flow_shift,
        num_train_timesteps=1000,
    )


def _wan_i2v():
    """Wan2.1-I2V-14B-480P: the CLIP image embedding as extra cross-attention context (its own k/v
    projections), the masked first-frame latents concatenated on channels (16 + 4 + 16 = 36 in)."""
    from diffusers import WanImageToVideoPipeline

    tok = t5_tokenizer(512)
    te = _t5_encoder(tok, umt5=True)
    image_encoder, image_processor = _clip_vision()
    return WanImageToVideoPipeline(
        tokenizer=tok,
        text_encoder=te,
        vae=_wan21_vae(),
        scheduler=_unipc(3.0),  # 480P; the 720P model ships 5.0
        image_processor=image_processor,
        image_encoder=image_encoder,
        transformer=_wan_dit(36, 16, te.config.d_model, image_dim=image_encoder.config.hidden_size),
    )


def _wan22_ti2v():
    """Wan2.2-TI2V-5B: text- and image-to-video in one 48-channel DiT; the first frame's latents stand in
    for the noise and get timestep 0 per token (expand_timesteps)."""
    from diffusers import WanPipeline

    tok = t5_tokenizer(512)
    te = _t5_encoder(tok, umt5=True)
    return WanPipeline(
        tokenizer=tok,
        text_encoder=te,
        vae=_wan22_vae(),
        scheduler=_unipc(5.0),
        transformer=_wan_dit(48, 48, te.config.d_model),
        expand_timesteps=True,
    )


def _wan22_i2v():
    """Wan2.2-I2V-A14B: two 36-channel experts (high noise above boundary_ratio 0.9 of the schedule, low
    noise below), the Wan2.1 VAE, no image encoder."""
    from diffusers import WanImageToVideoPipeline

    tok = t5_tokenizer(512)
    te = _t5_encoder(tok, umt5=True)
    return WanImageToVideoPipeline(
        tokenizer=tok,
        text_encoder=te,
        vae=_wan21_vae(),
        scheduler=_unipc(5.0),
        transformer=_wan_dit(36, 16, te.config.d_model),
        transformer_2=_wan_dit(36, 16, te.config.d_model),
        boundary_ratio=0.9,
    )


def _sd3_img2img():
    from diffusers import StableDiffusion3Img2ImgPipeline

    return StableDiffusion3Img2ImgPipeline(**_sd3().components)


BUILDERS = {
    "flux-kontext": _flux_kontext,
    "wan-i2v": _wan_i2v,
    "wan2.2-ti2v": _wan22_ti2v,
    "wan2.2-i2v": _wan22_i2v,
    "sd3-img2img": _sd3_img2img,
}


def finish_saved(path: Path) -> None:
    """After save_pretrained: name the image processor's class as the real checkpoints do. transformers 5
    without torchvision builds (and diffusers records) CLIPImageProcessorPil, a name that loads only where
    torchvision is absent; CLIPImageProcessor loads everywhere (as the Pil variant where it must)."""
    index_file = Path(path) / "model_index.json"
    index = json.loads(index_file.read_text())
    if index.get("image_processor") == ["transformers", "CLIPImageProcessorPil"]:
        index["image_processor"] = ["transformers", "CLIPImageProcessor"]
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
