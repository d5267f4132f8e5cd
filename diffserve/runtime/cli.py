"""`diffserve generate`: one image or video from the command line, no server.

    diffserve generate --model black-forest-labs/FLUX.1-dev --prompt "a red fox" -o fox.png
    diffserve generate --model ./Wan2.1-T2V-1.3B-Diffusers --prompt "waves" --frames 33 -o waves.mp4

Anything the user can fix (bad model directory, unsupported size, wrong file extension, an unwritable
output, an attention backend that cannot run here) ends with one line on stderr and exit status 2, never a
traceback. What does not need the model (the output file, the request's limits) is checked before it loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

from diffserve.runtime.config import (
    RuntimeConfig,
    add_runtime_arguments,
    parse_loras,
    runtime_config_from_args,
)
from diffserve.runtime.limits import LimitError, Limits, check_request, parse_size, rules_of


def _size(text: str) -> tuple[int, int]:
    try:
        return parse_size(text, "--size")
    except LimitError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    add_runtime_arguments(parser)  # --model, --device, --dtype, --attention-backend, --compile, parallel
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt")
    parser.add_argument("--size", type=_size, metavar="WxH", help="output size (default: the model's)")
    parser.add_argument(
        "--frames", type=int, metavar="N", help="video frames (video models; default: the model's)"
    )
    parser.add_argument("--steps", type=int, metavar="N", help="denoising steps (default: the model's)")
    parser.add_argument("--guidance", type=float, metavar="G", help="guidance scale (default: the model's)")
    parser.add_argument(
        "--true-cfg-scale",
        type=float,
        metavar="S",
        help="true CFG scale with --negative-prompt (Qwen-Image, FLUX; request extra true_cfg_scale; "
        "default: the model's)",
    )
    parser.add_argument("--seed", type=int, metavar="S", help="random seed (default: random, printed)")
    parser.add_argument("--image", type=Path, metavar="PATH", help="input image for image-to-image")
    parser.add_argument(
        "--strength", type=float, help="image-to-image strength in (0, 1] (default: the model's)"
    )
    parser.add_argument("--num-outputs", type=int, default=1, metavar="N", help="outputs (default 1)")
    parser.add_argument("--fps", type=int, help="video frame rate (default: the model's)")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        metavar="FILE",
        help="output file: .png, .jpg, .webp (images) or .mp4 (videos)",
    )
    parser.add_argument(
        "--lora-scale",
        action="append",
        default=[],
        metavar="NAME=S",
        help="scale of the --lora adapter NAME (default 1 for every --lora given; 0 leaves it out; repeatable)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


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


def check_writable(path: Path) -> None:
    """Raise OSError (with the reason) unless a file can be written at `path`: checked before the model
    loads, so that a typo in -o costs nothing. Creates missing parent directories, as writing would."""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=parent):
        pass
    if path.exists() and not os.access(path, os.W_OK):
        raise PermissionError(f"{path} is not writable")


def lora_scales(args: argparse.Namespace) -> dict[str, float]:
    """The request's `lora` extension: every --lora adapter at 1, unless --lora-scale NAME=S says otherwise.
    A name that no --lora loads is left for check_lora to refuse, with the server's words."""
    scales = {name: 1.0 for name, _ in parse_loras(getattr(args, "lora", None))}
    for spec in getattr(args, "lora_scale", None) or ():
        name, sep, value = spec.partition("=")
        try:
            scales[name.strip()] = float(value)
        except ValueError:
            raise LimitError(f"--lora-scale must be NAME=NUMBER, got {spec!r}", "lora") from None
        if not sep:
            raise LimitError(f"--lora-scale must be NAME=NUMBER, got {spec!r}", "lora")
    return scales


def generation_request(args: argparse.Namespace, image: bytes | None):
    from diffserve.runtime.api import GenerationRequest

    loras = lora_scales(args)
    width, height = args.size or (None, None)
    return GenerationRequest(
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
        extra={
            **({"lora": loras} if loras else {}),
            **({"true_cfg_scale": args.true_cfg_scale} if args.true_cfg_scale is not None else {}),
        },
    )


def run_generate(args: argparse.Namespace) -> int:
    from diffserve.runtime.outputs import VIDEO_FORMATS, output_format

    limits = Limits()  # the server's defaults: the same input gets the same verdict from both
    try:
        config = runtime_config_from_args(args)
        fmt = output_format(args.output)
        wants = "video" if fmt in VIDEO_FORMATS else "image"
    except ValueError as e:  # a bad dtype, backend name, parallel layout or file extension
        return _fail(str(e))
    try:
        check_writable(args.output)
    except OSError as e:
        return _fail(f"cannot write {args.output}: {e.strerror or e}")
    try:
        image = args.image.read_bytes() if args.image is not None else None
    except OSError as e:
        return _fail(f"cannot read --image {args.image}: {e.strerror or e}")
    try:
        req = generation_request(args, image)
        # What needs no model, before it loads; the size and frame count wait for the model's own rules (its
        # multiple, largest side, frame step), so that the message is the one the server gives.
        unsized = dataclasses.replace(req, width=None, height=None, num_frames=None)
        lora_rules = {"loras": config.lora_names, "max_loras": config.max_loras}
        check_request(unsized, limits.for_model(lora_rules), wants)
    except LimitError as e:
        return _fail(str(e))
    return _generate(args, config, req, limits, wants)


def _generate(args, config: RuntimeConfig, req, limits: Limits, wants: str) -> int:
    from diffserve.runtime.api import GenerationCancelled, InvalidRequest
    from diffserve.runtime.distributed.launch import load_parallel_runner
    from diffserve.runtime.loader import ModelLoadError
    from diffserve.runtime.outputs import save_result
    from diffserve.runtime.runner import OutOfMemory

    _quiet_libraries()
    bar = None
    try:
        runner = load_parallel_runner(config)
        if wants != runner.task:
            suffix = ".mp4" if runner.task == "video" else ".png, .jpg or .webp"
            return _fail(f"{runner.model_id} makes {runner.task}s: use an output file ending in {suffix}")
        check_request(req, limits.for_model(rules_of(runner)), runner.task)

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
    except (OSError, ValueError) as e:  # disk full, ...
        return _fail(f"could not write {args.output}: {e}")
    took = time.perf_counter() - start
    forwards = result.dit_forwards
    cached = (
        f", DiT forwards {forwards['computed']} computed / {forwards['cached']} cached" if forwards else ""
    )
    for path in paths:
        print(
            f"wrote {path} ({runner.model_id}, {result.width}x{result.height}, seed {result.seed}, "
            f"{took:.1f} s{cached})"
        )
    return 0
