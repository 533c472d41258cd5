import re
from pathlib import Path

from setuptools import find_packages, setup

# The version lives in one place: t5vh_fast/__init__.py.
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (Path(__file__).parent / "t5vh_fast" / "__init__.py").read_text(), re.M
).group(1)

# onnxruntime-gpu has wheels for x86-64 Linux and Windows only; elsewhere (macOS, ARM) use the
# plain CPU package. Never both: they install the same module and overwrite each other.
_GPU_WHEELS = (
    "(platform_system == 'Linux' or platform_system == 'Windows')"
    " and (platform_machine == 'x86_64' or platform_machine == 'AMD64')"
)
_NO_GPU_WHEELS = (  # the exact complement of _GPU_WHEELS (markers have no "not")
    "(platform_system != 'Linux' and platform_system != 'Windows')"
    " or (platform_machine != 'x86_64' and platform_machine != 'AMD64')"
)

setup(
    name="t5vh_fast",
    version=VERSION,
    description="Fast, parity-checked ONNX Runtime inference for T5 policies with a value head (PPO rollouts and scoring)",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    license="Apache-2.0",
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Operating System :: POSIX :: Linux",
        "Operating System :: MacOS",
        "Operating System :: Microsoft :: Windows",
        "Programming Language :: Python :: 3.9",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
    ],
    packages=find_packages(include=["t5vh_fast", "t5vh_fast.*"]),
    install_requires=[
        "numpy>=1.24",
        f"onnxruntime-gpu>=1.20; {_GPU_WHEELS}",
        f"onnxruntime>=1.20; {_NO_GPU_WHEELS}",
        "tokenizers>=0.15",
        "click>=8.0",
        "tqdm>=4.60",
    ],
    extras_require={
        # Install torch==2.13.0 first (pip install torch==2.13.0): an unpinned torch pulls a multi-GB CUDA build.
        "export": [
            "torch>=2.1",
            "transformers>=4.45,<4.58",
            "optimum~=2.1.0",
            "optimum-onnx==0.1.0",
            "onnx>=1.16",  # int8 graphs: opset 21 (blocked QuantizeLinear), IR 10
            "safetensors>=0.4",
            "sentencepiece>=0.1.99",
        ],
        "test": ["pytest>=7", "scipy>=1.10", "matplotlib>=3.6", "ruff==0.17.5"],
        "bench": ["matplotlib>=3.6", "ctranslate2>=4.0"],
        # CUDA 13 libraries as pip packages for onnxruntime-gpu 1.31 (built for CUDA 13). Its CUDA provider
        # links cudart, cuBLAS/cuBLASLt and cuRAND; its `cuda` extra brings cudart, NVRTC, cuFFT and cuRAND
        # but not cuBLAS, which only arrives through `cudnn` (nvidia-cudnn-cu13 requires nvidia-cublas), and
        # cuDNN itself only the TensorRT provider links. cuBLAS is named here so it does not hang on that.
        "gpu": [
            f"onnxruntime-gpu[cuda,cudnn]>=1.31,<1.32; {_GPU_WHEELS}",
            f"nvidia-cublas>=13,<14; {_GPU_WHEELS}",
        ],
        # TensorRT 10 for providers="tensorrt" (onnxruntime-gpu 1.31 links libnvinfer.so.10, not 11). PyPI has
        # a stub of it that fetches the wheel from NVIDIA's own package index at install time.
        "tensorrt": [f"tensorrt-cu13-libs>=10.13,<11; {_GPU_WHEELS}"],
        # Batch scoring and rollouts on Ray Data (t5vh_fast.ray, t5vh-score --ray). Tested with 2.60; 2.51 is where
        # map_batches(compute=ActorPoolStrategy(...)), which t5vh_fast.ray uses, became the recommended form.
        "ray": ["ray[data]>=2.51,<3"],
    },
    entry_points={
        "console_scripts": [
            "t5vh=t5vh_fast.cli:main",
            "t5vh-export=t5vh_fast.cli:export_command",
            "t5vh-demo=t5vh_fast.cli:demo_command",
            "t5vh-sample=t5vh_fast.cli:sample_command",
            "t5vh-score=t5vh_fast.cli:score_command",
            "t5vh-bench=t5vh_fast.cli:bench_command",
        ]
    },
)
