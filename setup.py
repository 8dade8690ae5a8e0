"""Builds flashcore_hf._C: C++ CPU kernels always; CUDA kernels when torch has CUDA and nvcc is found.

Environment:
  FLASHCORE_FORCE_CPU=1        skip the CUDA kernels even when CUDA is available
  FLASHCORE_CUDA_ARCHS="90a"   comma/semicolon list of SM targets (e.g. "90a;80"); default 90a (Hopper)
  MAX_JOBS=N                   parallel compile jobs (ninja), respected by torch's cpp_extension
  NVCC_THREADS=N               nvcc --threads (default 2)
"""
import glob
import os
import re

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _cuda_wanted() -> bool:
    if os.environ.get("FLASHCORE_FORCE_CPU", "0") == "1":
        return False
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _gencode_flags(archs: str) -> list[str]:
    flags = []
    for arch in filter(None, re.split(r"[;, ]+", archs)):
        arch = arch.replace("sm_", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    if not flags:
        raise ValueError(f"FLASHCORE_CUDA_ARCHS={archs!r} names no architecture")
    return flags


def build_extension():
    cpu_sources = _rel(glob.glob(os.path.join(ROOT, "csrc/kernels/cpu/*.cpp")))
    binding_sources = ["csrc/bindings/ops.cpp", "csrc/bindings/sparse_ops.cpp", "csrc/bindings/growable_buffer.cpp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    # -fopenmp: at::parallel_for is a header template whose `#pragma omp parallel` compiles in our translation units;
    # without the flag every CPU op runs on one thread. Links libgomp.so.1, i.e. the copy torch already loaded.
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    link_flags = ["-fopenmp"]
    if not _cuda_wanted():
        return cpp_extension.CppExtension(
            "flashcore_hf._C", binding_sources + cpu_sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc/kernels/cuda/**/*.cu"), recursive=True))
    nvcc_flags = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
                  f"--threads={os.environ.get('NVCC_THREADS', '2')}",
                  *_gencode_flags(os.environ.get("FLASHCORE_CUDA_ARCHS", "90a"))]
    return cpp_extension.CUDAExtension(
        "flashcore_hf._C", binding_sources + ["csrc/bindings/ops_cuda.cpp"] + cpu_sources + cuda_sources,
        include_dirs=include_dirs, define_macros=[("FLASHCORE_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=link_flags)


setup(
    packages=["flashcore_hf", "flashcore_hf.patches", "flashcore_hf.sparse"],
    package_dir={"flashcore_hf": "flashcore_hf", "flashcore_hf.patches": "patches"},
    ext_modules=[build_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
