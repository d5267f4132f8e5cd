"""Tiny random Qwen-Image and Qwen-Image-Edit pipelines in diffusers format, built offline.

The layout and classes are the real checkpoints' (Qwen/Qwen-Image, Qwen/Qwen-Image-Edit): a Qwen2.5-VL
text encoder (vision tower included, which the edit pipeline feeds the input image), a Qwen2Tokenizer, for
the edit model a Qwen2VLProcessor, AutoencoderKLQwenImage, QwenImageTransformer2DModel and the flow-matching
scheduler with Qwen-Image's shift settings; each a few hundred thousand parameters.

The tokenizer is a byte-level BPE with Qwen2's pre-tokenizer and Qwen2.5-VL's special tokens. Its vocabulary
holds every piece of the two prompt templates as one token (as in the real 151k vocabulary), so the template
prefixes are 34 and 64 tokens long, exactly what diffusers' pipelines drop; other words fall back to one
token per byte (so different prompts give different ids). `ignore_merges` makes a word that is in the
vocabulary one token without shipping merge rules for it.
"""

from __future__ import annotations

import contextlib

import torch

# Qwen2.5-VL's added tokens, in the real tokenizer's order (ids follow the tiny vocabulary here).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# diffusers' templates (QwenImagePipeline, QwenImageEditPipeline); their prefixes are what the pipelines drop.
T2I_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a "
    "new image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
T2I_DROP, EDIT_DROP = 34, 64

# A small processor: images are resized to at most this many pixels before patching (the real one allows
# 12.8 M), so the vision tower sees a few dozen patches.
MAX_PIXELS = 56 * 56 * 4
MIN_PIXELS = 56 * 56


def template_pieces() -> list[str]:
    """Every pre-tokenized piece (byte-level, e.g. 'Ġdetailing') of the two templates, special tokens apart."""
    import re

    from transformers import Qwen2Tokenizer

    from diffserve.testing.tiny_models import _byte_alphabet

    probe = Qwen2Tokenizer(vocab={ch: i for i, ch in enumerate(_byte_alphabet())}, merges=[])
    specials = "|".join(re.escape(t) for t in SPECIAL_TOKENS)
    pieces: list[str] = []
    for template in (T2I_TEMPLATE, EDIT_TEMPLATE):
        for text in re.split(specials, template.replace("{}", "")):
            for piece, _ in probe._tokenizer.pre_tokenizer.pre_tokenize_str(text):
                if piece not in pieces:
                    pieces.append(piece)
    return pieces


def qwen_tokenizer(max_length: int = 32768):
    """A Qwen2Tokenizer (byte-level BPE, Qwen2's pre-tokenizer) over the byte alphabet plus every
    pre-tokenized piece of the two templates, with Qwen2.5-VL's special tokens.

    Merges: each piece is built left to right (its prefix of k characters + the next one), every piece's
    k-th merge ranked before any (k+1)-th, and at each level the pieces with a leading space ('Ġ') first:
    otherwise 'user''s first merge (u, s) would split 'Ġuser' before (Ġ, u) applies. Checked: every piece
    is one token."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    from diffserve.testing.tiny_models import _byte_alphabet

    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    pieces = template_pieces()
    levels: dict[tuple[str, str], tuple[int, int]] = {}
    for piece in pieces:
        for k in range(1, len(piece)):
            levels.setdefault((piece[:k], piece[k]), (k, 0 if piece.startswith("Ġ") else 1))
    merges = sorted(levels, key=levels.__getitem__)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    tok.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True
    )
    split = [p for p in pieces if len(tok._tokenizer.model.tokenize(p)) != 1]
    if split:
        raise AssertionError(f"tiny Qwen tokenizer: template pieces {split} are not single tokens")
    return tok


def _text_encoder(tok, hidden: int = 32):
    """Qwen2_5_VLForConditionalGeneration: 2 decoder layers (GQA, M-RoPE) and a 2-block vision tower with the
    real patching (14-pixel patches, 2x2 merge, 2 temporal) whose output width is the decoder's."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from diffserve.testing.tiny_models import randomize_zero_weights

    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=hidden,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return randomize_zero_weights(Qwen2_5_VLForConditionalGeneration(config).eval())


@contextlib.contextmanager
def processor_without_torchvision():
    """Let transformers 5 build a Qwen2VLProcessor without torchvision installed (the tiny edit model is
    saved with one, and diffusers' QwenImageEditPipeline.from_pretrained builds one): its constructor checks
    every attribute's class, and without torchvision the check of the absent (None) video processor fails
    looking up the video processor registry. The check is skipped for None only. diffserve itself loads
    the image processor alone (loader.load_components) and needs no patch."""
    from transformers.processing_utils import ProcessorMixin

    original = ProcessorMixin.check_argument_for_proper_class

    def check(self, argument_name, argument):
        return None if argument is None else original(self, argument_name, argument)

    ProcessorMixin.check_argument_for_proper_class = check
    try:
        yield
    finally:
        ProcessorMixin.check_argument_for_proper_class = original


def _processor(tok):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor

    image_processor = Qwen2VLImageProcessor(
        patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS
    )
    with processor_without_torchvision():
        processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=None)

    def save_pretrained(save_directory, **kwargs):
        # ProcessorMixin.save_pretrained fails on the absent video processor: save what it would save of
        # the other two (what Qwen2VLProcessor.from_pretrained reads back).
        image_processor.save_pretrained(save_directory)
        tok.save_pretrained(save_directory)

    processor.save_pretrained = save_pretrained  # diffusers' save_pretrained calls the component's
    return processor


def _vae():
    """AutoencoderKLQwenImage (Wan-2.1-style causal 3D VAE, 8x spatial) a few channels wide."""
    from diffusers import AutoencoderKLQwenImage

    from diffserve.testing.tiny_models import randomize_zero_weights

    g = torch.Generator().manual_seed(1)
    vae = AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=(torch.randn(4, generator=g) * 0.2).tolist(),
        latents_std=(1.0 + torch.rand(4, generator=g)).tolist(),
    )
    randomize_zero_weights(vae)
    # At default initialisation a VAE this narrow decodes almost the same picture from any latents (its RMS
    # norms and residuals leave the output to the biases: ~1 level of 255 between two random latents), so a
    # pipeline test would not see the DiT. Weights x1.5: ~55 levels apart, 3% of the pixels clipped.
    with torch.no_grad():
        for p in vae.parameters():
            if p.ndim > 1:
                p.mul_(1.5)
    return vae.eval()


def make_tiny_qwen_pipeline(edit: bool = False):
    """The tiny QwenImagePipeline (edit=False) or QwenImageEditPipeline (seed with torch.manual_seed first)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    from diffserve.testing.tiny_models import randomize_zero_weights

    tok = qwen_tokenizer()
    te = _text_encoder(tok)
    vae = _vae()
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=vae.config.z_dim * 4,  # 2x2-packed latents
        out_channels=vae.config.z_dim,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=te.config.text_config.hidden_size,
        axes_dims_rope=(4, 6, 6),
    )
    # Qwen-Image's scheduler config (exponential time shift, shift_terminal).
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
        invert_sigmas=False,
        stochastic_sampling=False,
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
    )
    parts = dict(
        scheduler=scheduler,
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        transformer=randomize_zero_weights(transformer.eval()),
    )
    if edit:
        return QwenImageEditPipeline(processor=_processor(tok), **parts)
    return QwenImagePipeline(**parts)


def load_processor(folder):
    """The Qwen2VLProcessor saved in `folder` (a pipeline's processor/), built without torchvision: pass it
    to QwenImageEditPipeline.from_pretrained(path, processor=...) where transformers cannot load its video
    processor (torchvision absent), as in diffserve's CI."""
    from transformers import AutoImageProcessor, Qwen2Tokenizer, Qwen2VLProcessor

    with processor_without_torchvision():
        return Qwen2VLProcessor(
            image_processor=AutoImageProcessor.from_pretrained(folder),
            tokenizer=Qwen2Tokenizer.from_pretrained(folder),
            video_processor=None,
        )
