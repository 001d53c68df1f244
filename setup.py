"""fastdmtg: fast one-shot differentiable multi-task grouping (DMTG) in PyTorch.

`kernels/` and `pipelines/` live at the repository root (as the product layout asks) but are
installed *inside* the fastdmtg namespace (`fastdmtg.kernels`, `fastdmtg.pipelines`) so they never
shadow unrelated PyPI packages called `kernels` or `pipelines`.
"""
from setuptools import find_packages, setup

setup(
    name="fastdmtg",
    version="0.1.0",
    description="High-performance PyTorch trainer for multi-task grouping (DMTG and baselines)",
    python_requires=">=3.10",
    # every package folder of fastdmtg/ (found, not listed: a list kept by hand had left out
    # fastdmtg.baselines, so a non-editable install had no compare baselines), plus the two at the root
    packages=["fastdmtg", *("fastdmtg." + p for p in find_packages("fastdmtg")),
              "fastdmtg.kernels", "fastdmtg.pipelines"],
    package_dir={
        "fastdmtg": "fastdmtg",
        "fastdmtg.kernels": "kernels",
        "fastdmtg.pipelines": "pipelines",
    },
    install_requires=[
        # A range, not a pin: a GPU user's pip picks a CUDA build. CI installs the CPU build first.
        "torch>=2.4",
        "numpy>=1.24",
        "pillow>=9",
        "tqdm>=4.60",
        "safetensors>=0.4",
        "matplotlib>=3.6",
        "tensorboard>=2.12",
    ],
    extras_require={
        "dev": ["pytest>=7", "pytest-timeout>=2", "fvcore>=0.1.5", "radon>=6"],
        "triton": ["triton>=3.0"],
        # DALI: the CUDA-13 wheel (smaller); CUDA-12 users: pip install nvidia-dali-cuda120==2.4.0
        "dali": ["nvidia-dali-cuda130==2.4.0"],
        # FFCV is an sdist: needs Debian pkg-config libopencv-dev libturbojpeg0-dev libgl1 libglib2.0-0
        # (it already requires opencv-python; a second cv2 distribution would clash)
        "ffcv": ["ffcv==1.0.2", "numba>=0.57"],
        # trackers next to TensorBoard (--logger; docs/trackers.md). MLflow: the client (mlflow-skinny) and
        # SQLAlchemy + Alembic for MLflow's default local store (sqlite:///mlflow.db); the UI is the full
        # `mlflow` package (pip install mlflow)
        "mlflow": ["mlflow-skinny>=3.7", "sqlalchemy>=1.4,<3", "alembic>=1.8,!=1.10.0,<2"],
        "wandb": ["wandb>=0.20"],
        # fastdmtg export --format onnx (torch's exporter writes with onnxscript); onnxruntime runs the file
        "export": ["onnx>=1.16", "onnxscript>=0.3", "onnxruntime>=1.18"],
        # the gradient aggregators (pcgrad, mgda, cagrad, nash-mtl, imtl, aligned-mtl, upgrad;
        # fastdmtg/methods/aggregators.py) with the solvers CAGrad, Nash-MTL and UPGrad need
        "aggregators": ["torchjd[cagrad,nash-mtl,quadprog-projector]>=0.18,<0.19"],
        # fastdmtg compare --executor ray (fastdmtg/compare_plan.py; docs/cluster.md): every run a Ray task
        "ray": ["ray>=2.9"],
    },
    entry_points={"console_scripts": ["fastdmtg=fastdmtg.cli:main"]},
)
