"""Every environment variable diffserve reads, declared once: name, type, default, doc.

    from diffserve import envs
    if envs.DIFFSERVE_CUDA_GRAPHS: ...

Attributes are read from os.environ at every access (a test's monkeypatch.setenv, or a switch flipped in a
running process, takes effect at once) and parsed one way: booleans accept 1/true/yes/on and 0/false/no/off
(any case); anything else is an error naming the variable, not a silent default. Nothing else in the
package reads os.environ (`git grep os.environ diffserve/`): command-line options travel in the config
objects (runtime/config.py, server/config.py); these variables are for switches an operator flips without
a flag, and for the ones third-party launchers set (torchrun's RANK/WORLD_SIZE).

The README's "Environment variables" table lists the same names; tests/unit/test_envs.py checks both agree.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class EnvError(ValueError):
    """A variable set to a value diffserve cannot use; the message names it and what it accepts."""


def _bool(name: str, text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise EnvError(f"{name}={text!r}: use one of {', '.join(_TRUE)} or {', '.join(_FALSE)}")


def _int(name: str, text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise EnvError(f"{name}={text!r}: expected an integer") from None


def _str(name: str, text: str) -> str | None:
    return text.strip() or None


def _choice(*choices: str) -> Callable[[str, str], str | None]:
    def parse(name: str, text: str) -> str | None:
        value = text.strip().lower()
        if not value:
            return None
        if value not in choices:
            raise EnvError(f"{name}={text!r}: choose one of {', '.join(choices)}")
        return value

    return parse


@dataclass(frozen=True)
class Var:
    name: str
    parse: Callable[[str, str], Any]
    default: Any
    doc: str


VARIABLES: dict[str, Var] = {
    v.name: v
    for v in (
        Var(
            "DIFFSERVE_PLATFORM",
            _choice("cuda", "rocm", "xpu", "cpu"),
            None,
            "cuda|rocm|xpu|cpu: override platform detection (e.g. force the CPU path on a GPU host)",
        ),
        Var(
            "DIFFSERVE_ATTENTION_BACKEND",
            _str,
            None,
            "fa3|fa2|torch_sdpa|auto: the attention backend when --attention-backend is not given",
        ),
        Var("DIFFSERVE_API_KEY", _str, None, "the server's API key when --api-key is not given"),
        Var(
            "DIFFSERVE_ALLOW_DOWNLOAD",
            _bool,
            False,
            "1: let --model download a Hugging Face id that is not in the local cache",
        ),
        Var(
            "DIFFSERVE_CACHE_DIR",
            _str,
            None,
            "root of diffserve's caches (default ~/.cache/diffserve); --compile keeps kernels in its inductor/",
        ),
        Var("DIFFSERVE_FUSED_OPS", _bool, True, "0: no Triton fused kernels (the PyTorch reference ops)"),
        Var("DIFFSERVE_CUDA_GRAPHS", _bool, True, "0: run every DiT forward eagerly, no CUDA graphs"),
        Var(
            "DIFFSERVE_CHECK_SYNC",
            _bool,
            False,
            "1: any host synchronisation inside the denoising loop is an error (a debugging aid)",
        ),
        Var(
            "DIFFSERVE_BLAS_WORKSPACE",
            _choice("default", "none"),
            None,
            "default: keep cuBLAS's own workspace sizes (by default diffserve gives cuBLAS none, which keeps "
            "memsets out of CUDA graphs)",
        ),
        # Set by torchrun (or any launcher of a multi-node group), read by runtime/distributed.
        Var("RANK", _int, None, "torchrun: this process's rank in the group"),
        Var("WORLD_SIZE", _int, None, "torchrun: the group's size"),
        Var("LOCAL_RANK", _int, None, "torchrun: this process's rank on its node"),
        Var("LOCAL_WORLD_SIZE", _int, None, "torchrun: processes of the group on this node"),
        # Hugging Face's own switch, honoured when deciding whether --model may download.
        Var("HF_HUB_OFFLINE", _bool, False, "huggingface_hub: never download (wins over DIFFSERVE_ALLOW_DOWNLOAD)"),
        # cuBLAS's own: set by the user, they win over diffserve's no-workspace setting (runtime/cuda_graphs.py).
        Var("CUBLAS_WORKSPACE_CONFIG", _str, None, "cuBLAS: workspace sizes (e.g. :4096:8 for determinism)"),
        Var("CUBLASLT_WORKSPACE_SIZE", _str, None, "cuBLASLt: workspace size in KiB"),
        # Set by torch itself once Inductor resolves its cache (see runtime/compile.py), or by the user.
        Var("TORCHINDUCTOR_CACHE_DIR", _str, None, "torch Inductor's cache directory"),
    )
}


def get(name: str) -> Any:
    var = VARIABLES[name]
    text = os.environ.get(name)
    if text is None or not text.strip():  # set but empty: as if unset
        return var.default
    value = var.parse(name, text)
    return var.default if value is None else value


def is_set(name: str) -> bool:
    """Whether a declared variable is set to something (an empty value counts as unset)."""
    return bool(os.environ.get(VARIABLES[name].name, "").strip())


def check_all() -> None:
    """Parse every variable that is set: a bad value fails at start-up with one line, not mid-request."""
    for name in VARIABLES:
        get(name)


def __getattr__(name: str) -> Any:
    if name in VARIABLES:
        return get(name)
    raise AttributeError(f"module 'diffserve.envs' has no attribute {name!r}")
