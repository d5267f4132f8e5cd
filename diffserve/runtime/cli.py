"""`diffserve generate`: one image or video from the command line, no server.

    diffserve generate --model black-forest-labs/FLUX.1-dev --prompt "a red fox" -o fox.png
    diffserve generate --model ./Wan2.1-T2V-1.3B-Diffusers --prompt "waves" --frames 33 -o waves.mp4

Anything the user can fix (bad model directory, unsupported size, wrong file extension) ends with one line
on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from diffserve.runtime.distributed.config import add_parallel_arguments


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().replace("*", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size must look like WIDTHxHEIGHT (e.g. 1024x768), got {text!r}"
        ) from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return w, h


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="diffusers model directory or Hugging Face id in the local cache "
        "(default: the bundled small FLUX-architecture model)",
    )
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt")
    parser.add_argument("--size", type=parse_size, metavar="WxH", help="output size (default: the model's)")
    parser.add_argument("--frames", type=int, metavar="N", help="video frames (video models)")
    parser.add_argument("--steps", type=int, metavar="N", help="denoising steps (default: the model's)")
    parser.add_argument("--guidance", type=float, metavar="G", help="guidance scale (default: the model's)")
    parser.add_argument("--seed", type=int, metavar="S", help="random seed (default: random, printed)")
    parser.add_argument("--image", type=Path, metavar="PATH", help="input image for image-to-image")
    parser.add_argument("--strength", type=float, help="image-to-image strength in (0, 1] (default 0.6)")
    parser.add_argument("--num-outputs", type=int, default=1, metavar="N")
    parser.add_argument("--fps", type=int, help="video frame rate (default: the model's)")
    parser.add_argument("--attention-backend", metavar="B", help="auto (default), fa3, fa2 or torch_sdpa")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the DiT blocks (compiled kernels cached in ~/.cache/diffserve or $DIFFSERVE_CACHE_DIR)",
    )
    parser.add_argument("--device", metavar="D", help="cpu, cuda, cuda:N, xpu (default: first GPU, else cpu)")
    parser.add_argument(
        "--dtype", metavar="T", help="bf16, fp16 or fp32 (default: bf16 on GPUs, fp32 on CPU)"
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        metavar="FILE",
        help="output file: .png, .jpg, .webp (images) or .mp4 (videos)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_parallel_arguments(parser)  # --ulysses-degree, --cfg-parallel (multi-GPU; also under torchrun)


def _quiet_libraries() -> None:
    """diffusers/transformers print loading bars and advice; the user asked for one progress bar."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


def _fail(message: str) -> int:
    print(f"diffserve generate: error: {message}", file=sys.stderr)
    return 2


def run_generate(args: argparse.Namespace) -> int:
    from diffserve.runtime.api import GenerationCancelled, GenerationRequest, InvalidRequest
    from diffserve.runtime.distributed.launch import load_parallel_runner
    from diffserve.runtime.loader import ModelLoadError
    from diffserve.runtime.outputs import VIDEO_FORMATS, output_format, save_result
    from diffserve.runtime.runner import OutOfMemory

    try:
        fmt = output_format(args.output)
        image = args.image.read_bytes() if args.image is not None else None
    except (ValueError, OSError) as e:
        return _fail(str(e))
    _quiet_libraries()
    width, height = args.size or (None, None)
    req = GenerationRequest(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        width=width,
        height=height,
        num_frames=args.frames,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,  # None: the pipeline draws one and reports it in result.seed
        num_outputs=args.num_outputs,
        image=image,
        strength=args.strength,
        fps=args.fps,
    )
    bar = None
    if args.compile:
        from diffserve.runtime.compile import request_compile

        request_compile()
    try:
        runner = load_parallel_runner(
            args.model,
            args.device,
            args.dtype,
            args.attention_backend,
            ulysses_degree=args.ulysses_degree,
            cfg_parallel=args.cfg_parallel,
        )
        wants = "video" if fmt in VIDEO_FORMATS else "image"
        if wants != runner.task:
            suffix = ".mp4" if runner.task == "video" else ".png, .jpg or .webp"
            return _fail(f"{runner.model_id} makes {runner.task}s: use an output file ending in {suffix}")

        def on_step(done: int, total: int) -> None:
            nonlocal bar
            if args.quiet:
                return
            if bar is None:
                from tqdm import tqdm

                bar = tqdm(total=total, desc="denoising", unit="step", file=sys.stderr)
            bar.update(done - bar.n)

        start = time.perf_counter()
        result = runner.generate(req, on_step=on_step)
    except (ModelLoadError, InvalidRequest, OutOfMemory) as e:
        return _fail(str(e))
    except (KeyboardInterrupt, GenerationCancelled):
        print("\ndiffserve generate: interrupted", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    try:
        paths = save_result(result, args.output)
    except (OSError, ValueError) as e:  # disk full, directory not writable, ...
        return _fail(f"could not write {args.output}: {e}")
    took = time.perf_counter() - start
    for path in paths:
        print(
            f"wrote {path} ({runner.model_id}, {result.width}x{result.height}, seed {result.seed}, {took:.1f} s)"
        )
    return 0
