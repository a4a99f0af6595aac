"""Builds pwda_fast._C from csrc/ (the extension-cpp pattern).

C++ CPU sources always; CUDA sources when torch is a CUDA build and the CUDA toolkit is found (CUDA_HOME,
else the toolkit of the `nvcc` on PATH). PWDA_FAST_SKIP_EXT=1 skips the extension entirely (the package
still works on the torch backend); PWDA_FAST_NO_CUDA=1 builds the CPU kernel only. The extension is
optional: when it fails to build (no compiler, a CUDA toolkit that does not match torch), the install
warns and goes on without it (ops.LOSS.available() then says why "ext" is missing), unless
PWDA_FAST_REQUIRE_EXT=1 makes the failure fatal (`make` sets it: CI must build what it tests).
"""

import glob
import os
import re
import shutil
import subprocess

from setuptools import setup


def cuda_home_of_nvcc_on_path() -> str | None:
    """The toolkit root of the `nvcc` on PATH, through any wrapper script or symlink.

    torch guesses dirname(dirname(which nvcc)): /usr/local for a /usr/local/bin/nvcc wrapper that execs
    /usr/local/cuda-13.0/bin/nvcc, and then finds no CUDA headers there. nvcc's dry run prints the
    directory it really runs from (`#$ TOP=<toolkit>/bin/..`), whatever led to it.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        run = subprocess.run([nvcc, "-dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.+)$", run.stdout + run.stderr, re.MULTILINE)
    return os.path.realpath(m.group(1).strip()) if m else os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


ext_modules, cmdclass = [], {}
if os.environ.get("PWDA_FAST_SKIP_EXT", "0") != "1":
    # Before torch.utils.cpp_extension is imported: it fixes its CUDA_HOME at import time.
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and (found := cuda_home_of_nvcc_on_path()):
        os.environ["CUDA_HOME"] = found
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    use_cuda = (torch.version.cuda is not None and CUDA_HOME is not None and bool(cuda_sources)
                and os.environ.get("PWDA_FAST_NO_CUDA", "0") != "1")
    # -fno-trapping-math / -fno-math-errno change no result (no reassociation, unlike -ffast-math);
    # without them GCC keeps the CPU kernel's per-pixel selects scalar: 2.4x slower (C=19, 1 thread).
    # No -DPy_LIMITED_API here: py_limited_api=True makes torch add -DPy_LIMITED_API=0x030A0000 itself.
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    if use_cuda:
        # With a GPU visible, torch builds for that GPU's architecture. Without one (CI, build
        # hosts) it would build for every architecture it knows, ~5 minutes per arch on 2 cores:
        # sm_90 (H100/H200) alone proves the code compiles. Set TORCH_CUDA_ARCH_LIST for others.
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        ext = CUDAExtension("pwda_fast._C", sources + cuda_sources, py_limited_api=True,
                            extra_compile_args={"cxx": cxx + ["-DWITH_CUDA"],
                                                "nvcc": ["-O3", "--use_fast_math", "-DWITH_CUDA"]},
                            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("pwda_fast._C", sources, py_limited_api=True,
                           extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    class OptionalBuildExtension(BuildExtension):
        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as e:  # compiler or toolkit failures surface as several exception types
                if os.environ.get("PWDA_FAST_REQUIRE_EXT", "0") == "1":
                    raise
                bar = "=" * 78
                print(f"\n{bar}\nWARNING: pwda_fast._C (the C++/CUDA kernels) failed to build: "
                      f"{type(e).__name__}: {e}\nInstalling without it: the torch backend runs. Set "
                      f"PWDA_FAST_REQUIRE_EXT=1 to make this an error.\n{bar}\n", flush=True)

    if sources:
        ext_modules = [ext]
        cmdclass = {"build_ext": OptionalBuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass,
      options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {})
