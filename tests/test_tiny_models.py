"""Tests for the tiny model builders in tests/tiny_models.py (no network, CPU only)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

try:  # tests/ on sys.path (rootdir-style pytest import, no tests/__init__.py)
    from tiny_models import build_tiny_gpt2, build_tiny_llama_chat, tiny_corpus
except ImportError:  # pragma: no cover - tests/ is a package
    from tests.tiny_models import build_tiny_gpt2, build_tiny_llama_chat, tiny_corpus

ENGLISH = "Hello, I'm a language model, and the quick brown fox jumps over the lazy dog."
JAPANESE = "吾輩は猫である。名前はまだ無い。現在も行方不明のまま。"
MIXED = "Translate: 今日は良い天気ですね。\nThe answer is 42! 😀"

PROMPTS = ("Hello, I'm a language model,", "吾輩は猫である。")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_tiny_llama_chat(tmp_path_factory.mktemp("tiny-llama-chat"))


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    return AutoTokenizer.from_pretrained(gpt2_dir), AutoModelForCausalLM.from_pretrained(gpt2_dir)


@pytest.fixture(scope="module")
def llama(llama_dir):
    return AutoTokenizer.from_pretrained(llama_dir), AutoModelForCausalLM.from_pretrained(llama_dir)


@pytest.fixture(params=["gpt2", "llama"])
def tok_and_model(request):
    return request.getfixturevalue(request.param)


# --------------------------------------------------------------------------- corpus


def test_tiny_corpus_is_deterministic_mixed_text():
    corpus = tiny_corpus()
    assert corpus == tiny_corpus()
    assert 200 <= len(corpus) <= 1000
    assert all(isinstance(line, str) and line for line in corpus)
    assert "吾輩は猫である。" in corpus
    assert "現在も行方不明のまま。" in corpus
    assert any(line.isascii() for line in corpus)


# --------------------------------------------------------------------------- GPT-2


def test_gpt2_builds_and_loads(gpt2_dir, gpt2):
    tok, model = gpt2
    assert (gpt2_dir / "model.safetensors").is_file()
    assert (gpt2_dir / "tokenizer.json").is_file()
    assert model.config.model_type == "gpt2"
    assert model.config.n_layer == 2 and model.config.n_embd == 64 and model.config.n_head == 4
    assert model.config.n_positions == 256
    assert model.config.vocab_size == len(tok) == 512
    assert model.get_input_embeddings().weight.shape == (512, 64)


def test_gpt2_special_tokens(gpt2):
    tok, model = gpt2
    assert tok.eos_token == tok.bos_token == tok.unk_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.bos_token_id == tok.unk_token_id == 0
    assert tok.pad_token is None and tok.pad_token_id is None
    assert tok.chat_template is None
    assert model.config.eos_token_id == model.config.bos_token_id == 0
    assert model.config.pad_token_id is None
    assert model.generation_config.eos_token_id == model.generation_config.bos_token_id == 0
    assert model.generation_config.pad_token_id is None
    # Like real GPT-2: no BOS is prepended when encoding.
    assert tok("Hello").input_ids[0] != 0


# --------------------------------------------------------------------------- Llama chat


def test_llama_builds_and_loads(llama_dir, llama):
    tok, model = llama
    assert (llama_dir / "model.safetensors").is_file()
    assert (llama_dir / "tokenizer.json").is_file()
    assert (llama_dir / "tokenizer.model").is_file()
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.num_hidden_layers == 2 and cfg.hidden_size == 64 and cfg.intermediate_size == 128
    assert cfg.num_attention_heads == 4 and cfg.num_key_value_heads == 2
    assert cfg.max_position_embeddings == 256
    assert cfg.vocab_size == len(tok)
    assert 300 <= len(tok) <= 600


def test_llama_special_tokens(llama):
    tok, model = llama
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>", "<pad>")}
    assert ids == {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (1, 2, 3)
    gc = model.generation_config
    assert (gc.bos_token_id, gc.eos_token_id, gc.pad_token_id) == (1, 2, 3)
    # BOS is prepended when encoding (sentencepiece/Llama style).
    assert tok("Hello").input_ids[0] == 1


def test_llama_chat_template(llama):
    tok, _ = llama
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "こんにちは"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nこんにちは<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert no_prompt + "<|im_start|>assistant\n" == text
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids  # byte fallback covers everything
    assert tok.decode(ids) == text


# --------------------------------------------------------------------------- both


@pytest.mark.parametrize("text", [ENGLISH, JAPANESE, MIXED], ids=["en", "ja", "mixed"])
def test_round_trip(tok_and_model, text):
    tok, _ = tok_and_model
    ids = tok(text).input_ids
    assert tok.unk_token_id not in ids  # byte-level BPE / byte fallback: nothing is unknown
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_greedy_generation_not_degenerate(tok_and_model):
    tok, model = tok_and_model
    continuations = []
    for prompt in PROMPTS:
        enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
        new = out[0, enc.input_ids.shape[1] :].tolist()
        assert len(new) == 8
        assert new[0] != tok.eos_token_id
        assert any(t != tok.eos_token_id for t in new)
        continuations.append(new)
    assert continuations[0] != continuations[1]


def test_batched_left_padded_generation_matches_single(gpt2_dir, gpt2):
    _, model = gpt2
    tok = AutoTokenizer.from_pretrained(gpt2_dir, padding_side="left")
    tok.pad_token = tok.eos_token
    enc = tok(list(PROMPTS), return_tensors="pt", padding=True)
    with torch.no_grad():
        batch = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    width = enc.input_ids.shape[1]
    for i, prompt in enumerate(PROMPTS):
        single_enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            single = model.generate(
                **single_enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id
            )
        assert batch[i, width:].tolist() == single[0, single_enc.input_ids.shape[1] :].tolist()


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("builder", [build_tiny_gpt2, build_tiny_llama_chat], ids=["gpt2", "llama"])
def test_builders_are_deterministic(tmp_path, builder):
    a = builder(tmp_path / "a", seed=0)
    b = builder(tmp_path / "b", seed=0)
    c = builder(tmp_path / "c", seed=1)
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert wa.keys() == wb.keys() == wc.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)  # the seed matters
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    ta, tb = AutoTokenizer.from_pretrained(a), AutoTokenizer.from_pretrained(b)
    for text in (ENGLISH, JAPANESE, MIXED):
        assert ta(text).input_ids == tb(text).input_ids
