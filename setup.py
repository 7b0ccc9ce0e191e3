"""Builds lmarith: the Python packages from engine/, kernels/, bindings/ and the
native extension lmarith._C from csrc/ through CMakeLists.txt (pybind11)."""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
ENGINE_PACKAGES = ["formula", "core", "kv_cache", "worker", "decoding", "decoding.speculative", "decoding.nudging", "models",
                   "models.loading",
                   "entrypoints", "entrypoints.openai"]


def _torch_has_cuda() -> bool:
    """CUDA sources are built only beside a CUDA torch (CMake still checks for nvcc)."""
    try:
        import torch
    except ImportError:
        return False
    return torch.version.cuda is not None


class CMakeExtension(Extension):
    """An extension whose sources CMake compiles; setuptools only places the result."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt into the directory setuptools expects."""

    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        config = "Debug" if self.debug else "Release"
        configure = [
            "cmake", str(ROOT),
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={config}",
        ]
        if _torch_has_cuda():
            configure.append("-DLMARITH_CUDA=ON")
        configure += os.environ.get("LMARITH_CMAKE_ARGS", "").split()
        jobs = str(os.cpu_count() or 2)
        subprocess.run(configure, cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--config", config, "-j", jobs],
                       cwd=build_dir, check=True)


setup(
    name="lmarith",
    version="0.1.0",
    description="Composed decoding: formulas over several language models, served fast.",
    python_requires=">=3.10",
    packages=["lmarith", *[f"lmarith.{name}" for name in ENGINE_PACKAGES],
              "lmarith.kernels", "lmarith.bindings"],
    package_dir={
        "lmarith": "engine",
        **{f"lmarith.{name}": f"engine/{name.replace('.', '/')}" for name in ENGINE_PACKAGES},
        "lmarith.kernels": "kernels",
        "lmarith.bindings": "bindings",
    },
    ext_modules=[CMakeExtension("lmarith._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch==2.13.0", "triton==3.6.0", "numpy==2.3.5", "transformers==5.23.0",
        "tokenizers==0.23.3", "safetensors==0.8.0", "huggingface-hub==2.4.0",
        "accelerate==1.15.0", "gguf==0.19.0", "pybind11==3.1.0",
        "fastapi==0.163.2", "uvicorn==0.54.0", "httptools==0.8.0", "uvloop==0.23.0",
        "prometheus-client==0.26.0", "tqdm==4.70.1", "matplotlib==3.11.2",
    ],
    extras_require={"test": ["pytest==9.2.0", "pytest-benchmark==5.3.1", "hypothesis==6.155.2",
                             "httpx==0.28.1", "openai==3.57.0"],
                    "ray": ["ray[serve]==2.60.0"]},
    entry_points={"console_scripts": ["lmarith=lmarith.entrypoints.cli:main"]},
)
