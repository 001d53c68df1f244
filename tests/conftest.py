"""Test set-up. Triton's interpreter must be switched on before triton is first imported (torch.compile
imports it too), so this runs before any test module imports torch: on a machine without a CUDA GPU
the Triton kernels run under ``TRITON_INTERPRET=1``; on a GPU machine the same command runs them (and
the GPU-only tests) on the GPU. An explicit ``TRITON_INTERPRET`` in the environment is kept."""
import os
import shutil
import subprocess


def has_cuda_gpu() -> bool:
    """A CUDA GPU this process may use, found without importing torch (which would import triton):
    ``nvidia-smi -L`` lists one, ``CUDA_VISIBLE_DEVICES`` does not hide them all, and the installed torch
    is not a CPU-only build (the README's CPU install on a GPU machine: kernels must run interpreted)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    from importlib import metadata
    try:
        if metadata.version("torch").endswith("+cpu"):
            return False
    except metadata.PackageNotFoundError:
        return False
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return any(line.startswith("GPU ") for line in out.splitlines())


INTERPRET_SET_HERE = "TRITON_INTERPRET" not in os.environ and not has_cuda_gpu()
if INTERPRET_SET_HERE:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "fastdmtg-inductor"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _threads():
    # 2-core CI machine: keep intra-op threads bounded so parallel test processes don't thrash
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
