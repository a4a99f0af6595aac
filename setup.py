"""Builds pwda_fast._C from csrc/ (the extension-cpp pattern).

C++ CPU sources always; CUDA sources when torch is a CUDA build and the CUDA toolkit is found.
PWDA_FAST_SKIP_EXT=1 skips the extension entirely (the package still works on the torch backend).
"""

import glob
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("PWDA_FAST_SKIP_EXT", "0") != "1":
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    use_cuda = (torch.version.cuda is not None and CUDA_HOME is not None and bool(cuda_sources)
                and os.environ.get("PWDA_FAST_NO_CUDA", "0") != "1")
    # -fno-trapping-math / -fno-math-errno change no result (no reassociation, unlike -ffast-math);
    # without them GCC keeps the CPU kernel's per-pixel selects scalar: 2.4x slower (C=19, 1 thread).
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-DPy_LIMITED_API=0x030a0000"]
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
    if sources:
        ext_modules = [ext]
        cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass,
      options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {})
