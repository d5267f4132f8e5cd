"""The full-size pipelines bench_pipeline.py runs, built on the GPU with random weights: diffusers'
FluxPipeline / WanPipeline (FLUX.1-dev: 12B DiT, CLIP-L, T5-XXL, 16-channel AutoencoderKL; Wan2.1-1.3B:
1.3B DiT, UMT5-XXL, AutoencoderKLWan) and ours on the very same components (our DiT shares the diffusers
DiT's tensors), plus the tiny CPU versions for --tiny. Tokenizers are diffserve.testing's tiny offline
ones: prompt token ids differ from the real tokenizers', sequence lengths do not.
"""

from __future__ import annotations

import torch
from dit_specs import FULL as FULL_DIT  # one place for the full-size DiT configs
from harness import init_weights_, native_twin, on_device

# fmt: off
TEXT_ENCODERS = {
    "clip-l": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu"),
    "t5-xxl": dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                   relative_attention_num_buckets=32, relative_attention_max_distance=128,
                   feed_forward_proj="gated-gelu"),
    "umt5-xxl": dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128,
                     feed_forward_proj="gated-gelu"),
}
FLUX_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
# fmt: on


def keep_fp32_like_diffusers(model: torch.nn.Module) -> None:
    """diffusers' from_pretrained keeps `_keep_in_fp32_modules` in float32 under bf16; do the same here."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, p in model.named_parameters():
        if any(m in name.split(".") for m in keep):
            p.data = p.data.float()


def full_reference(family: str, device: torch.device, dtype: torch.dtype):
    """diffusers' pipeline at full size, random weights, built on the GPU."""
    import diffusers
    import transformers

    from diffserve.testing.tiny_models import clip_tokenizer, t5_tokenizer

    dit_cls = {"flux": diffusers.FluxTransformer2DModel, "wan": diffusers.WanTransformer3DModel}[family]
    dit = on_device(device, dtype, lambda: dit_cls(**FULL_DIT[family]["config"]))
    init_weights_(dit)
    keep_fp32_like_diffusers(dit)
    t5_tok = t5_tokenizer(512)
    t5_cfg = dict(
        TEXT_ENCODERS["t5-xxl" if family == "flux" else "umt5-xxl"],
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    if family == "flux":
        clip_tok = clip_tokenizer(77)
        clip_cfg = transformers.CLIPTextConfig(
            **TEXT_ENCODERS["clip-l"],
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
        )
        return diffusers.FluxPipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
            vae=on_device(device, dtype, lambda: diffusers.AutoencoderKL(**FLUX_VAE)),
            text_encoder=on_device(device, dtype, lambda: transformers.CLIPTextModel(clip_cfg)),
            tokenizer=clip_tok,
            text_encoder_2=on_device(
                device, dtype, lambda: transformers.T5EncoderModel(transformers.T5Config(**t5_cfg))
            ),
            tokenizer_2=t5_tok,
            transformer=dit,
        )
    return diffusers.WanPipeline(
        tokenizer=t5_tok,
        text_encoder=on_device(
            device, dtype, lambda: transformers.UMT5EncoderModel(transformers.UMT5Config(**t5_cfg))
        ),
        vae=on_device(device, dtype, lambda: diffusers.AutoencoderKLWan()),
        transformer=dit,
        scheduler=diffusers.UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        ),
    )


def tiny_reference(family: str, device: torch.device):
    from diffserve.testing import make_tiny_pipeline

    return make_tiny_pipeline(family).to(device)


def ours_from(reference, family: str, device: torch.device):
    """Our pipeline over the reference's components; our native DiT takes the diffusers DiT's tensors and
    fuses its projections, as loader.load_dit does (the fused weights are one more copy of q|k|v and
    FLUX's single-block inputs: ~6 GB for FLUX.1-dev)."""
    from diffserve.runtime.compile import optimize_dit
    from diffserve.runtime.layers.text_attention import apply_to_text_encoder
    from diffserve.runtime.pipelines import pipeline_class

    ref_dit = reference.transformer
    components = {name: c for name, c in reference.components.items() if c is not None}
    components["transformer"] = optimize_dit(native_twin(ref_dit, family), compile=False)
    for name, c in components.items():
        if name.startswith("text_encoder"):
            apply_to_text_encoder(c)  # shared: diffusers' text encoding uses it too (not in the step time)
    config = {k: v for k, v in reference.config.items() if not isinstance(v, (list, tuple))}
    return pipeline_class(family)(components, dict(ref_dit.config), device, config)
