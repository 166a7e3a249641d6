"""Adversarial pass 271: the user's side, as the Japanese Colab/GPT-2 tutorials' readers use runner (rinna's
T5Tokenizer GPT-2s, `runner score` in place of gpt2-japanese's gpt2-score, Excel CSVs, notebook reruns).

Found, and kept fixed below:
  * A SentencePiece Unigram tokenizer (rinna's japanese-gpt2s: T5Tokenizer, a Metaspace decoder that llguidance
    cannot read) gave its "▁" token empty `token_bytes`, and "▁今日" the bytes of "今日": decoding one id alone
    drops the space SentencePiece puts in front. Joining a row's `token_bytes` lost every space of the text
    ("今日は 良い天気" gave "今日は良い天気"), and `runner score --tokens --print` printed the "▁" in front of a
    text as a blank (`runner generate --prompt-logprobs` as ''), where the README (and a byte-fallback tokenizer)
    shows "▁". A token whose piece starts with "▁" has the space in its bytes now, as llguidance's table gives
    it for Llama's tokenizers.
  * `-m "my gpt2 モデル/model.safetensors"` (or its config.json: the file the tutorial's save_pretrained wrote,
    not its folder) said "hf download my gpt2 モデル/model.safetensors", or the hub's "Repo id must use
    alphanumeric chars ... 'my gpt2 モデル/model.safetensors'": an existing file was taken for a hub id. It says
    the file is no model folder, naming the folder to give.
  * `-m https://huggingface.co/rinna/japanese-gpt2-medium` (the tutorials' link) and a name pasted with a
    space after it said only "no model folder at ... (and it is not a Hugging Face model id)"; they name the
    id to give, and the spaces.
  * `runner embed "江戸時代のインターネット回線"` (gpt2-transform's habit: the text as the argument) was told
    "echo 'TEXT' | runner score - -m MODEL (embed, run alike)": another command than the one run, and submit's
    not at all. Each of run, score, embed and submit names itself (run adds `runner generate` for a quick try).
  * A CSV header typed with a space after its name (`prompt `, the IME's full-width `入力　`) was told "its cells
    keep their spaces too" and a pandas.read_csv(skipinitialspace=True) that writes the file "without the spaces
    after its commas": there are none, and that call keeps the header's trailing space (the file it writes is
    refused alike). That hint is for spaces after the commas (`id, prompt`) only.
  * `-m rinna/japanese-gpt2-meduim` offline said "not in this machine's cache: hf download
    rinna/japanese-gpt2-meduim", a download of a model that does not exist, though the cache held
    rinna/japanese-gpt2-medium. It asks "did you mean" the cached id a letter or two from it.
  * A .txt file that is a tab-separated table (Excel's "Unicode テキスト" once iconv'd as runner's UTF-16 error
    says, or "テキスト (タブ区切り)") went in a line a prompt: its header `id<TAB>prompt` generated (or scored)
    as a prompt, each row's id inside its text, and nothing said. Submit notes such a header now, with the
    pandas line that makes the table a CSV (the file is read as before: a note, not a new reading).
"""

from __future__ import annotations

import io
import json

import pytest
from helpers import invoke

import runner


def _train_unigram() -> bytes:
    import sentencepiece as spm
    from tiny_models import tiny_corpus

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus()), model_writer=buf, model_type="unigram", vocab_size=400,
        character_coverage=1.0, normalization_rule_name="identity", add_dummy_prefix=True, unk_id=1, bos_id=-1,
        eos_id=2, pad_id=0, unk_piece="<unk>", eos_piece="</s>", pad_piece="[PAD]", hard_vocab_limit=False,
        num_threads=1, minloglevel=2,
    )  # fmt: skip
    return buf.getvalue()


@pytest.fixture(scope="module")
def rinna_like(tmp_path_factory):
    """A tiny GPT-2 with a rinna-style tokenizer: a SentencePiece Unigram `spiece.model` read by T5Tokenizer."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("rinna-like")
    (path / "spiece.model").write_bytes(_train_unigram())
    config = {"tokenizer_class": "T5Tokenizer", "unk_token": "<unk>", "eos_token": "</s>", "pad_token": "[PAD]",
              "bos_token": "</s>", "extra_ids": 0}  # fmt: skip
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    gpt2 = GPT2Config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=16, n_positions=64,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    GPT2LMHeadModel(gpt2).save_pretrained(path)
    return str(path)


def test_rinna_style_token_bytes_keep_sentencepieces_spaces(rinna_like, runner_home):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(rinna_like)
    text = "今日は 良い天気ですね。 The cat"
    pieces = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])
    assert (
        tok.eos_token_id not in tok(text, add_special_tokens=False)["input_ids"]
    )  # (no unknown piece: </s>)
    assert pieces[0].startswith("\u2581") and sum(p.startswith("\u2581") for p in pieces) >= 3, pieces
    result = invoke("score", "-", "-m", rinna_like, "--tokens", "--print", input=text + "\n")
    assert result.exit_code == 0, result.output
    row = runner.load_results(result.stderr.strip().splitlines()[-1].split("results in ")[-1]).iloc[0]
    assert "".join(row["tokens"]) == text
    assert (
        b"".join(bytes(b) for b in row["token_bytes"]).decode() == " " + text
    )  # SentencePiece's own "▁" too
    first = result.stdout.splitlines()[1].split("\t")[0]
    assert first.startswith("\u2581"), result.stdout
    shown = invoke("generate", text, "-m", rinna_like, "--max-new-tokens", 1, "--prompt-logprobs").output
    assert "prompt: '\u2581':" in shown, shown


@pytest.mark.parametrize("inside", ["model.safetensors", "config.json"])
def test_a_file_of_a_model_folder_given_as_the_model_says_to_give_the_folder(tmp_path, tiny_gpt2, inside):
    """`-m "my gpt2 モデル/model.safetensors"` (the weights file of a tutorial's save_pretrained folder) was taken
    for a hub id: "hf download ..." of a file on this machine, or the hub's "Repo id must use alphanumeric
    chars" for a folder named in Japanese."""
    import shutil

    folder = tmp_path / "my gpt2 モデル"
    shutil.copytree(tiny_gpt2, folder)
    prompts = tmp_path / "p.txt"
    prompts.write_text("こんにちは\n", encoding="utf-8")
    for command in (["generate", "こんにちは"], ["submit", prompts]):
        result = invoke(*command, "-m", folder / inside, "--max-new-tokens", 2)
        assert result.exit_code == 1, result.output
        assert f"{folder / inside} is a file, not a model folder: give the folder it is in, {folder}" in (
            result.output
        ), result.output
        assert "hf download" not in result.output and "Repo id" not in result.output


@pytest.mark.parametrize(
    ("model", "hint"),
    [
        (
            "https://huggingface.co/rinna/japanese-gpt2-medium",
            "give the model's id, rinna/japanese-gpt2-medium, ",
        ),
        (
            "https://huggingface.co/rinna/japanese-gpt2-medium/tree/main",
            "rinna/japanese-gpt2-medium, not its web",
        ),
        ("rinna/japanese-gpt2-medium ", "the name has spaces around it: 'rinna/japanese-gpt2-medium'"),
    ],
)
def test_a_model_copied_from_the_hubs_page_says_what_is_wrong_with_it(model, hint):
    """The address of a hub page (the tutorials link rinna/japanese-gpt2-medium so) or a name pasted with a space
    after it said "no model folder at ... (and it is not a Hugging Face model id)", and no more."""
    result = invoke("generate", "こんにちは", "-m", model, "--max-new-tokens", 2)
    assert result.exit_code == 1 and hint in result.output, result.output


@pytest.mark.parametrize("command", ["embed", "score", "run", "submit"])
def test_a_text_given_as_the_input_is_told_to_go_in_on_stdin_of_the_command_run(command, tiny_gpt2):
    """`runner embed "江戸時代のインターネット回線"` (gpt2-transform's --context habit) said "echo 'TEXT' | runner
    score - -m MODEL (embed, run alike)": the command named was another one (and submit's not at all)."""
    result = invoke(command, "江戸時代のインターネット回線", "-m", tiny_gpt2)
    assert result.exit_code == 1, result.output
    assert f"echo 'TEXT' | runner {command} - -m MODEL" in result.output, result.output
    assert "alike" not in result.output


@pytest.mark.parametrize("header", ["prompt ", "入力\u3000"])
def test_a_header_with_a_space_after_its_name_is_not_told_to_strip_the_cells(tmp_path, tiny_gpt2, header):
    """An Excel header typed with a space after the name (`prompt `, or the IME's full-width `入力　`) was told
    "its cells keep their spaces too; pandas.read_csv(..., skipinitialspace=True)... writes the file without the
    spaces after its commas": its cells have none, and that pandas call keeps the header's trailing space, so
    the file it writes is refused the same way. The --prompt-field that reads it is what is said."""
    path = tmp_path / "p.csv"
    path.write_bytes(f"\ufeffid,{header}\r\nq1,こんにちは\r\n".encode())
    field = header.strip()
    result = invoke(
        "submit", path, "-m", tiny_gpt2, *(["--prompt-field", field] if field != "prompt" else [])
    )
    assert result.exit_code == 1, result.output
    assert "--prompt-field" in result.output and "reads it" in result.output, result.output
    assert "skipinitialspace" not in result.output and "keep their spaces" not in result.output, result.output


def test_a_mistyped_hub_id_offline_names_the_cached_model_it_is_near(tmp_path, tiny_gpt2, monkeypatch):
    """`-m rinna/japanese-gpt2-meduim` offline, with rinna/japanese-gpt2-medium in the cache, said only "not in
    this machine's cache: hf download rinna/japanese-gpt2-meduim", a download of a model that does not exist."""
    import shutil

    import huggingface_hub.constants as constants

    repo = tmp_path / "hub" / "models--rinna--japanese-gpt2-medium"
    shutil.copytree(tiny_gpt2, repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke("generate", "こんにちは", "-m", "rinna/japanese-gpt2-meduim", "--max-new-tokens", 2)
    assert result.exit_code == 1, result.output
    assert "did you mean rinna/japanese-gpt2-medium" in result.output, result.output
    assert (
        invoke("generate", "こんにちは", "-m", "rinna/japanese-gpt2-medium", "--max-new-tokens", 2).exit_code
        == 0
    )


@pytest.mark.parametrize(("command", "header"), [("submit", "id\tprompt"), ("score", "番号\ttext")])
def test_a_txt_file_that_is_a_tab_separated_table_is_said_so(tmp_path, tiny_gpt2, command, header):
    """Excel's "Unicode text" (after the iconv runner's UTF-16 error gives) and "Text (Tab delimited)" exports
    are .txt files of tab-separated columns: each line went in as one prompt (or text to score), the header
    line `id<TAB>prompt` among them, and submit said nothing."""
    path = tmp_path / "unicode テキスト.txt"
    path.write_text(f"{header}\r\nq1\tこんにちは\r\nq2\t元気\r\n", encoding="utf-8")
    result = invoke(command, path, "-m", tiny_gpt2, *(["--max-new-tokens", 2] if command == "submit" else []))
    assert result.exit_code == 0, result.output
    assert (
        f"the first line of unicode テキスト.txt, {header!r}, reads like the header of a tab-separated"
        in (result.stderr)
    ), result.stderr
    assert f"pandas.read_csv({str(path)!r}, sep='\\t'" in result.stderr
    plain = tmp_path / "plain.txt"
    plain.write_text(
        "吾輩は猫である。\t名前はまだ無い。\n", encoding="utf-8"
    )  # (a tab in a prompt: no header)
    assert "tab-separated" not in invoke(command, plain, "-m", tiny_gpt2).stderr
