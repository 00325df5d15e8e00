"""What each kernel family serves: the one place the Python layer decides
between our kernels and PyTorch's own SDPA, and the source of the README's
support table (``python -m flash_ext.support_table``).

The C++ side re-checks everything it relies on (csrc/ops/checks.cpp and each
backend's ``*_unsupported_reason``), so a rule missing here gives an error,
never a wrong answer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from . import _C

CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CUDA_DTYPES = (torch.float16, torch.bfloat16)
MAX_CUDA_HEAD_DIM = 256


@dataclass(frozen=True)
class Family:
    """A kernel family and the features its own kernels serve, per pass.

    ``routes_to`` names the family whose kernels take the calls this one's do
    not cover (on the same GPU), so what is served is the union of both.
    """

    name: str
    dtypes: tuple[torch.dtype, ...]
    max_head_dim: int | None
    head_dim_multiple: int
    forward: frozenset[str] = field(default_factory=frozenset)
    backward: frozenset[str] = field(default_factory=frozenset)
    decode: frozenset[str] = field(default_factory=frozenset)
    routes_to: str | None = None

    def serves(self, pass_name: str) -> frozenset[str]:
        """Features served in ``pass_name`` ('forward', 'backward', 'decode'), routing included."""
        own = getattr(self, pass_name)
        return own | FAMILIES[self.routes_to].serves(pass_name) if self.routes_to else own


FEATURES = (
    "causal", "sliding window", "bool mask", "float mask (bias)", "bias gradient", "dropout",
    "GQA/MQA", "value dim != query dim", "any strides (last dim contiguous)", "paged KV cache",
    "KV append", "return_lse", "deterministic backward", "softcap", "ALiBi", "scale <= 0",
    "varlen (cu_seqlens)", "nested (jagged) tensors",
)

_PREFILL = frozenset({"causal", "sliding window", "bool mask", "float mask (bias)", "dropout", "GQA/MQA",
                      "any strides (last dim contiguous)", "return_lse", "varlen (cu_seqlens)",
                      "nested (jagged) tensors"})
_SCORE_MODS = frozenset({"softcap", "ALiBi"})
_CPU_EXTRAS = frozenset({"value dim != query dim", "scale <= 0"})
_DECODE = frozenset({"causal", "sliding window", "GQA/MQA", "paged KV cache", "KV append", "return_lse",
                     "any strides (last dim contiguous)"})

FAMILIES = {
    "cpu": Family("cpu", CPU_DTYPES, None, 1,
                  forward=_PREFILL | _SCORE_MODS | _CPU_EXTRAS,
                  backward=_PREFILL | _SCORE_MODS | _CPU_EXTRAS | {"bias gradient", "deterministic backward"},
                  decode=_DECODE | _SCORE_MODS | _CPU_EXTRAS),
    "sm80": Family("sm80", CUDA_DTYPES, MAX_CUDA_HEAD_DIM, 8,
                   forward=_PREFILL | _SCORE_MODS,
                   backward=_PREFILL | _SCORE_MODS | {"bias gradient", "deterministic backward"},
                   decode=_DECODE | _SCORE_MODS),
    # Hopper (sm_90a): TMA + wgmma forward and backward (not deterministic),
    # dense and varlen batches; the rest runs on the sm80 kernels
    # (csrc/cuda/dispatch.cu, sm90_fwd_serves, sm90_bwd_serves).
    "sm90": Family("sm90", CUDA_DTYPES, MAX_CUDA_HEAD_DIM, 8,
                   forward=frozenset({"causal", "sliding window", "GQA/MQA", "any strides (last dim contiguous)",
                                      "return_lse", "varlen (cu_seqlens)", "nested (jagged) tensors"}),
                   backward=frozenset({"causal", "sliding window", "GQA/MQA", "any strides (last dim contiguous)",
                                       "return_lse", "varlen (cu_seqlens)", "nested (jagged) tensors"}),
                   routes_to="sm80"),
}


def cuda_built() -> bool:
    """Whether the extension was compiled with its CUDA kernels."""
    return bool(_C.WITH_CUDA)


def family_for(device: torch.device) -> tuple[Family | None, str | None]:
    """The kernel family serving ``device``, or None and the reason."""
    if device.type == "cpu":
        return FAMILIES["cpu"], None
    if device.type != "cuda":
        return None, f"no flash_ext kernels for device type {device.type!r}"
    if not cuda_built():
        return None, "flash_ext was built without its CUDA kernels"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return None, f"the CUDA kernels need compute capability >= 8.0, got {major}.{minor}"
    name = cuda_family_name(major)
    if name is None:
        return None, f"the forced CUDA kernel family {_forced_cuda_path!r} does not run on compute capability {major}.{minor}"
    return FAMILIES[name], None


_CUDA_RUNS_ON = {"sm90": lambda major: major == 9, "sm80": lambda major: major >= 8}
# The family FLASH_EXT_CUDA_PATH forces ("" = by device): read at import, then
# set by set_cuda_path(). A plain global, so torch.compile guards on it.
_forced_cuda_path = os.environ.get("FLASH_EXT_CUDA_PATH", "").replace("auto", "")


def cuda_families(major: int) -> list[str]:
    """Every built family that runs on compute capability ``major``.x, in
    dispatch order, whatever is forced (what tests and benchmarks iterate)."""
    return [name for name in str(_C.CUDA_FAMILIES).split(",") if name and _CUDA_RUNS_ON[name](major)]


def cuda_family_name(major: int) -> str | None:
    """The family serving compute capability ``major``.x, by the C++
    dispatch's rule: the forced one if any, else the first built that runs there."""
    return next((name for name in cuda_families(major) if _forced_cuda_path in ("", name)), None)


def set_cuda_path(name: str | None) -> None:
    """Force the CUDA kernel family, e.g. ``"sm80"`` on an H100 to compare with
    the Hopper kernels; ``None`` restores the choice by device. Sets the
    ``FLASH_EXT_CUDA_PATH`` environment variable, which the C++ dispatch reads
    on every call (a family that was not built raises there)."""
    global _forced_cuda_path
    known = [family for family in FAMILIES if family != "cpu"]
    if name is not None and name not in known:
        raise ValueError(f"set_cuda_path: name must be one of {known} or None, got {name!r}")
    if name is not None and name not in str(_C.CUDA_FAMILIES).split(","):
        raise ValueError(f"set_cuda_path: the {name} kernels were not built (built: {_C.CUDA_FAMILIES or 'none'})")
    _forced_cuda_path = name or ""
    os.environ["FLASH_EXT_CUDA_PATH"] = _forced_cuda_path


def last_cuda_kernel_family() -> str:
    """The kernel family ('sm90', 'sm80') of the last CUDA attention launch."""
    return _C._last_cuda_kernel_family() if cuda_built() else ""


def prefill_unsupported_reason(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
    dropout_p: float, needs_grad: bool, bias_grad: bool, softcap: float = 0.0, alibi: bool = False,
    scale: float | None = None, varlen: bool = False,
) -> str | None:
    """Why our prefill kernels cannot serve this call, or None when they can.
    Tensors are in SDPA layout (..., heads, seq, dim)."""
    family, reason = family_for(query.device)
    if family is None:
        return reason
    dim, v_dim = query.shape[-1], value.shape[-1]
    reason = _dtype_and_dims_reason(family, query.dtype, dim, v_dim)
    if reason is not None:
        return reason
    wanted = set()
    if v_dim != dim:
        wanted.add("value dim != query dim")
    if attn_mask is not None:
        wanted.add("bool mask" if attn_mask.dtype == torch.bool else "float mask (bias)")
    if dropout_p > 0:
        wanted.add("dropout")
    if softcap:
        wanted.add("softcap")
    if scale is not None and scale <= 0:
        wanted.add("scale <= 0")
    if alibi:
        wanted.add("ALiBi")
    if varlen:
        wanted.add("varlen (cu_seqlens)")
    if query.dim() >= 3 and key.dim() >= 3 and query.shape[-3] != key.shape[-3]:
        wanted.add("GQA/MQA")
    passes = [("forward", family.serves("forward"), wanted)]
    if needs_grad:
        passes.append(("backward", family.serves("backward"), wanted | ({"bias gradient"} if bias_grad else set())))
    for pass_name, features, needed in passes:
        missing = needed - features
        if missing:
            return f"the {family.name} {pass_name} kernels do not serve: {', '.join(sorted(missing))}"
    return None


def decode_unsupported_reason(q: torch.Tensor, v_cache: torch.Tensor, softcap: float = 0.0,
                              alibi: bool = False) -> str | None:
    """Why our decode kernels cannot serve this call, or None when they can."""
    family, reason = family_for(q.device)
    if family is None:
        return reason
    dim, v_dim = q.shape[-1], v_cache.shape[-1]
    reason = _dtype_and_dims_reason(family, q.dtype, dim, v_dim)
    if reason is not None:
        return reason
    wanted = {name for name, used in (("value dim != query dim", v_dim != dim), ("softcap", bool(softcap)),
                                      ("ALiBi", alibi)) if used}
    missing = wanted - family.serves("decode")
    if missing:
        return f"the {family.name} decode kernels do not serve: {', '.join(sorted(missing))}"
    return None


def _dtype_and_dims_reason(family: Family, dtype: torch.dtype, dim: int, v_dim: int) -> str | None:
    if dtype not in family.dtypes:
        return f"the {family.name} kernels serve {_names(family.dtypes)}, got {dtype}"
    for name, d in (("query/key", dim), ("value", v_dim)):
        if family.max_head_dim is not None and d > family.max_head_dim:
            return f"the {family.name} kernels serve head dims up to {family.max_head_dim}, got {name} {d}"
        if d % family.head_dim_multiple:
            return f"the {family.name} kernels need head dims divisible by {family.head_dim_multiple}, got {name} {d}"
    return None


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def support_table() -> str:
    """Markdown: every feature x family x pass, from FAMILIES above."""
    header = "| feature | " + " | ".join(
        f"{name} {p}" for name in FAMILIES for p in ("fwd", "bwd", "decode")) + " |"
    rule = "|---" * (1 + 3 * len(FAMILIES)) + "|"
    rows = [header, rule]
    for feature in FEATURES:
        cells = []
        for family in FAMILIES.values():
            for pass_name in ("forward", "backward", "decode"):
                if feature in getattr(family, pass_name):
                    cells.append("yes")
                elif feature in family.serves(pass_name):
                    cells.append(f"{family.routes_to} kernels")
                else:
                    cells.append("—")
        rows.append(f"| {feature} | " + " | ".join(cells) + " |")
    rows.append("| dtypes | " + " | ".join(_names(f.dtypes) for f in FAMILIES.values() for _ in range(3)) + " |")
    rows.append("| head dims | " + " | ".join(
        (f"multiples of {f.head_dim_multiple} up to {f.max_head_dim}" if f.max_head_dim else "any")
        for f in FAMILIES.values() for _ in range(3)) + " |")
    return "\n".join(rows)


README_MARKERS = ("<!-- support-table -->", "<!-- /support-table -->")


def readme_with_table(readme: str) -> str:
    """The README text with the support table between its markers renewed."""
    start, end = README_MARKERS
    head, rest = readme.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{support_table()}\n{end}{tail}"


if __name__ == "__main__":
    import pathlib
    import sys

    path = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    path.write_text(readme_with_table(path.read_text()))
