"""Build entry for regkern.

The pure-Python package always installs. The optional CUDA extension ``regkern._C`` (csrc/) is added by the CUDA
backend issue; until then ``REGKERN_BUILD_CUDA`` is accepted and ignored, and nothing here needs a GPU.
"""

from setuptools import find_packages, setup

setup(
    name="regkern",
    version="0.1.0",
    description="Fused GPU attention kernels for Vision Transformers with register tokens",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["regkern", "regkern.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.3", "triton", "timm>=1.0.20", "torchvision", "numpy", "ninja", "safetensors", "matplotlib", "tqdm"],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4"],
        "xformers": ["xformers"],
    },
    entry_points={"console_scripts": ["regkern=regkern.cli:main"]},
)
