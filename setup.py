"""Install modus_mega. The CUDA extension in csrc/ is built only where CUDA is present.

CPU install (pins the CPU wheel of torch first; an unpinned torch pulls CUDA packages):
    pip install torch==2.13.0 && pip install --no-build-isolation -e .[test]
GPU install (torch with CUDA already installed):
    pip install --no-build-isolation -e .[gpu,test]
"""

import importlib.util
from pathlib import Path

from setuptools import find_packages, setup

# csrc/ is not a package: load its build helper by path. It returns no extension (and says
# why) where torch has no CUDA or nvcc is missing, or when MODUS_SKIP_CUDA_EXT=1.
_spec = importlib.util.spec_from_file_location("modus_csrc_build", Path(__file__).resolve().parent / "csrc" / "build.py")
_csrc_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_csrc_build)

RUNTIME_REQUIREMENTS = [
    "torch>=2.6",
    "deepspeed>=0.16",
    "megatron-core>=0.12,<0.17",
    "torchao>=0.18",  # FP8 linears (training.precision = "fp8"); pure Python, runs on CPU
    "transformers>=5.0",
    "safetensors>=0.4",
    "einops>=0.7",
    "webdataset>=0.2.90",
    "wandb>=0.17",
    "tokenizers>=0.19",
    "numpy>=1.24",
    "pillow>=10",
    "opencv-python-headless>=4.8",
    "matplotlib>=3.7",
    "tqdm>=4.66",
    "scipy>=1.10",
    "pycocotools>=2.0.7",
]

EXTRAS = {
    "gpu": ["transformer-engine[pytorch]>=1.12", "flash-attn>=2.6"],
    "test": ["pytest>=8", "diffusers>=0.30", "torchmetrics>=1.4", "faster-coco-eval>=1.6", "scikit-learn>=1.3"],
}

setup(
    name="modus_mega",
    version="0.1.0",
    description="Trains MODUS, an any-to-any mixture-of-transformers over 15 modalities, at scale.",
    packages=find_packages(include=["modus_mega", "modus_mega.*"]),
    python_requires=">=3.10",
    install_requires=RUNTIME_REQUIREMENTS,
    extras_require=EXTRAS,
    ext_modules=_csrc_build.cuda_extensions(),
    cmdclass=_csrc_build.build_ext_cmdclass(),
)
