"""Build description of the CUDA extensions in csrc/, imported by setup.py.

    ext_modules=cuda_extensions(), cmdclass=build_ext_cmdclass()

Environment switches:
    MODUS_SKIP_CUDA_EXT=1   build no extension (pure-Python install; the model then uses the
                            FlexAttention or reference attention backends)
    TORCH_CUDA_ARCH_LIST    target architectures, torch's syntax ("9.0", "8.0;9.0+PTX");
                            every entry must be >= 8.0 (cp.async, ldmatrix, bf16 mma). Unset:
                            sm_80 and sm_90 machine code plus compute_90 PTX.
    MAX_JOBS                parallel nvcc jobs (torch's BuildExtension honours it)

Where torch has no CUDA or nvcc is missing, ``cuda_extensions()`` returns [] and says why,
so a CPU install succeeds.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
_MODUS_ATTN_SOURCES = (
    "csrc/modus_attn/modus_attn_api.cpp",
    "csrc/modus_attn/attn_fwd.cu",
    "csrc/modus_attn/attn_bwd.cu",
    "csrc/modus_attn/block_metadata.cu",
)
_DEFAULT_ARCH_FLAGS = (
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
)
# Added to torch's own nvcc flags (its -D__CUDA_NO_HALF_OPERATORS__ family and -std stay;
# tests/kernels/test_nvcc_compile.py compiles with the same set).
_NVCC_FLAGS = ("-O3", "-lineinfo")


def _skip(reason: str) -> list:
    print(f"modus_mega: not building the CUDA extension: {reason}", file=sys.stderr)
    return []


def _check_arch_list(arch_list: str) -> None:
    """Refuse architectures the kernels cannot run on, naming the fix."""
    for entry in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        arch = entry.strip().removesuffix("+PTX")
        if not arch:
            continue
        if arch == "native":
            continue
        try:
            major = float(arch.rstrip("a"))
        except ValueError as error:
            raise ValueError(
                f"TORCH_CUDA_ARCH_LIST entry {entry!r} is not an architecture like '9.0'"
            ) from error
        if major < 8.0:
            raise ValueError(
                f"TORCH_CUDA_ARCH_LIST={arch_list!r} contains {entry!r}; the modus_attn kernels "
                f"need sm_80 or newer (cp.async, ldmatrix, bf16 tensor cores). Drop it, or set "
                f"MODUS_SKIP_CUDA_EXT=1"
            )


def cuda_extensions() -> list:
    """The extension modules to build here: [modus_mega._modus_attn] or [] (with the reason
    on stderr) when skipped by MODUS_SKIP_CUDA_EXT=1, when torch has no CUDA, or when nvcc is
    missing."""
    if os.environ.get("MODUS_SKIP_CUDA_EXT", "0") == "1":
        return _skip("MODUS_SKIP_CUDA_EXT=1")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    except ImportError:
        return _skip("torch is not installed yet (install torch first, then this package)")
    if torch.version.cuda is None:
        return _skip(f"torch {torch.__version__} is a CPU build")
    nvcc = Path(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    if nvcc is None or not (nvcc.exists() or shutil.which("nvcc")):
        return _skip("nvcc not found (set CUDA_HOME to the CUDA toolkit)")

    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    nvcc_flags = list(_NVCC_FLAGS)
    if arch_list:
        _check_arch_list(arch_list)  # torch turns the list into -gencode flags itself
    else:
        nvcc_flags += _DEFAULT_ARCH_FLAGS
    return [
        CUDAExtension(
            name="modus_mega._modus_attn",
            sources=list(_MODUS_ATTN_SOURCES),
            include_dirs=[str(_REPO / "csrc" / "modus_attn")],
            extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
        )
    ]


def build_ext_cmdclass() -> dict:
    """``{"build_ext": torch's BuildExtension}`` when torch is importable, else {}."""
    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        return {}
    return {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}
