"""Builds flash_ext._C: the CPU kernels always, the CUDA kernels when nvcc is
found and a GPU is visible (FLASH_EXT_CUDA=1 builds them without one, e.g.
for wheels; FLASH_EXT_CUDA=0 skips them). FLASH_EXT_CUDA_ARCHS lists the
targets (default "8.0;9.0a"; 9.0a adds the Hopper family). FLASH_EXT_CUDA_SOURCES=subset compiles only the
instantiations named in csrc/cuda/ci_subset.txt: a compile check for small
machines (CI), whose library cannot be loaded (the dispatch needs them all).

Build against the installed torch: pip install --no-build-isolation .
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()

# torch guesses CUDA_HOME from nvcc's folder; with nvcc linked into
# /usr/local/bin that guess is /usr/local, which holds no CUDA headers.
if "CUDA_HOME" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda() -> bool:
    forced = os.environ.get("FLASH_EXT_CUDA")
    if forced is not None:
        return forced not in ("0", "", "false", "False")
    # Like xformers' FORCE_CUDA: without a GPU to run them, the CUDA kernels'
    # long compile is opt-in.
    has_nvcc = shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").exists()
    return has_nvcc and torch.cuda.is_available()


def _cutlass_include() -> str:
    """CuTe/CUTLASS headers: FLASH_EXT_CUTLASS_INCLUDE, else the nvidia-cutlass wheel."""
    explicit = os.environ.get("FLASH_EXT_CUTLASS_INCLUDE")
    if explicit:
        return explicit
    try:
        import cutlass_library
    except ImportError as err:
        raise RuntimeError(
            "the CUDA build needs CUTLASS headers: pip install nvidia-cutlass, "
            "or set FLASH_EXT_CUTLASS_INCLUDE to a CUTLASS include directory"
        ) from err
    return str(Path(cutlass_library.__file__).parent / "source" / "include")


def _pip_cuda_includes() -> list[str]:
    """Headers of the CUDA libraries torch's wheel brings (cuSPARSE, cuBLAS...),
    which torch's own headers include and a bare toolkit may lack."""
    try:
        import nvidia
    except ImportError:
        return []
    return sorted(p for root in nvidia.__path__ for p in glob.glob(os.path.join(root, "*", "include")))


def _gencode_flags(archs: str) -> list[str]:
    flags = []
    for arch in filter(None, (a.strip() for a in archs.replace(",", ";").split(";"))):
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    return flags


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(str(ROOT / pattern), recursive=True))


def _is_instantiation(source: str) -> bool:
    """One (head dim, dtype) instance of a kernel template: heavy to compile."""
    return "/instantiations/" in source or Path(source).name.startswith("kvcache_fwd_")


def _builds_sm90a(archs: str) -> bool:
    """The Hopper family (wgmma, TMA) needs the arch-specific sm_90a target."""
    return any(a.strip() == "9.0a" for a in archs.replace(",", ";").split(";"))


def _cuda_sources(archs: str) -> list[str]:
    sources = _sources("csrc/cuda/**/*.cu")
    if not _builds_sm90a(archs):
        sources = [s for s in sources if not Path(s).name.startswith("sm90_")]
    if os.environ.get("FLASH_EXT_CUDA_SOURCES") == "subset":
        keep = set((ROOT / "csrc" / "cuda" / "ci_subset.txt").read_text().split())
        sources = [s for s in sources if not _is_instantiation(s) or Path(s).name in keep]
    return sources


# A compiler whose libstdc++ links statically (the GPU machine's /opt/gcc
# g++ does) puts a second libstdc++ in our library; its stream code then
# resolved the locale facets' ids to torch's libstdc++ and crashed formatting
# any number into an error message. Keeping the archive's symbols local makes
# that copy self-consistent; with a shared libstdc++ (the usual case) the flag
# changes nothing.
LINK_FLAGS = ["-Wl,--exclude-libs,ALL"] if sys.platform.startswith("linux") else []
# at::parallel_for is an inline `#pragma omp parallel` in torch's headers
# (torch's CPU build uses OpenMP): without -fopenmp it runs the whole range
# on the calling thread. Linking with it names libgomp.so.1, the soname torch
# has already loaded, so the process keeps one OpenMP runtime.
OPENMP_FLAGS = ["-fopenmp"] if sys.platform.startswith("linux") else ["-fopenmp-simd"]


def build_extension():
    # The C++ standard comes from torch (its headers need C++20 from 2.13 on).
    cxx_flags = ["-O3", "-fvisibility=hidden", *OPENMP_FLAGS]
    sources = _sources("csrc/ops/*.cpp") + _sources("csrc/cpu/*.cpp") + ["csrc/python_module.cpp"]
    sources = [s for s in sources if not s.endswith("backend_cuda.cpp")]
    if not _want_cuda():
        return CppExtension("flash_ext._C", sources, extra_compile_args={"cxx": cxx_flags},
                            extra_link_args=LINK_FLAGS + OPENMP_FLAGS, py_limited_api=False)
    archs = os.environ.get("FLASH_EXT_CUDA_ARCHS", "8.0;9.0a")
    nvcc_flags = [
        "-O3", "--use_fast_math", "--expt-relaxed-constexpr", "--expt-extended-lambda",
        "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
        "-lineinfo", *_gencode_flags(archs),
    ]
    if os.environ.get("FLASH_EXT_PTXAS_VERBOSE"):
        nvcc_flags.append("-Xptxas=-v")
    return CUDAExtension(
        "flash_ext._C",
        sources + ["csrc/ops/backend_cuda.cpp"] + _cuda_sources(archs),
        include_dirs=[str(ROOT / "csrc"), _cutlass_include(), *_pip_cuda_includes()],
        define_macros=[("FLASH_EXT_WITH_CUDA", None)] + ([("FLASH_EXT_SM90A", None)] if _builds_sm90a(archs) else []),
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=LINK_FLAGS + OPENMP_FLAGS,
    )


class BuildExtensionInTree(BuildExtension):
    """Also places the built library in the source tree, so `python -m
    flash_ext` and `pytest` run from a checkout (where ./flash_ext shadows the
    installed package) load the same build. A subset build is a compile check
    and stays out of the tree."""

    def run(self) -> None:
        super().run()
        if not self.inplace and os.environ.get("FLASH_EXT_CUDA_SOURCES") != "subset":
            self.copy_extensions_to_source()


setup(
    packages=find_packages(include=["flash_ext", "flash_ext.*"]),
    ext_modules=[build_extension()],
    cmdclass={"build_ext": BuildExtensionInTree.with_options(use_ninja=True)},
)
