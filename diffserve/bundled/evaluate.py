"""Judge a model on held-out (colour, shape) pairs from the pixels of the pictures it generates.

    python -m diffserve.bundled.evaluate [--model DIR] [--split heldout] [--count 64] [--json out.json]
                                         [--via diffusers|diffserve] [--device cpu] [--steps N] [--size N]

Prompts are the data generator's captions for the split (varied phrasing, never seen in training when the
split is "heldout"). Each picture is judged by judge.judge: colour and shape always, position, size and
background when the caption states them. `--via diffusers` samples through diffusers' FluxPipeline;
`--via diffserve` through diffserve's own runner (diffserve.runtime.runner.load_runner).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from diffserve.bundled import data
from diffserve.bundled.judge import judge
from diffserve.runtime.loader import default_model_path, inspect_model


def diffusers_sampler(model, device: str, size: int, steps: int, batch: int = 16):
    """prompts, seeds -> PIL images, through diffusers' FluxPipeline in fp32."""
    import torch
    from diffusers import FluxPipeline

    # No dtype argument: the saved model loads in fp32 as it is (see build.save_pipeline).
    pipe = FluxPipeline.from_pretrained(str(model)).to(device)
    pipe.set_progress_bar_config(disable=True)

    def sample(prompts: list[str], seeds: list[int]):
        images = []
        for i in range(0, len(prompts), batch):
            gens = [torch.Generator(device).manual_seed(s) for s in seeds[i : i + batch]]
            out = pipe(
                prompts[i : i + batch], height=size, width=size, num_inference_steps=steps, generator=gens
            )
            images.extend(out.images)
        return images

    return sample


def diffserve_sampler(model, device: str, size: int, steps: int):
    """prompts, seeds -> PIL images, through diffserve's runner (one request per prompt)."""
    from diffserve.runtime.api import GenerationRequest
    from diffserve.runtime.runner import load_runner

    runner = load_runner(model=str(model), device=device, dtype="float32")

    def sample(prompts: list[str], seeds: list[int]):
        return [
            runner.generate(
                GenerationRequest(prompt=p, width=size, height=size, num_inference_steps=steps, seed=s)
            ).images[0]
            for p, s in zip(prompts, seeds, strict=True)
        ]

    return sample


def score(examples: list[data.Example], images) -> dict:
    """Accuracy of each attribute over the pictures whose caption states it (colour and shape: all)."""
    hits, totals, confusion = Counter(), Counter(), Counter()
    for example, image in zip(examples, images, strict=True):
        verdict = judge(image)
        checks = ["colour", "shape"] + sorted(example.mentions)
        for attribute in checks:
            totals[attribute] += 1
            hits[attribute] += getattr(verdict, attribute) == getattr(example.scene, attribute)
        confusion[f"{example.scene.colour} {example.scene.shape} -> {verdict.colour} {verdict.shape}"] += 1
    accuracy = {a: round(hits[a] / totals[a], 4) for a in totals}
    return {"accuracy": accuracy, "counts": dict(totals), "confusion": dict(sorted(confusion.items()))}


def evaluate(sample, split: str = "heldout", count: int = 64, seed: int = 1234) -> tuple[dict, list]:
    examples = data.make_examples(seed, count, split)
    start = time.perf_counter()
    images = sample([e.caption for e in examples], [seed + i for i in range(count)])
    seconds = time.perf_counter() - start
    result = score(examples, images)
    result.update(split=split, count=count, seconds_per_image=round(seconds / count, 3))
    return result, images


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(default_model_path()))
    p.add_argument("--split", default="heldout", choices=["heldout", "train"])
    p.add_argument("--count", type=int, default=64)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--via", default="diffusers", choices=["diffusers", "diffserve"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, help="default: the model's diffserve.json")
    p.add_argument("--steps", type=int, help="default: the model's diffserve.json")
    p.add_argument("--json", help="write the summary here")
    p.add_argument("--grid", help="write a contact sheet of the pictures here (PNG)")
    args = p.parse_args(argv)
    defaults = inspect_model(args.model).runtime_defaults()  # the model's diffserve.json, checked
    size = args.size or defaults.get("width", 128)
    steps = args.steps or defaults.get("num_inference_steps", 16)
    make = diffusers_sampler if args.via == "diffusers" else diffserve_sampler
    result, images = evaluate(make(args.model, args.device, size, steps), args.split, args.count, args.seed)
    result.update(model=args.model, via=args.via, device=args.device, size=size, steps=steps)
    print(json.dumps({k: result[k] for k in ("split", "count", "accuracy", "seconds_per_image")}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.grid:
        from PIL import Image

        cols = 8
        sheet = Image.new("RGB", (cols * size, -(-len(images) // cols) * size), "white")
        for i, image in enumerate(images):
            sheet.paste(image, ((i % cols) * size, (i // cols) * size))
        sheet.save(args.grid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
