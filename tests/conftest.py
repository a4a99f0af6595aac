import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def toy_data_root(tmp_path_factory):
    """One toy-domain cache for the whole session (generated once, ~10 s), unless one is given."""
    if not os.environ.get("PWDA_FAST_DATA"):
        os.environ["PWDA_FAST_DATA"] = str(tmp_path_factory.mktemp("pwda_data"))
    return os.environ["PWDA_FAST_DATA"]


@pytest.fixture(scope="module")
def batches(request):
    """Two (source, target) toy batches of 2 at the test module's BATCH_CROP (H, W), built once a module."""
    from helpers import toy_batches

    return toy_batches(request.module.BATCH_CROP)


@pytest.fixture
def one_thread():
    """One intra-op thread: on the 2 shared cores a second one only adds contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_terminal_summary(terminalreporter):
    """Under bench/gpu_check.sh (PWDA_BENCH_ROWS set): this test step's counts and the failures' first
    lines as one "pytest" fact row of its rows file (bench/rows.py), which its summary shows."""
    path = os.environ.get("PWDA_BENCH_ROWS")
    if not path:
        return
    import json

    stats = terminalreporter.stats
    kinds = ("passed", "failed", "error", "skipped", "deselected")
    counts = {k: len(v) for k, v in stats.items() if k in kinds}
    failures = [f"{r.nodeid}: {' '.join(str(getattr(r.longrepr, 'reprcrash', r.longrepr)).split())[:200]}"
                for r in stats.get("failed", []) + stats.get("error", [])]
    with open(path, "a") as f:
        f.write(json.dumps({"kind": "fact", "name": "pytest", "step": os.environ.get("PWDA_BENCH_STEP"),
                            "counts": counts, "failures": failures[:20]}) + "\n")
