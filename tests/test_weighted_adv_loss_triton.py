"""The Triton backend on CPU: test_weighted_adv_loss.py again, in a subprocess with TRITON_INTERPRET=1.

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
