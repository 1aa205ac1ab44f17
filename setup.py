from setuptools import find_packages, setup

# torch is pinned exactly: an unpinned or ranged torch pulls a multi-GB CUDA build on a CPU machine.
TORCH = "torch==2.13.0"
TRITON = "triton==3.9.0; platform_system == 'Linux'"

setup(
    name="eqm-fast",
    version="0.1.0",
    description="Fast Equilibrium Matching (EqM) and energy-based normalizing flows (EBFlow) with Triton kernels",
    # The kernels/ and bench/ folders install as eqm_kernels and eqm_bench: "kernels" is taken on the public index.
    packages=find_packages(include=["eqm", "eqm.*"]) + ["eqm_kernels", "eqm_bench"],
    package_dir={"eqm_kernels": "kernels", "eqm_bench": "bench"},
    python_requires=">=3.10",
    install_requires=[TORCH, TRITON, "numpy", "tqdm", "pillow", "scikit-learn", "matplotlib"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "torchdiffeq==0.2.5"],  # the ODE sampler's tests need it
        "ode": ["torchdiffeq==0.2.5"],  # --sampler ode (eqm.sampling)
        "vae": ["diffusers"],
        "dali": ["nvidia-dali-cuda120"],
        "gpu": ["flash-attn"],
        # bench/vs_torchebm.py's peer; its one dependency, torch>=2.10, is met by the pinned torch above
        "peers": ["torchebm==0.8.9"],
    },
    entry_points={
        "console_scripts": [
            "eqm-train=eqm.train:main",
            "eqm-sample=eqm.sample:main",
            "eqm-extract-latents=eqm.extract_latents:main",
            "eqm-ebflow=eqm.ebflow.train:main",
        ]
    },
)
