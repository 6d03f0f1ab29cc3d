"""tokentrim: fused Triton kernels + a streamlined Wan2.1 AR rollout with TokenTrim."""

import os
import shlex
import shutil
import sys
import sysconfig

from setuptools import setup

NATIVE_DOC = "README.md#native-extension-tokentrim_c"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


# pip runs setup.py once for metadata and once to build: speak only in the build.
_BUILDING = any(cmd in sys.argv for cmd in ("build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"))


def _warn(msg: str) -> None:
    """The one build-time warning of the native extension (stderr; `pip install -v` shows it)."""
    if _BUILDING:
        print(f"WARNING: tokentrim: {msg}; the pure-PyTorch paths are used instead (see {NATIVE_DOC})", file=sys.stderr)


def _compiler_found() -> bool:
    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    words = shlex.split(cxx)
    return bool(words) and shutil.which(words[0]) is not None


def native_extensions():
    """(ext_modules, cmdclass) for tokentrim._C (C++ CPU kernels) and, when torch has CUDA and nvcc
    is found, tokentrim._C_cuda (the CUB drift top-k stage). Empty when skipped: TOKENTRIM_NO_EXT=1,
    no C++ compiler, or torch not importable here (pip's build isolation: use
    ``pip install --no-build-isolation``). A failed compile warns once and installs without it."""
    if _flag("TOKENTRIM_NO_EXT"):
        if _BUILDING:
            print("tokentrim: TOKENTRIM_NO_EXT is set, native extension tokentrim._C not built", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _warn(
            "torch is not importable where setup.py runs (pip's isolated build environment?), so the native "
            "extension tokentrim._C is not built; build it with `pip install --no-build-isolation -e .`"
        )
        return [], {}
    if not _compiler_found():
        _warn("no C++ compiler found (set CXX), so the native extension tokentrim._C is not built")
        return [], {}

    version = [("TOKENTRIM_TORCH_VERSION", f'"{torch.__version__}"')]
    cxx_flags = ["-O2", "-fopenmp"]  # OpenMP: at::parallel_for's threads (torch's own libgomp at run time)
    exts = [
        cpp_extension.CppExtension(
            "tokentrim._C",
            ["csrc/native.cpp"],
            define_macros=version,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else None
    if torch.version.cuda and nvcc and os.path.exists(nvcc) and not _flag("TOKENTRIM_NO_CUDA_EXT"):
        exts.append(
            cpp_extension.CUDAExtension(
                "tokentrim._C_cuda",
                ["csrc/cuda/drift_select.cu", "csrc/cuda/drift_select_binding.cpp"],
                define_macros=version,
                extra_compile_args={"cxx": ["-O2"], "nvcc": ["-O2"]},
            )
        )

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Build each extension on its own; one that fails is dropped with a warning, never fatal."""

        def run(self):
            # An error here is raised before any extension was built (compiler / CUDA setup). It is
            # retried once without _C_cuda: a CUDA setup error (e.g. nvcc vs torch CUDA version) must
            # not cost the CPU kernels.
            while True:
                try:
                    return super().run()
                except Exception as e:
                    _warn(f"building {', '.join(x.name for x in self.extensions)} failed ({type(e).__name__}: {e})")
                    rest = [x for x in self.extensions if x.name != "tokentrim._C_cuda"]
                    if len(rest) == len(self.extensions):
                        rest = []  # no _C_cuda left to drop: build none
                    self.extensions, self.distribution.ext_modules = rest, list(rest)
                    if not rest:
                        return

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # CompileError, LinkError, OSError, CalledProcessError...
                _warn(f"building {ext.name} failed ({type(e).__name__}: {e}), so it is not installed")
                self.extensions = [x for x in self.extensions if x is not ext]
                self.distribution.ext_modules = [x for x in self.distribution.ext_modules if x is not ext]

    return exts, {"build_ext": OptionalBuildExt.with_options(no_python_abi_suffix=False)}


EXT_MODULES, CMDCLASS = native_extensions()

setup(
    name="tokentrim",
    version="0.1.0",
    description="Fused Triton kernels for autoregressive long-video generation with TokenTrim drift pruning",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["tokentrim", "tokentrim.model", "tokentrim.rollout", "tokentrim.kernels"],
    package_dir={"tokentrim": "tokentrim", "tokentrim.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "einops",
        "numpy",
        "nvtx",
        "safetensors",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "dev": [
            "pytest",
            "pytest-benchmark",
            "hypothesis",
            "numpy",
            "einops",
            "nvtx",
            "ruff",
            "setuptools>=64",
            "wheel",  # the offline install (pip --no-build-isolation) of bench/gpu_check.sh builds here
            "diffusers>=0.33",
        ],
        "video": [
            "diffusers>=0.33",
            "transformers>=4.45",
            "sentencepiece",
            "imageio",
            "imageio-ffmpeg",
            "av",
        ],
    },
    entry_points={"console_scripts": ["tokentrim=tokentrim.cli:main"]},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
)
