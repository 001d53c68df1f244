"""Test set-up. Triton's interpreter must be switched on before triton is first imported (torch.compile
imports it too), so this runs before any test module imports torch."""
import os
import shutil

if not shutil.which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "fastdmtg-inductor"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _threads():
    # 2-core CI machine: keep intra-op threads bounded so parallel test processes don't thrash
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
