"""Builders for tiny, randomly initialised Hugging Face causal LMs used by the tests.

Nothing here touches the network / model hub: tokenizers are trained on the fly on a
small built-in corpus (:func:`tiny_corpus`) and models are created from configs.

* :func:`build_tiny_gpt2` -- GPT-2 style model + byte-level BPE tokenizer
  (``<|endoftext|>`` = bos = eos = unk = id 0, no pad token, no chat template).
* :func:`build_tiny_llama_chat` -- Llama style model + sentencepiece (BPE, byte fallback)
  tokenizer (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``<pad>`` 3) with a ChatML-like chat template.

Both builders are deterministic for a given ``seed`` (identical weights and tokenization)
and take well under a few seconds on a small CPU.
"""

from __future__ import annotations

import io
import pathlib
import tempfile

__all__ = [
    "tiny_corpus",
    "build_tiny_gpt2",
    "build_tiny_llama_chat",
    "GPT2_SPECIAL_TOKEN",
    "LLAMA_CHAT_TEMPLATE",
]

GPT2_SPECIAL_TOKEN = "<|endoftext|>"

# ChatML-like template. The markers are plain text (not special tokens), which is fine for
# a tiny random model. Supports ``add_generation_prompt``.
LLAMA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# --------------------------------------------------------------------------- corpus

_EN_SUBJECTS = [
    "The quick brown fox",
    "A language model",
    "My friend",
    "The old man",
    "Our team",
    "The little cat",
    "Every student",
    "The robot",
    "A small bird",
    "The teacher",
    "Hugging Face",
    "The transformer",
]
_EN_VERBS = [
    "jumps over",
    "writes about",
    "looks at",
    "talks to",
    "thinks about",
    "runs past",
    "learns from",
    "waits for",
    "dreams of",
    "reads",
    "generates",
]
_EN_OBJECTS = [
    "the lazy dog.",
    "a long story.",
    "the blue sky.",
    "the river in the morning.",
    "new words every day.",
    "the quiet library.",
    "a cup of hot coffee.",
    "the future of machine learning.",
    "text one token at a time.",
    "the stars at night.",
]
_EN_FIXED = [
    "Hello, I'm a language model,",
    "Hello world!",
    "Once upon a time, there was a little girl who lived in a village near the forest.",
    "The weather today is sunny with a chance of rain in the afternoon.",
    "In 2019, researchers released a large language model called GPT-2.",
    "What is the capital of France? The capital of France is Paris.",
    "Python is a programming language that lets you work quickly.",
    "I like to eat apples, bananas and oranges.",
    "She sells sea shells by the sea shore.",
    "To be, or not to be, that is the question.",
    "The answer is 42.",
    "Please write a short poem about the ocean.",
    "Translate the following sentence into Japanese.",
    "Thank you very much for your help!",
    "Let's think step by step.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
]
_JA_FIXED = [
    "吾輩は猫である。",
    "名前はまだ無い。",
    "どこで生れたかとんと見当がつかぬ。",
    "現在も行方不明のまま。",
    "今日は良い天気ですね。",
    "明日は雨が降るでしょう。",
    "私は東京に住んでいます。",
    "日本の首都は東京です。",
    "こんにちは、世界！",
    "ありがとうございました。",
    "猫が好きです。犬も好きです。",
    "この本はとても面白いです。",
    "駅までどのくらいかかりますか？",
    "富士山は日本で一番高い山です。",
    "春はあけぼの。やうやう白くなりゆく山ぎは、少しあかりて。",
    "国境の長いトンネルを抜けると雪国であった。",
    "人工知能は文章を生成することができます。",
    "機械学習のモデルを訓練しました。",
    "カタカナとひらがなと漢字を使います。",
    "コーヒーを一杯ください。",
]
_JA_SUBJECTS = ["私は", "猫は", "先生は", "子供たちは", "彼女は", "ロボットは", "友達は"]
_JA_PLACES = ["学校で", "公園で", "東京で", "家で", "図書館で", "海の近くで"]
_JA_ACTIONS = [
    "本を読みます。",
    "ご飯を食べました。",
    "遊んでいます。",
    "歌を歌いました。",
    "手紙を書きます。",
    "寝ています。",
    "勉強しました。",
]


def tiny_corpus() -> list[str]:
    """Return the small, deterministic mixed English/Japanese corpus (a few hundred lines)."""
    lines: list[str] = []
    lines.extend(_EN_FIXED)
    lines.extend(_JA_FIXED)
    # Deterministic combinatorial sentences (no RNG needed).
    n_s, n_v, n_o = len(_EN_SUBJECTS), len(_EN_VERBS), len(_EN_OBJECTS)
    for i in range(180):
        s = _EN_SUBJECTS[i % n_s]
        v = _EN_VERBS[(i * 7 + i // n_s) % n_v]
        o = _EN_OBJECTS[(i * 3 + i // n_v) % n_o]
        lines.append(f"{s} {v} {o}")
    n_js, n_jp, n_ja = len(_JA_SUBJECTS), len(_JA_PLACES), len(_JA_ACTIONS)
    for i in range(120):
        s = _JA_SUBJECTS[i % n_js]
        p = _JA_PLACES[(i * 5 + i // n_js) % n_jp]
        a = _JA_ACTIONS[(i * 3 + i // n_jp) % n_ja]
        lines.append(f"{s}{p}{a}")
    # Some mixed lines.
    for i in range(40):
        lines.append(f"{_EN_FIXED[i % len(_EN_FIXED)]} {_JA_FIXED[(i * 3) % len(_JA_FIXED)]}")
    return lines


# --------------------------------------------------------------------------- helpers


def _scale_init_(model, seed: int, std: float) -> None:
    """Deterministically re-initialise all weight matrices / embeddings with a larger std.

    Random models with the default ``initializer_range=0.02`` produce nearly uniform logits,
    so greedy decoding tends to be degenerate (same token for every prompt). A larger init
    makes continuations depend on the prompt.
    """
    import torch

    gen = torch.Generator().manual_seed(seed + 1234)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:  # linear / conv1d / embedding weights
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


# --------------------------------------------------------------------------- GPT-2


def _train_byte_level_bpe(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[GPT2_SPECIAL_TOKEN],  # -> id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    assert tok.token_to_id(GPT2_SPECIAL_TOKEN) == 0
    return tok


def build_tiny_gpt2(path, seed: int = 0) -> pathlib.Path:
    """Build a tiny 2-layer GPT-2 (byte-level BPE, vocab 512) and save it to ``path``.

    Special tokens: ``<|endoftext|>`` is bos = eos = unk = id 0; there is no pad token
    and no chat template (like the real GPT-2). Returns ``path`` as a :class:`pathlib.Path`.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)

    backend = _train_byte_level_bpe(vocab_size=512)
    tokenizer = GPT2TokenizerFast(
        tokenizer_object=backend,
        bos_token=GPT2_SPECIAL_TOKEN,
        eos_token=GPT2_SPECIAL_TOKEN,
        unk_token=GPT2_SPECIAL_TOKEN,
        model_max_length=256,
    )
    assert tokenizer.pad_token is None

    vocab_size = backend.get_vocab_size()
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=256,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_inner=None,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    _scale_init_(model, seed, std=0.2)
    model.eval()

    gc = model.generation_config
    gc.bos_token_id = 0
    gc.eos_token_id = 0
    gc.pad_token_id = None

    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


# --------------------------------------------------------------------------- Llama chat


def _train_sentencepiece(vocab_size: int) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus()),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=0.99,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        pad_piece="<pad>",
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def build_tiny_llama_chat(path, seed: int = 0) -> pathlib.Path:
    """Build a tiny 2-layer Llama chat model (sentencepiece BPE w/ byte fallback) at ``path``.

    Special tokens: ``<unk>`` 0, ``<s>`` 1 (bos), ``</s>`` 2 (eos), ``<pad>`` 3 (pad).
    The tokenizer has a ChatML-like chat template (plain-text ``<|im_start|>`` / ``<|im_end|>``
    markers) supporting ``add_generation_prompt``. Returns ``path`` as a :class:`pathlib.Path`.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)

    model_bytes = _train_sentencepiece(vocab_size=512)
    with tempfile.TemporaryDirectory() as td:
        spm_file = pathlib.Path(td) / "tokenizer.model"
        spm_file.write_bytes(model_bytes)
        tokenizer = LlamaTokenizer.from_pretrained(
            td,
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            add_bos_token=True,
            add_eos_token=False,
            model_max_length=256,
        )
        tokenizer.chat_template = LLAMA_CHAT_TEMPLATE
        # Drop loader bookkeeping (temp-dir loading) from the saved tokenizer_config.json.
        for k in ("is_local", "local_files_only", "name_or_path"):
            tokenizer.init_kwargs.pop(k, None)
        tokenizer.save_pretrained(path)
    # Keep the raw sentencepiece model next to tokenizer.json (rinna-style repos ship it).
    (path / "tokenizer.model").write_bytes(model_bytes)

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>", "<pad>")}
    assert ids == {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}, ids

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    _scale_init_(model, seed, std=0.2)
    model.eval()

    gc = model.generation_config
    gc.bos_token_id = 1
    gc.eos_token_id = 2
    gc.pad_token_id = 3

    model.save_pretrained(path, safe_serialization=True)
    return path
