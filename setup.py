"""Packaging for flex_model. Runtime needs torch, safetensors and tqdm; extras are read from requirements/."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def requirements(name: str) -> list:
    lines = (HERE / "requirements" / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


extras = {name: requirements(f"{name}.txt") for name in ("test", "examples", "docs", "benchmarks")}
extras["all"] = sorted({req for reqs in extras.values() for req in reqs})

setup(
    name="flex_model",
    version="0.2.0",
    description="Retrieve and edit full, unsharded activations and gradients of sharded PyTorch models",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["flex_model", "flex_model.*"]),
    python_requires=">=3.11",  # exception notes (PEP 678)
    install_requires=requirements("requirements.txt"),
    extras_require=extras,
)
