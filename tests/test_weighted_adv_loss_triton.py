"""The Triton backend on CPU: test_weighted_adv_loss.py again, in a subprocess with TRITON_INTERPRET=1;
and the kernels importable installed and from a source tree.

The variable only takes effect if it is set before triton is imported, which in this pytest process
has usually happened already; a fresh interpreter makes the run independent of test order.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="TRITON_INTERPRET=1 already: test_weighted_adv_loss.py covers triton here")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, triton runs in the main test file")
def test_triton_interpreter_backend():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    test_file = Path(__file__).with_name("test_weighted_adv_loss.py")
    # The compile test and the torch/ext-only cases add nothing for triton; "triton" selects its ids.
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file),
                          "-k", "triton"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout, run.stdout[-4000:]


# pwda_fast.kernels must import both from an installed package (pyproject.toml maps the top-level
# kernels/ there) and from a bare source tree on PYTHONPATH (pwda_fast/kernels/__init__.py points there),
# and the backend probe must import the kernel module itself: "auto" must never pick a triton whose
# kernels cannot load.
ROOT = Path(__file__).resolve().parents[1]
# Drops the editable install's finder, so only the tree on PYTHONPATH can provide pwda_fast.
_PROBE = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
import pwda_fast, pwda_fast.kernels.weighted_adv_loss as k
from pwda_fast import ops
print(pwda_fast.__file__)
print(k.__file__)
print(ops.LOSS.problem("triton", "cuda"))
"""


def _probe(tree: Path, cwd: Path) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-c", _PROBE], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.splitlines()[-3:]


def test_kernels_import_from_a_source_tree(tmp_path):
    pytest.importorskip("triton")
    package, kernel, problem = _probe(ROOT, tmp_path)
    assert Path(package) == ROOT / "pwda_fast" / "__init__.py"
    assert Path(kernel) == ROOT / "kernels" / "weighted_adv_loss.py"
    assert problem == "None"


def test_kernels_import_from_the_installed_layout(tmp_path):
    """setup.py build_py lays the package out as a wheel installs it (package-dir mapping included)."""
    pytest.importorskip("triton")
    lib = tmp_path / "lib"
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(lib)], cwd=ROOT,
                           env={**os.environ, "PWDA_FAST_SKIP_EXT": "1"}, capture_output=True, text=True,
                           timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    # The source-tree stand-in is not part of the installed package: kernels/ takes its place.
    installed_init = (lib / "pwda_fast" / "kernels" / "__init__.py").read_text()
    assert installed_init == (ROOT / "kernels" / "__init__.py").read_text()
    package, kernel, problem = _probe(lib, tmp_path)
    assert Path(package) == lib / "pwda_fast" / "__init__.py"
    assert Path(kernel) == lib / "pwda_fast" / "kernels" / "weighted_adv_loss.py"
    assert problem == "None"


def test_probe_imports_the_kernel_module(monkeypatch):
    """A triton that imports but kernels that do not: the probe says so and "auto" on CUDA skips triton."""
    from pwda_fast import ops

    monkeypatch.setitem(sys.modules, "pwda_fast.kernels.weighted_adv_loss", None)
    problem = ops.LOSS.problem("triton", "cuda")
    assert problem is not None and "pwda_fast.kernels.weighted_adv_loss" in problem
    assert ops.LOSS.resolve("auto", "cuda") != "triton"
    with pytest.raises(RuntimeError, match="cannot import its kernels"):
        ops.LOSS.resolve("triton", "cuda")


def _specialisation_keys(cases):
    """The compile-cache key triton's launcher would build for the fused kernel on an sm_90 GPU, per case
    (seg shape, seg memory format, dtype): computed on the CPU with the CUDA backend's binder."""
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from pwda_fast.kernels import weighted_adv_loss as k

    try:
        backend = make_backend(GPUTarget("cuda", 90, 32))
    except Exception as e:  # a triton without its NVIDIA backend
        pytest.skip(f"triton's CUDA backend is not available here: {e}")
    kernel = k._weighted_adv_loss_fwd_kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    keys = []
    for shape, fmt, dtype in cases:
        n, c, h, w = shape
        seg = torch.empty(shape, dtype=dtype).contiguous(memory_format=fmt)
        disc = torch.empty((n, 1, max(1, h // 4), max(1, w // 4)), dtype=dtype)
        maps = (*disc.stride()[::2], *disc.stride()[3:], *disc.shape[2:], 0.5, 0.5)
        _, spec, _ = binder(seg, disc, disc, torch.empty(1), torch.empty(1), n * h * w, c, h, w,
                            *seg.stride(), *maps, *maps, 1.0, 0.9, 0.01, 0.1, 1.0 / (n * h * w),
                            HAS_AUX=True, UP_DISC=True, UP_AUX=True, INDEX_64=False, BLOCK=1024)
        keys.append(str(spec))
    return keys


def test_triton_compiles_once_per_layout_not_per_shape():
    """Specialising on sizes once gave ~78 compiles across the GPU tests, one per size pattern. Sizes
    are not specialised now: every test shape (odd, 1-pixel rows, production) shares one variant per
    layout and dtype. (A 1x1 image has stride 1 along C and W at once: one more variant, as it should
    be.)"""
    shapes = [(1, 19, 97, 131), (2, 3, 5, 7), (1, 19, 1, 1), (3, 2, 1, 9), (2, 19, 33, 40),
              (4, 19, 512, 1024), (4, 19, 64, 128)]
    for dtype in (torch.float32, torch.bfloat16):
        nchw = _specialisation_keys([(s, torch.contiguous_format, dtype) for s in shapes if s[2] * s[3] > 1])
        cl = _specialisation_keys([(s, torch.channels_last, dtype) for s in shapes if s[2] * s[3] > 1])
        assert len(set(nchw)) == 1 and len(set(cl)) == 1 and nchw[0] != cl[0]
