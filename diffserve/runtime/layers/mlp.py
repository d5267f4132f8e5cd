"""The GELU(tanh) feed-forward used by FLUX and Wan blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffserve.kernels.fused_ops import linear_gelu
from diffserve.runtime.layers.fp8 import Fp8Linear, Quantized, fp8_layers, gelu_quant
from diffserve.runtime.layers.lora import LoraLinear, downs_together


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def layer_gelu(layer: nn.Module, x: torch.Tensor | Quantized) -> torch.Tensor:
    """GELU(tanh)(layer(x)) for whichever linear layer the model holds: a plain one is read for the GEMM with
    the GELU epilogue (linear_gelu); a LoRA layer over a plain base (layers/lora.py) keeps that epilogue on
    its K-append GEMM; a layer that must be called otherwise (FP8, LoRA over FP8) is called, then the GELU."""
    if isinstance(layer, LoraLinear) and layer.wcat is not None:
        return layer(x, activation="gelu")
    if isinstance(layer, Fp8Linear):
        return F.gelu(layer(x), approximate="tanh")
    return linear_gelu(x, layer.weight, layer.bias)


def linear_concat(parts: list[torch.Tensor], linear: nn.Linear, split: bool | None = None) -> torch.Tensor:
    """linear(torch.cat(parts, dim=-1)). With split (default: on CUDA) the concatenation is never written:
    one GEMM per part over its columns of the weight, each later one accumulating into the first's output
    (addmm, beta=1). FLUX's single blocks project [attention | MLP] (3,072 + 12,288 wide) this way: the cat
    would copy 141 MB per block at 1024^2. The accumulation reads back a rounded partial sum, one more
    rounding than the cat's single GEMM (bf16: ~3e-3 relative); on the CPU, where the copy costs little,
    the cat keeps the reference's rounding."""
    # a LoRA layer over a plain base (layers/lora.py) splits as its base, adding the low-rank terms after
    lora = linear if isinstance(linear, LoraLinear) and not isinstance(linear.base, Fp8Linear) else None
    if lora is None and isinstance(linear, Fp8Linear):  # one FP8 GEMM (it quantises the concatenation)
        return linear(torch.cat(parts, dim=-1))
    if split is None:
        split = parts[0].is_cuda
    if not split:
        return linear(torch.cat(parts, dim=-1))
    features = sum(part.shape[-1] for part in parts)
    if features != linear.in_features:
        raise ValueError(
            f"parts have {features} features in total, the linear layer takes {linear.in_features}"
        )
    base = linear if lora is None else lora.base
    # The adapters' terms (layers/lora.py): N-append, the GEMMs write [y | t] over [W; scaled A] and
    # t B^T is added at the end (n_up); else (split_terms) the last part's GEMM widened to [part | t] when
    # it came in a wide buffer, or one more (t, B^T) product accumulated at the end.
    n_rows = 0 if lora is None else lora.n_rows()
    full_weight, bias = lora.n_weight(n_rows) if n_rows else (base.weight, base.bias)
    extra = None if lora is None or n_rows else lora.split_terms(parts)
    out, col = None, 0
    for i, part in enumerate(parts):
        rows, weight = part.reshape(-1, part.shape[-1]), full_weight[:, col : col + part.shape[-1]]
        col += part.shape[-1]
        if extra is not None and i == len(parts) - 1 and extra[0].data_ptr() == rows.data_ptr():
            (rows, weight), extra = extra, None
        if out is None:
            out = F.linear(rows, weight, bias)
        else:
            out.addmm_(rows, weight.t())
    if extra is not None:
        out.addmm_(extra[0].to(out.dtype), extra[1].to(out.dtype).t())
    if n_rows:
        out = lora.n_up(out, n_rows)
    return out.view(*parts[0].shape[:-1], linear.out_features)


class _Proj(nn.Module):
    # Holds `.proj` so parameter names read `net.0.proj.*`, as in diffusers' FeedForward.
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)


class FeedForward(nn.Module):
    """proj_in -> gelu_tanh (fused into proj_in's GEMM on CUDA) -> proj_out; parameter names net.0.proj.*
    and net.2.* (net.1 was dropout)."""

    def __init__(self, dim: int, inner_dim: int, dim_out: int | None = None):
        super().__init__()
        self.net = nn.ModuleList([_Proj(dim, inner_dim), nn.Identity(), nn.Linear(inner_dim, dim_out or dim)])

    def lora_chains(self) -> tuple[tuple[str, str], ...]:
        # proj_in's output, through the GELU, is proj_out's whole input (layers/lora.py LoraLinear.chain)
        return (("net.0.proj", "net.2"),)

    def forward(self, x: torch.Tensor | Quantized) -> torch.Tensor:
        """x: the input, or (with FP8 layers: runtime/layers/fp8.py) the input as its producer wrote it
        quantised. With an FP8 output projection the GELU writes its output quantised (gelu_quant: one
        pass, no bf16 hidden activation) — an FP8 GEMM has no GELU epilogue, so the input projection
        writes its pre-activation output and that pass reads it back."""
        proj_in, proj_out = self.net[0].proj, self.net[2]
        if fp8_layers(proj_out):
            # a layer that must be called (FP8, or LoRA: layers/lora.py) is; a plain one is read
            pre = proj_in(x) if isinstance(proj_in, Fp8Linear) else F.linear(x, proj_in.weight, proj_in.bias)
            return proj_out(gelu_quant(pre))
        return proj_out(self.hidden(x))

    def hidden(self, x: torch.Tensor | Quantized) -> torch.Tensor:
        """GELU(proj_in(x)): the input of the output projection."""
        return layer_gelu(self.net[0].proj, x)


def feed_forwards(calls: list[tuple[FeedForward, torch.Tensor | Quantized]]) -> list[torch.Tensor]:
    """[ff(x) for ff, x in calls], run in stages across them: all input projections, then all output
    projections, each stage's LoRA down-projections first in shared launches (layers/lora.downs_together:
    FLUX's dual block pairs its image and text MLPs). The same values as one by one; FP8 output projections
    (FeedForward's quantised path) run one by one."""
    if any(fp8_layers(ff.net[2]) for ff, _ in calls):
        return [ff(x) for ff, x in calls]
    downs_together([(ff.net[0].proj, x) for ff, x in calls])
    hidden = [ff.hidden(x) for ff, x in calls]
    downs_together([(ff.net[2], h) for (ff, _), h in zip(calls, hidden, strict=True)])
    return [ff.net[2](h) for (ff, _), h in zip(calls, hidden, strict=True)]
