"""Tiny random models in diffusers format, built offline (no download), for tests and users' own CI.

Each family has the same component layout, classes and config keys as the real checkpoint
(FLUX.1-dev, Wan2.1-T2V, Stable Diffusion 3), only with a few hundred thousand parameters, so that the
very code that loads the real model loads these. Tokenizers are built from in-memory vocabularies:
CLIP as byte-level BPE over a 512-entry alphabet, T5/UMT5 as a character-level WordLevel model.

Every weight is random, including those the model classes initialise to zero (output projections,
AdaLN modulation): a zero weight would make a parity test pass whatever the code under test does with it.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

FAMILIES = ("flux", "flux-schnell", "wan", "wan2.2", "sd3", "qwen-image", "qwen-image-edit")
# Families that take an input image (FLUX.1 Kontext, Wan image-to-video, SD3 img2img): tiny_image_models.py
IMAGE_INPUT_FAMILIES = ("flux-kontext", "wan-i2v", "wan2.2-ti2v", "wan2.2-i2v", "sd3-img2img")

# Byte-level BPE maps every byte to a printable unicode character; this is that standard table.
_BYTE_CHARS = [
    *range(ord("!"), ord("~") + 1),
    *range(ord("¡"), ord("¬") + 1),
    *range(ord("®"), ord("ÿ") + 1),
]


def _byte_alphabet() -> list[str]:
    chars, extra = list(_BYTE_CHARS), 0
    for b in range(256):
        if b not in _BYTE_CHARS:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def clip_tokenizer(max_length: int = 77):
    """A CLIPTokenizer whose BPE has no merges: every byte of a word is a token (with a '</w>' variant)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _byte_alphabet():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer(max_length: int = 512):
    """A T5-style fast tokenizer (pad 0, eos 1, unk 2, '</s>' appended) over single characters, so that
    different prompts give different ids without shipping a sentencepiece model."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for ch in string.printable[:-5]:  # letters, digits, punctuation and the space
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def randomize_zero_weights(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Give every all-zero parameter random values (seeded by the caller's torch.manual_seed)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not p.any():
                p.normal_(0.0, std)
    return model


def _clip_text_encoder(tokenizer, hidden: int = 32, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=hidden,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return randomize_zero_weights(cls(config).eval())


def _t5_encoder(tokenizer, d_model: int = 32, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return randomize_zero_weights(model_cls(config).eval())


def _image_vae(latent_channels: int, shift_factor: float | None, scaling_factor: float):
    """AutoencoderKL with the real 8x downsampling (four blocks) at a width of a few channels."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return randomize_zero_weights(vae.eval())


def _flux(guidance_embeds: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok, tok2 = clip_tokenizer(), t5_tokenizer(512)
    te, te2 = _clip_text_encoder(tok), _t5_encoder(tok2)
    latent_channels = 4
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=latent_channels * 4,  # 2x2 packed latents, as in FLUX (16 * 4 = 64)
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=te2.config.d_model,
        pooled_projection_dim=te.config.hidden_size,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    # FLUX.1-dev's scheduler config; schnell uses a fixed shift instead of resolution-dependent shifting.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0 if not guidance_embeds else 3.0,
        use_dynamic_shifting=guidance_embeds,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=_image_vae(latent_channels, shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=te,
        tokenizer=tok,
        text_encoder_2=te2,
        tokenizer_2=tok2,
        transformer=randomize_zero_weights(transformer.eval()),
    )


def _wan(two_experts: bool = False):
    """Wan2.1-T2V; two_experts: Wan2.2-A14B's layout, a second DiT for the low-noise steps below
    boundary_ratio of the schedule."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    tok = t5_tokenizer(512)
    te = _t5_encoder(tok, umt5=True)
    vae = AutoencoderKLWan(
        base_dim=4,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )

    def dit():
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=16,
            out_channels=16,
            text_dim=te.config.d_model,
            freq_dim=32,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )
        return randomize_zero_weights(model.eval())

    # Wan2.1-T2V-*-Diffusers ship UniPC with flow sigmas and shift 3.0.
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
        num_train_timesteps=1000,
    )
    return WanPipeline(
        tokenizer=tok,
        text_encoder=te,
        vae=randomize_zero_weights(vae.eval()),
        transformer=dit(),
        transformer_2=dit() if two_experts else None,
        boundary_ratio=0.875 if two_experts else None,
        scheduler=scheduler,
    )


def _sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok, tok2, tok3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer(256)
    te, te2 = _clip_text_encoder(tok, 32, True), _clip_text_encoder(tok2, 32, True)
    # SD3 pads the concatenated CLIP states (32 + 32) to the T5 width: the T5 must be at least that wide.
    te3 = _t5_encoder(tok3, d_model=64)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=96,
    )
    return StableDiffusion3Pipeline(
        transformer=randomize_zero_weights(transformer.eval()),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_image_vae(4, shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=te,
        tokenizer=tok,
        text_encoder_2=te2,
        tokenizer_2=tok2,
        text_encoder_3=te3,
        tokenizer_3=tok3,
    )


def _qwen(edit: bool):
    from diffserve.testing.tiny_qwen import make_tiny_qwen_pipeline

    return make_tiny_qwen_pipeline(edit)


def make_tiny_pipeline(family: str, seed: int = 0):
    """The tiny diffusers pipeline object for `family` (see FAMILIES), weights seeded by `seed`."""
    builders = {
        "flux": lambda: _flux(guidance_embeds=True),
        "flux-schnell": lambda: _flux(guidance_embeds=False),
        "wan": _wan,
        "wan2.2": lambda: _wan(two_experts=True),
        "sd3": _sd3,
        # Qwen-Image(-Edit): a tiny Qwen2.5-VL and its tokenizer (diffserve/testing/tiny_qwen.py)
        "qwen-image": lambda: _qwen(edit=False),
        "qwen-image-edit": lambda: _qwen(edit=True),
    }
    if family in IMAGE_INPUT_FAMILIES:
        from diffserve.testing.tiny_image_models import BUILDERS

        builders = BUILDERS
    if family not in builders:
        choices = ", ".join(FAMILIES + IMAGE_INPUT_FAMILIES)
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {choices}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builders[family]()


def make_tiny_model(family: str, path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random `family` model (see FAMILIES; "sd3" is served by the generic path) in
    diffusers format to `path` (model_index.json, safetensors, configs, tokenizers) and return the path."""
    path = Path(path)
    pipe = make_tiny_pipeline(family, seed)
    pipe.save_pretrained(path, safe_serialization=True)
    if family in IMAGE_INPUT_FAMILIES:
        from diffserve.testing.tiny_image_models import finish_saved

        finish_saved(path)
    return path
