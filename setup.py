"""Builds flashcore_hf._C: C++ CPU kernels always; CUDA kernels when torch has CUDA and nvcc is found.

Environment:
  FLASHCORE_FORCE_CPU=1        skip the CUDA kernels even when CUDA is available
  FLASHCORE_CUDA_ARCHS="90a"   comma/semicolon list of SM targets (e.g. "90a;80"); default 90a (Hopper)
  MAX_JOBS=N                   parallel compile jobs (ninja), respected by torch's cpp_extension
  NVCC_THREADS=N               nvcc --threads (default 2)

Objects are kept in build/<key>/ (not a temporary directory), so ninja recompiles only what changed: a second
`pip install -e .` (e.g. with ".[test]") relinks without compiling. The key names the Python, torch and CUDA setup
the objects were compiled for, so another torch, CUDA toolkit or arch list builds in its own directory instead of
reusing stale objects. `rm -rf build/` forces a full rebuild. Progress (a line per compiled file with ninja's
`[done/total, elapsed]`, and every 15 s a count of the objects written so far) reaches the terminal with
`pip install -v`; pip hides a build's output otherwise.
"""
import glob
import hashlib
import os
import re
import sys
import sysconfig
import threading
import time

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


def build_key(cuda: bool) -> str:
    """The directory name, under build/, for objects compiled with this setup: readable parts (platform, Python,
    torch version, CUDA version or cpu) plus a hash of everything else the objects depend on beyond their sources and
    the compile commands (which ninja tracks itself): torch's location and ABI, the CUDA toolkit, arch list, compilers.
    """
    import torch

    archs = os.environ.get("FLASHCORE_CUDA_ARCHS", "90a") if cuda else ""
    facts = [sys.implementation.cache_tag, sysconfig.get_platform(), torch.__version__, str(torch.version.cuda),
             os.path.dirname(torch.__file__), str(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", "")),
             str(cpp_extension.CUDA_HOME if cuda else ""), archs,
             *(os.environ.get(name, "") for name in ("CC", "CXX", "CFLAGS", "CXXFLAGS", "LDFLAGS", "NVCC_PREPEND_FLAGS",
                                                     "NVCC_APPEND_FLAGS"))]
    digest = hashlib.sha256("\0".join(facts).encode()).hexdigest()[:10]
    device = f"cu{torch.version.cuda}-sm{re.sub(r'[^0-9a-z]+', '_', archs)}" if cuda else "cpu"
    name = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}-torch{torch.__version__}-{device}-{digest}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension (ninja) with a persistent object directory, build/<build_key>/, and a progress header.

    pip's editable and wheel builds point build_temp at a fresh temporary directory, so every install compiled
    everything again; here it is replaced by the persistent directory unless given explicitly
    (`setup.py build_ext --build-temp DIR`).
    """

    def initialize_options(self) -> None:
        super().initialize_options()
        self._build_temp_given = False

    def finalize_options(self) -> None:
        self._build_temp_given = self.build_temp is not None
        super().finalize_options()
        if not self._build_temp_given:
            self.build_temp = os.path.join(ROOT, "build", build_key(_cuda_wanted()))

    def build_extensions(self) -> None:
        # ninja prefixes each compile line with this status; shown by `pip install -v` (or `setup.py build_ext`).
        os.environ.setdefault("NINJA_STATUS", "[flashcore %f/%t, %es] ")
        sources = sum(len(ext.sources) for ext in self.extensions)
        jobs = (f"MAX_JOBS={os.environ['MAX_JOBS']}" if os.environ.get("MAX_JOBS")
                else "ninja's default job count (set MAX_JOBS to change)")
        print(f"flashcore_hf._C: {sources} sources, objects in {os.path.relpath(self.build_temp, ROOT)} "
              f"(reused when unchanged), {jobs}", flush=True)
        start = time.time()
        stop = threading.Event()
        reporter = threading.Thread(target=self._report_progress, args=(start, stop), daemon=True)
        reporter.start()
        try:
            super().build_extensions()
        finally:
            stop.set()
            reporter.join()
        print(f"flashcore_hf._C: compiled and linked in {time.time() - start:.0f} s", flush=True)

    def _report_progress(self, start: float, stop: threading.Event, every: float = 15.0) -> None:
        """Every `every` seconds until `stop`: how many objects this build has written so far. ninja prints a line
        only when a file is done, and the files that include torch's headers take minutes each on a small machine."""
        while not stop.wait(every):
            objects = glob.glob(os.path.join(self.build_temp, "**", "*.o"), recursive=True)
            written = sum(1 for path in objects if os.path.getmtime(path) >= start)
            print(f"flashcore_hf._C: compiling, {written} object(s) written so far, {time.time() - start:.0f} s "
                  "elapsed", flush=True)


def build_extension():
    cpu_sources = _rel(glob.glob(os.path.join(ROOT, "csrc/kernels/cpu/*.cpp")))
    binding_sources = ["csrc/bindings/ops.cpp", "csrc/bindings/sparse_ops.cpp", "csrc/bindings/linear_ops.cpp",
                       "csrc/bindings/growable_buffer.cpp"]
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
    packages=["flashcore_hf", "flashcore_hf.cache", "flashcore_hf.hf", "flashcore_hf.ops", "flashcore_hf.patches",
              "flashcore_hf.sparse"],
    package_dir={"flashcore_hf": "flashcore_hf", "flashcore_hf.patches": "patches"},
    ext_modules=[build_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
