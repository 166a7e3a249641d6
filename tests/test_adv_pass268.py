"""Adversarial pass 268: structured output (llguidance) with per-row settings, as a demanding user meets it through
the command line, plain input rows and OpenAI Batch files.

Found, and kept fixed below:
- A job with a constraint (--json, --json-schema, --regex, --choice, a row's response_format) for a model whose
  tokenizer llguidance cannot read (a WordPiece tokenizer, as GPT-2 Chinese models ship; a slow-only one, as
  CTRL's or BioGPT's) was queued without a word, then every `runner work` failed the whole job at its first
  batch, its unconstrained rows with it: submit judged a constraint with the model's tokenizer only for a
  grammar (which may name its special tokens). The message said "structured output needs a fast (Rust)
  tokenizer" of a fast one besides. Submit now refuses such a constraint, naming the option or the row's file,
  line and field, and says what llguidance could not read.
- `runner generate` (a try) with a grammar naming a special token the model lacks, or any constraint for such a
  tokenizer, loaded the model and then failed with "cannot compile a row's constraint for this tokenizer" and
  llguidance's echo of the grammar over three lines (or "needs a fast (Rust) tokenizer" of a fast one), naming no
  option: a try now judges its settings with the model's tokenizer as a submit does (one check,
  `constraints.check_tokenizer`), "Error: --grammar: grammar cannot be used with this model's tokenizer: ...".
- A constraint no finite text satisfies (a JSON schema each of whose arrays must hold another array, or whose
  object must hold one like itself; a grammar `start: "a" start`) failed its row at its first token with
  llguidance's "Too many items (limit 50000; ff_tokens); try avoiding single-byte/short lexemes", advice that
  says nothing to a user of a JSON schema. The row error now says the text it forces never ends, with examples.
  (Submit cannot tell it from a constraint forcing a long but finite text, which runs: on a tokenizer of bytes
  llguidance's forced text stops at a limit for both, without an error.)
- A Batch body's response_format in the flat shape of OpenAI's Responses API (`{"type": "json_schema", "name":
  ..., "schema": ..., "strict": true}`) was refused as "takes no 'name'", without the word of where the schema
  goes that a lone misplaced 'schema' got: the hint now follows whenever 'schema' is among the unread keys.
- `runner submit` of a file with a row whose JSON schema allows only integers below 64-bit ones (`{"type":
  "integer", "minimum": -1e20, "maximum": -1e19}`, `{"type": "integer", "const": -9223372036854775808}`, Java's
  Long.MIN_VALUE; an enum value so; nested anywhere, split over allOf, or in a Lark grammar's `%json {...}`) died
  of a segmentation fault, no word of file, line or field (a notebook's kernel died; so did `GenerationParams`):
  llguidance 1.9 reads such bounds as -2**63 and crashes compiling the range [-2**63, -2**63]. It is now refused
  before llguidance sees it: "json_schema cannot be compiled: minimum -1e+20 and maximum -1e+19 lie at or below
  -2**63 ...".
"""

from __future__ import annotations

import json
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest
import workers
from helpers import batch_request, ids_of, invoke, write_jsonl

from runner import GenerationParams
from runner.errors import InputError, ParamError
from runner.jobs import create_job


@pytest.fixture(scope="module")
def wordpiece_gpt2(tmp_path_factory):
    """A 1-layer GPT-2 whose tokenizer is WordPiece (BertTokenizerFast, as GPT-2 Chinese models have), which
    runner generates with (tokens.py falls back to decoded text) and llguidance cannot read."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import BertTokenizerFast, GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("wordpiece-gpt2")
    chars = list(string.ascii_lowercase + string.digits + '{}[]":,.!?')
    vocab = {
        t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *chars, *("##" + c for c in chars)])
    }
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    tokenizer = BertTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                                  cls_token="[CLS]", eos_token="[SEP]", model_max_length=128)  # fmt: skip
    config = GPT2Config(vocab_size=len(vocab), n_positions=128, n_embd=32, n_layer=1, n_head=2, bos_token_id=2,
                        eos_token_id=3, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model.generation_config.eos_token_id = 3
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


UNREADABLE = (
    "cannot be used with this model's tokenizer: llguidance cannot read it (can't determine decoder type"
)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("json_object", True),
        ("json_schema", {"type": "integer"}),
        ("regex", "[0-9]+"),
        ("choices", ["a", "b"]),
    ],
)
def test_a_constraint_for_a_tokenizer_llguidance_cannot_read_is_refused_at_submit(
    tmp_path, wordpiece_gpt2, field, value
):
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "hello"}])
    with pytest.raises(ParamError, match=f"^{field} {re.escape(UNREADABLE)}") as e:
        create_job(
            path, wordpiece_gpt2, GenerationParams(max_new_tokens=4, **{field: value}), job_dir=tmp_path / "j"
        )
    assert e.value.param == field and "fast (Rust)" not in str(e.value)
    assert not (tmp_path / "j").exists()


def test_a_rows_constraint_for_a_tokenizer_llguidance_cannot_read_names_its_line(tmp_path, wordpiece_gpt2):
    rows = [{"id": f"r{i}", "prompt": "hello"} for i in range(6)]
    rows[4]["response_format"] = {"type": "json_object"}
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(InputError) as e:
        create_job(path, wordpiece_gpt2, GenerationParams(max_new_tokens=4), job_dir=tmp_path / "j")
    assert f"{path}:5: response_format: json_object {UNREADABLE}" in str(e.value)
    assert ":1:" not in str(e.value) and not (tmp_path / "j").exists()
    # the job without the row runs: the tokenizer is fine for unconstrained rows
    job = create_job(path, wordpiece_gpt2, GenerationParams(max_new_tokens=4), job_dir=tmp_path / "j",
                     skip_invalid=True)  # fmt: skip
    from runner.worker import run_job

    assert run_job(job, echo=None).finished


def test_the_command_line_names_the_option(tmp_path, wordpiece_gpt2):
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "hello"}])
    result = invoke("submit", path, "--model", wordpiece_gpt2, "--json")
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: --json: json_object {UNREADABLE}"), result.output


def test_a_batch_requests_response_format_for_a_tokenizer_llguidance_cannot_read_names_its_line(
    tmp_path, wordpiece_gpt2
):
    body = {"model": "m", "prompt": "hello", "max_tokens": 4}
    reqs = [batch_request(f"c{i}", "/v1/completions", dict(body)) for i in range(3)]
    reqs[2]["body"]["response_format"] = {"type": "json_object"}
    path = write_jsonl(tmp_path / "batch.jsonl", reqs)
    with pytest.raises(InputError) as e:
        create_job(path, wordpiece_gpt2, GenerationParams(max_new_tokens=4), job_dir=tmp_path / "j",
                   served_model_names=("m",))  # fmt: skip
    assert f"{path}:3: response_format: json_object {UNREADABLE}" in str(e.value)


def test_a_slow_tokenizer_is_said_to_be_one(tmp_path, tiny_gpt2):
    """A model with only a slow (Python) tokenizer (CTRL's, BioGPT's): llguidance reads fast ones only."""
    from transformers import CTRLTokenizer

    from runner import constraints

    spec = json.loads((Path(tiny_gpt2) / "tokenizer.json").read_text())["model"]
    (tmp_path / "vocab.json").write_text(json.dumps(spec["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    slow = CTRLTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    assert not slow.is_fast
    said = constraints.tokenizer_problem(GenerationParams(regex="[0-9]+"), slow)
    assert said == ("cannot be used with this model's tokenizer: it is a slow one (CTRLTokenizer); llguidance "
                    "reads fast (Rust) ones")  # fmt: skip
    assert constraints.tokenizer_problem(GenerationParams(), slow) is None  # (no constraint: nothing to read)


def test_a_try_names_the_option_whose_constraint_the_tokenizer_cannot_take(
    tmp_path, tiny_gpt2, wordpiece_gpt2
):
    grammar = tmp_path / "end.lark"
    grammar.write_text('start: "yes" <|im_end|>\n')
    result = invoke("generate", "hello", "-m", tiny_gpt2, "--grammar", grammar, "--max-new-tokens", 4)
    assert result.exit_code == 1
    assert result.output.startswith("Error: --grammar: grammar cannot be used with this model's tokenizer: ")
    assert 'unknown special token: "<|im_end|>"' in result.output and "\n   1 |" not in result.output
    result = invoke("generate", "hello", "-m", wordpiece_gpt2, "--json", "--max-new-tokens", 4)
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: --json: json_object {UNREADABLE}"), result.output


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("json_schema", {"type": "array", "items": {"$ref": "#"}, "minItems": 1}),  # each array holds an array
        ("json_schema", {"$ref": "#/$defs/n", "$defs": {"n": {"type": "object", "properties": {
            "next": {"$ref": "#/$defs/n"}}, "required": ["next"]}}}),  # each object holds one: {"next": {"next": ...
        ("grammar", 'start: "a" start'),
    ],
)  # fmt: skip
def test_a_constraint_no_finite_text_satisfies_is_a_row_error_that_says_so(gpt2_engine, field, value):
    """A constraint that forces text without end (EOS is never allowed) fails its row at its first token with
    llguidance's "Too many items (limit 50000; ff_tokens); try avoiding single-byte/short lexemes", which says
    nothing to a user of a JSON schema (there are no lexemes in it): it now says what the constraint does."""
    from runner.engine import ConstraintError

    ids = ids_of(gpt2_engine, ["Hello"])
    with pytest.raises(ConstraintError) as e:
        gpt2_engine.generate(ids, [GenerationParams(max_new_tokens=8, **{field: value})], [1])
    message = e.value.failed[0]
    assert message.startswith(f"{field}: llguidance's parser gave up at token 1: "), message
    assert "the text it forces from here on never ends" in message, message


def test_a_response_format_in_the_responses_apis_flat_shape_is_told_where_the_schema_goes():
    """OpenAI's Responses API (and the openai SDK's `text.format`) give a JSON schema flat: {"type": "json_schema",
    "name": ..., "schema": ..., "strict": ...}; Chat Completions nest it under "json_schema". The flat shape was
    refused as "takes no 'name'" with no word of where the schema goes (said only when 'schema' came first)."""
    from runner.params import response_format

    flat = {"type": "json_schema", "name": "person", "schema": {"type": "object"}, "strict": True}
    with pytest.raises(ParamError) as e:
        response_format(flat)
    assert str(e.value) == (
        "response_format json_schema takes no 'name' (it would be ignored; it takes json_schema, type): give "
        '{"type": "json_schema", "json_schema": {"schema": {...}}}.'
    )


# Integer ranges both of whose bounds lie at or below -2**63 (as llguidance reads a JSON number: a float, then a
# 64-bit integer): llguidance 1.9 compiling one crashes its process (SIGSEGV)
BELOW_INT64 = [
    {"type": "integer", "minimum": -1e20, "maximum": -1e19},
    {"type": ["integer", "null"], "minimum": -9223372036854775808, "maximum": -9223372036854775807},
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": -1e30, "exclusiveMaximum": -1e29}}},
    {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer", "exclusiveMinimum": -1e20,
                                                                "maximum": -9223372036854775807}]}},
    {"allOf": [{"type": "integer", "minimum": -1e30}, {"maximum": -1e29}]},  # one range, from two subschemas
    {"type": "integer", "const": -9223372036854775808},  # (Java's Long.MIN_VALUE, as a sentinel)
    {"type": "object", "properties": {"n": {"type": "integer", "enum": [5, -1e20]}}},
    {"type": "integer", "anyOf": [{"const": 5}, {"const": -1e30}]},  # (each choice with the integer beside it)
]  # fmt: skip
# ... and such numbers where no integer range reaches them, which llguidance compiles as it is
NOT_BELOW_INT64 = [
    {"anyOf": [{"type": "integer"}, {"const": -1e30}]},
    {"type": "object", "properties": {"i": {"type": "integer", "minimum": -5}, "x": {"const": -1e30}}},
]


@pytest.mark.parametrize("schema", NOT_BELOW_INT64)
def test_a_number_below_64_bits_where_no_integer_reaches_it_is_taken(schema):
    assert GenerationParams(json_schema=schema).json_schema == schema


def test_an_integer_range_below_64_bits_is_refused_at_submit_not_a_crash(tmp_path, tiny_gpt2):
    """`runner submit` of a file with such a schema on line 3 died of a segmentation fault (exit -11, no word:
    a notebook's kernel died), as did `GenerationParams(json_schema=...)`: now refused, naming line and field."""
    rows = [{"id": f"r{i}", "prompt": "hello"} for i in range(4)]
    rows[2]["json_schema"] = BELOW_INT64[0]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    code, out = workers.run_runner("--home", tmp_path / "home", "submit", path, "--model", tiny_gpt2)
    assert code == 1, (code, out)
    assert (
        f"{path}:3: json_schema: json_schema cannot be compiled: minimum -1e+20 and maximum -1e+19" in out
    ), out
    # each, nested or not, in a process of its own (a crash is its exit code, not this test process's end)
    # (a Lark grammar's own JSON schema too)
    settings = [{"json_schema": s} for s in BELOW_INT64] + [
        {"grammar": 'start: "n=" %json ' + json.dumps(BELOW_INT64[0])}
    ]
    probe = [
        "import json, sys\nfrom runner import GenerationParams\nfrom runner.errors import ParamError",
        f"for s in json.loads({json.dumps(json.dumps(settings))}):",
        "    try:\n        GenerationParams(**s)\n    except ParamError as e:\n        print(e)",
    ]
    proc = subprocess.run([sys.executable, "-c", "\n".join(probe)], capture_output=True, text=True, timeout=120,
                          env=workers.worker_env())  # fmt: skip
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stdout.splitlines()
    assert len(lines) == len(settings), lines
    said = r"(json_schema|grammar) cannot be compiled: (minimum|exclusiveMinimum|const value|enum value) .* lies? at or below -2\*\*63"
    assert all(re.match(said, line) for line in lines), lines
