"""Pipelines as small stages (stages.py): flux.py, wan.py natively, generic.py for any other diffusers
pipeline. `pipeline_class(family)` picks one."""

from __future__ import annotations


def pipeline_class(family: str):
    if family == "flux":
        from diffserve.runtime.pipelines.flux import FluxPipeline

        return FluxPipeline
    if family == "flux-kontext":
        from diffserve.runtime.pipelines.flux_kontext import FluxKontextPipeline

        return FluxKontextPipeline
    if family == "wan":
        from diffserve.runtime.pipelines.wan import WanPipeline

        return WanPipeline
    if family == "wan-i2v":
        from diffserve.runtime.pipelines.wan_i2v import WanI2VPipeline

        return WanI2VPipeline
    if family in ("qwen-image", "qwen-image-edit"):
        from diffserve.runtime.pipelines import qwen_image

        return qwen_image.QwenImageEditPipeline if family == "qwen-image-edit" else qwen_image.QwenImagePipeline
    if family == "generic":
        from diffserve.runtime.pipelines.generic import GenericPipeline

        return GenericPipeline
    raise ValueError(f"unknown family {family!r}")
