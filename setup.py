"""ring_jax: the Ring-1T RL system (IcePop, C3PO++, ASystem-style SPMD) in JAX/Flax."""
import setuptools

CORE = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "chex>=0.1.90,<0.2",
    "grain>=0.2.18,<0.3",
    "absl-py>=2.1,<3",
    "ml-collections>=1.0,<2",
    "numpy>=2.0,<3",
    "safetensors>=0.4,<1",
    "tokenizers>=0.20,<1",
    "math-verify>=0.8,<1",
    "tensorboardX>=2.6,<3",
    "matplotlib>=3.8,<4",
]

EXTRAS = {
    "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "hypothesis>=6.100,<7"],
    # Reference implementation for parity tests (transformers' glm4_moe is the Ling 2.0 family).
    # torch==2.13.0 is the CPU wheel available locally; a looser pin would pull a CUDA build.
    "parity": ["torch==2.13.0", "transformers>=5.0,<6"],
    # Ahead-of-time compilation for TPU topologies on any machine (`python -m ring_jax.plan`):
    # the TPU compiler, pinned as jax[tpu]==0.10.2 pins it.
    "tpu-aot": ["libtpu==0.0.42.*"],
    # Optional procedural task generators.
    "gym": ["reasoning-gym>=0.1.25,<0.2"],
    # The peer framework of `experiments/benchmarks/rl_step.py --peer=tunix` (not in CI).
    "peer": ["google-tunix==0.1.7"],
}

setuptools.setup(
    name="ring_jax",
    version="0.1.0",
    description=__doc__,
    packages=setuptools.find_packages(include=["ring_jax", "ring_jax.*"]),
    package_data={"ring_jax": ["data/bundled/*.jsonl"]},
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require=EXTRAS,
)
