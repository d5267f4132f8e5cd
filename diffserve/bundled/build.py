"""Build the untrained bundled model: the FLUX component set at a size that samples in seconds on a CPU.

Components and classes are those of FLUX.1 (FluxTransformer2DModel, AutoencoderKL, CLIPTextModel +
CLIPTokenizer, T5EncoderModel + a T5-style fast tokenizer, FlowMatchEulerDiscreteScheduler), so the code that
loads FLUX.1 loads this. Differences from FLUX.1-dev, and why:
- no guidance embedding (like schnell): FluxPipeline does not use CFG by default, the model is trained to
  follow the prompt without it, and a guidance embedding would need a CFG teacher to distil from;
- tokenizers cover the captions' words (data.vocabulary()), one token per word, built offline;
- the VAE downsamples 8x like FLUX's but with 8 latent channels (FLUX: 16) and narrow blocks.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from diffserve.bundled.data import vocabulary

# Sizes: the DiT dominates the CPU time (about 0.08 s a step on 2 cores with 512 text tokens + 64 image tokens).
DIT = dict(
    num_layers=2,
    num_single_layers=4,
    num_attention_heads=6,
    attention_head_dim=32,
    axes_dims_rope=(8, 12, 12),
)
VAE_CHANNELS = (32, 32, 64, 64)
LATENT_CHANNELS = 8
TEXT_WIDTH = 64
CLIP_MAX_LENGTH = 77  # CLIP's own context length, as in FLUX
T5_MAX_LENGTH = 512  # FluxPipeline's default max_sequence_length: training pads to the same length

# What the runtime uses when a request gives no size/steps (diffserve.json next to model_index.json).
DEFAULTS = {"default_width": 128, "default_height": 128, "default_steps": 20, "default_guidance": 1.0}


def _clip_pieces(words: list[str]) -> list[str]:
    """The words as CLIP's pre-tokenizer splits them (letters runs, digits, punctuation runs)."""
    from transformers import CLIPTokenizer

    pre = CLIPTokenizer()._tokenizer.pre_tokenizer
    return sorted({piece for word in words for piece, _ in pre.pre_tokenize_str(word)})


def clip_tokenizer(words: list[str]):
    """A CLIPTokenizer whose byte-level BPE spells every caption word as one token; unknown words fall back to
    single bytes, which are all in the vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,  # more than enough: merging stops once every word is one token
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(_clip_pieces(words), trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    for ch in sorted(alphabet):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer(words: list[str]):
    """A T5-style fast tokenizer (pad 0, eos 1, unk 2, '</s>' appended), one id per lower-cased word."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in words:
        for piece, _ in pre.pre_tokenize_str(word.lower()):
            vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=T5_MAX_LENGTH,
    )


def build_pipeline(seed: int = 0):
    """A FluxPipeline with random weights, the model to be trained."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    words = vocabulary()
    tok, tok2 = clip_tokenizer(words), t5_tokenizer(words)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=TEXT_WIDTH,
            intermediate_size=2 * TEXT_WIDTH,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CLIP_MAX_LENGTH,
            projection_dim=TEXT_WIDTH,
            hidden_act="quick_gelu",
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,  # pooled output is read at the first end-of-text token
            pad_token_id=tok.pad_token_id,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(tok2),
            d_model=TEXT_WIDTH,
            d_kv=16,
            d_ff=2 * TEXT_WIDTH,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
        block_out_channels=VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=DEFAULTS["default_width"],
        scaling_factor=1.0,  # set from the trained encoder's latent statistics
        shift_factor=0.0,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,  # 2x2 packed latents, as in FLUX
        joint_attention_dim=TEXT_WIDTH,
        pooled_projection_dim=TEXT_WIDTH,
        guidance_embeds=False,
        **DIT,
    )
    # FLUX.1-dev's scheduler: sigmas shifted by the image's token count (mu from 256..4096 tokens).
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=tok,
        text_encoder_2=t5,
        tokenizer_2=tok2,
        transformer=transformer,
    )


def save_pipeline(pipe, path: str | Path) -> Path:
    """save_pretrained with the DiT and VAE in fp16 (size) and the text encoders in fp32: diffusers upcasts
    its models to fp32 when loaded without a dtype, transformers keeps the stored dtype, and the pipeline needs
    all of them in one dtype. The fp16 copies are made aside, so `pipe` keeps its fp32 weights. Also writes
    vocab.json/merges.txt (transformers 4's slow CLIPTokenizer needs them) and diffserve.json (the runtime's
    defaults for this model)."""
    import torch

    path = Path(path)
    saved = copy.copy(pipe)
    saved.register_modules(
        transformer=copy.deepcopy(pipe.transformer).to(torch.float16),
        vae=copy.deepcopy(pipe.vae).to(torch.float16),
    )
    saved.save_pretrained(path, safe_serialization=True)
    tok = pipe.tokenizer
    (path / "tokenizer" / "vocab.json").write_text(
        json.dumps(tok.get_vocab(), ensure_ascii=False, sort_keys=True)
    )
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    lines = [m if isinstance(m, str) else " ".join(m) for m in merges]
    (path / "tokenizer" / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8"
    )
    (path / "diffserve.json").write_text(json.dumps(DEFAULTS, indent=2) + "\n")
    portable_tokenizer_class(path)
    return path


def portable_tokenizer_class(path: str | Path) -> None:
    """transformers 5 saves a PreTrainedTokenizerFast under its new name, TokenizersBackend, which
    transformers 4 lacks; write the name both versions know."""
    path = Path(path)
    index_file = path / "model_index.json"
    index = json.loads(index_file.read_text())
    index["tokenizer_2"] = ["transformers", "PreTrainedTokenizerFast"]
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config_file = path / "tokenizer_2" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
