from setuptools import find_packages, setup

setup(
    name="moe_edge",
    version="0.1.0",
    description="Collaborative Mixture-of-Experts inference across heterogeneous edge servers "
                "(JAX reference implementation).",
    packages=find_packages(include=["moe_edge", "moe_edge.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.5.0",
        "flax>=0.10.4",
        "optax>=0.2.4",
        "numpy>=1.26",
        "orbax-checkpoint>=0.11.0",
        "absl-py>=2.1",
        "scipy>=1.11",
        "matplotlib>=3.8",
        "safetensors>=0.4",
        "ml_collections>=1.0",
    ],
    extras_require={
        "test": ["pytest>=8.0"],
        # The Mosaic GPU grouped FFN (moe_edge/kernels): tokamax 0.0.17 needs Python >= 3.12
        # and jax >= 0.11.1, so the markers make the extra a no-op on older Pythons.
        "gpu": ["tokamax==0.0.17; python_version >= '3.12'",
                "jax>=0.11.1; python_version >= '3.12'"],
    },
)
