"""Compile checks of the CUDA extension without a GPU.

Every .cu file of csrc/modus_attn is compiled with nvcc (skipped when nvcc is not on PATH)
to sm_90a and sm_80 machine code, with torch's extension flags and every warning an error;
the torch binding modus_attn_api.cpp is syntax-checked with the host compiler against the
torch headers of this environment (the CPU wheel ships the ATen/c10 CUDA headers). All
compilations start at once and run in parallel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

SOURCE_DIR = Path(__file__).resolve().parents[2] / "csrc" / "modus_attn"
CUDA_SOURCES = sorted(p.name for p in SOURCE_DIR.glob("*.cu"))
# One nvcc run per source builds both targets (the host-side passes run once).
ARCH_FLAGS = ["-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80"]
# torch.utils.cpp_extension.COMMON_NVCC_FLAGS: the kernels must build with them.
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]

NVCC = shutil.which("nvcc")
HOST_CXX = shutil.which("g++") or shutil.which("c++")


def _nvcc_command(source: str, output: Path) -> list[str]:
    return [
        NVCC,
        "-std=c++17",
        "-O3",
        *TORCH_NVCC_FLAGS,
        *ARCH_FLAGS,
        "-Werror",
        "all-warnings",
        "-Xcompiler",
        "-Wall,-Wextra",
        "-c",
        str(SOURCE_DIR / source),
        "-o",
        str(output),
    ]


def _cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include directory (nvcc may be a wrapper script on PATH)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if NVCC is not None:
        candidates.append(str(Path(NVCC).resolve().parents[1]))
    for root in candidates:
        if root and (Path(root) / "include" / "cuda_runtime.h").exists():
            return Path(root) / "include"
    return None


def _api_command() -> list[str] | None:
    """Host-compiler syntax check of the binding, or None when a piece is missing."""
    try:
        from torch.utils.cpp_extension import include_paths
    except ImportError:
        return None
    python_include = sysconfig.get_paths()["include"]
    cuda_include = _cuda_include_dir()
    if HOST_CXX is None or cuda_include is None or not (Path(python_include) / "Python.h").exists():
        return None
    system_includes = [*include_paths(), python_include, str(cuda_include)]
    return [
        HOST_CXX,
        "-std=c++20",
        "-fsyntax-only",
        "-Wall",
        "-Wextra",
        "-Werror",
        # CPU wheels do not ship the generated c10/cuda/impl/cuda_cmake_macros.h.
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        "-DTORCH_EXTENSION_NAME=_modus_attn",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        *(flag for include in system_includes for flag in ("-isystem", str(include))),
        str(SOURCE_DIR / "modus_attn_api.cpp"),
    ]


@pytest.fixture(scope="module")
def compilations(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, subprocess.Popen]]:
    """Every compilation of this module, started together."""
    if NVCC is None:
        pytest.skip("nvcc is not on PATH")
    out_dir = tmp_path_factory.mktemp("nvcc")
    jobs: dict[str, subprocess.Popen] = {}
    for source in CUDA_SOURCES:
        jobs[source] = subprocess.Popen(
            _nvcc_command(source, out_dir / f"{source}.o"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    api_command = _api_command()
    if api_command is not None:
        jobs["api"] = subprocess.Popen(
            api_command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    yield jobs
    for job in jobs.values():
        if job.poll() is None:
            job.kill()
            job.wait()


def _finish(job: subprocess.Popen) -> tuple[int, str]:
    output, _ = job.communicate(timeout=600)
    return job.returncode, output


def test_sources_are_found() -> None:
    assert set(CUDA_SOURCES) == {"attn_fwd.cu", "attn_bwd.cu", "block_metadata.cu"}


@pytest.mark.parametrize("source", CUDA_SOURCES)
def test_cuda_source_compiles(compilations: dict[str, subprocess.Popen], source: str) -> None:
    returncode, output = _finish(compilations[source])
    assert returncode == 0, f"nvcc failed on {source} (sm_90a + sm_80):\n{output}"
    assert "warning" not in output.lower(), output


def test_binding_compiles(compilations: dict[str, subprocess.Popen]) -> None:
    if "api" not in compilations:
        pytest.skip("no host compiler, Python headers or torch headers for the binding check")
    returncode, output = _finish(compilations["api"])
    assert returncode == 0, f"modus_attn_api.cpp does not compile:\n{output}"
