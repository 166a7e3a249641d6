"""--model resolution: folders and hub ids pass through, the demo alias and .gguf files convert once."""

import time

import pytest

from runner.errors import ModelLoadError
from runner.models import DEMO_HINT, ModelNotFoundError, demo_gguf, resolve_model


def test_folders_and_hub_ids_pass_through(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("gpt2") == "gpt2"
    assert resolve_model("rinna/japanese-gpt2-medium") == "rinna/japanese-gpt2-medium"


def test_missing_gguf_and_missing_demo_package_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="no GGUF file at"):
        resolve_model(str(tmp_path / "nope.gguf"))
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("smollm2-135m-instruct")
    assert DEMO_HINT in str(info.value) and isinstance(info.value, ModelLoadError)


def test_a_broken_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="cannot read GGUF file"):
        resolve_model(str(bad), cache_dir=tmp_path / "cache", progress=None)
    assert not any((tmp_path / "cache" / "models").glob("broken*"))  # no half-made cache entry counts


def test_demo_model_converts_once_then_loads_fast(runner_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert demo_gguf().is_file()
    path = resolve_model("smollm2-135m-instruct")  # converts (about 30 s) unless this session already did
    names = {p.name for p in __import__("pathlib").Path(path).iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
    said = []
    assert resolve_model("smollm2-135m-instruct", progress=said.append) == path and said == []
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path)
    AutoModelForCausalLM.from_pretrained(path)
    assert time.perf_counter() - t0 < 10
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
