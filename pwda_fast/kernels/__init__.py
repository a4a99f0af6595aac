"""Source-tree stand-in for `pwda_fast.kernels`, whose code lives in the top-level kernels/ directory.

An installed package (wheel or editable) gets kernels/ as pwda_fast.kernels through pyproject.toml's
package-dir mapping, and a wheel never contains this file. Run from a checkout (PYTHONPATH=<repo>, as
bench/gpu_check.sh and many research scripts do) there is no such mapping: pointing this package's
__path__ at kernels/ makes `import pwda_fast.kernels.weighted_adv_loss` load the same file either way.
"""

from pathlib import Path

__path__ = [str(Path(__file__).resolve().parents[2] / "kernels")]
