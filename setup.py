"""Build script: the Python package always; the CUDA extension ``mmict_kernels._C`` when torch has CUDA.

    pip install -e . --no-build-isolation

The extension compiles ``csrc/**/*.cu`` (torch-free kernels) and ``python/*.cpp`` (op
registration) with nvcc. Without a CUDA torch or toolkit the package installs without it and
says so in one line; Triton and the PyTorch reference then serve every op.

Environment:
    MMICT_KERNELS_CUDA_ARCHS   semicolon list, default "90a;80" (e.g. "90a" for a quick Hopper build)
    MMICT_KERNELS_NO_CUDA=1    skip the extension even with a CUDA torch
    MAX_JOBS                   parallel nvcc jobs (torch's ninja build)
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _gencode_flags(archs: str) -> list[str]:
    flags = []
    for arch in filter(None, (a.strip() for a in archs.split(";"))):
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def _cuda_extension():
    if os.environ.get("MMICT_KERNELS_NO_CUDA", "0") == "1":
        return None, "MMICT_KERNELS_NO_CUDA=1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    except Exception as exc:  # pragma: no cover
        return None, f"torch is not importable ({exc}); install torch first and build with --no-build-isolation"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return None, "no CUDA toolkit (nvcc) found"
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    sources += sorted(glob.glob(os.path.join("python", "*.cpp")))
    archs = os.environ.get("MMICT_KERNELS_CUDA_ARCHS", "90a;80")
    # No -std flag: torch's BuildExtension adds the standard its headers need (C++17 up to
    # torch 2.9, C++20 from 2.10); csrc/ itself is C++17 and compiles under both.
    nvcc_flags = [
        "-O3",
        "--use_fast_math",
        "--expt-relaxed-constexpr",
        "-lineinfo",
        *_gencode_flags(archs),
    ]
    ext = CUDAExtension(
        name="mmict_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        # The registry reads the built architectures back (mmict_kernels._C.cuda_archs) to refuse GPUs they cannot run on.
        define_macros=[("MMICT_KERNELS_CUDA_ARCHS", '"' + ";".join(a.strip() for a in archs.split(";") if a.strip()) + '"')],
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )
    return ext, None


ext, why_not = _cuda_extension()
cmdclass = {}
if ext is not None:
    from torch.utils.cpp_extension import BuildExtension

    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)
    ext_modules = [ext]
else:
    ext_modules = []
    # pip runs this file once for metadata (egg_info / dist_info) and once to build: say it once.
    if not any(cmd in sys.argv for cmd in ("egg_info", "dist_info")):
        print(
            f"mmict_kernels: installing without the CUDA extension ({why_not}); Triton and the PyTorch reference serve every op.",
            file=sys.stderr,
        )

setup(ext_modules=ext_modules, cmdclass=cmdclass)
