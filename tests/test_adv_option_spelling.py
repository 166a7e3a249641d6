"""Adversarial pass 211, a notebook user's walkthrough of the README: a message that tells its reader to give a
setting names it as they give it, `skip_invalid=True` to a Python call and `--skip-invalid` on the command line
(errors.option); what a job stores says it one way, whoever submitted it."""

import json

import pytest
from helpers import invoke, write_jsonl

import runner
from runner import GenerationParams
from runner.errors import RunnerError

LONG = "the old man said " * 80  # over the tiny models' window of 256 tokens


def _python_and_cli_errors(tmp_path, model, rows, *args, **kwargs):
    """The error a Python `runner.submit` of `rows` raises, and the CLI's output for the same submit."""
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(RunnerError) as e:
        runner.submit(path, model, GenerationParams(max_new_tokens=4), **kwargs)
    cli = invoke("submit", path, "-m", model, "--max-new-tokens", 4, *args)
    assert cli.exit_code == 1, cli.output
    return str(e.value), cli.output


@pytest.mark.parametrize(
    ("rows", "kwargs", "args", "python", "command_line"),
    [
        (
            [{"prompt": "hello"}, {"prompt": 3}],
            {},
            (),
            "(use skip_invalid=True to run the valid rows)",
            "(use --skip-invalid to run the valid rows)",
        ),
        (
            [{"prompt": LONG}],
            {},
            (),
            "(shorten it, lower max_new_tokens, or pass truncate='left')",
            "(shorten it, lower --max-new-tokens, or pass --truncate left)",
        ),
        (
            [{"city": "Kyoto"}],
            {"template": "{town} is"},
            ("--template", "{town} is"),
            "missing field 'town' used by template;",
            "missing field 'town' used by --template;",
        ),
        (
            [{"question": "why?"}],
            {},
            (),
            "prompt_field='question' reads it",
            "--prompt-field question reads it",
        ),
        (
            [{"question": "why?", "answer": "because"}],
            {},
            (),
            "prompt_field or template names the one to use",
            "--prompt-field or --template names the one to use",
        ),
        (
            [{"prompt": "hello"}],
            {"chat": True},
            ("--chat",),
            "give one with chat_template (your fine-tune's format), or drop chat=True",
            "give one with --chat-template (your fine-tune's format), or drop --chat",
        ),
    ],
)
def test_a_refused_submit_names_the_python_argument_from_python_and_the_option_on_the_command_line(
    tmp_path, tiny_gpt2, rows, kwargs, args, python, command_line
):
    """A notebook's `runner.submit(rows, model)` was told "(use --skip-invalid to run the valid rows)", "pass
    --truncate left", "--prompt-field or --template": options of a command it never typed."""
    said, cli = _python_and_cli_errors(tmp_path, tiny_gpt2, rows, *args, **kwargs)
    assert python in said and "--" not in said, said
    assert command_line in cli, cli


def test_a_quick_try_names_the_python_arguments(tiny_gpt2, gpt2_engine):
    """`runner.generate` of a prompt over the window, and with a chat template but without chat=True."""
    params = GenerationParams(max_new_tokens=4)
    with pytest.raises(RunnerError, match=r"lower max_new_tokens, or pass truncate='left'\)$"):
        runner.generate(LONG, tiny_gpt2, params, engine=gpt2_engine)
    with pytest.raises(
        RunnerError, match=r"^chat_template renders prompts sent as user messages: pass chat=True"
    ):
        runner.generate("hi", tiny_gpt2, params, engine=gpt2_engine, chat_template="{{ messages }}")
    said = invoke("generate", "hi", "-m", tiny_gpt2, "--chat-template", "{{ messages }}")
    assert "Error: --chat-template renders prompts sent as user messages: pass --chat too" in said.output


def test_a_warning_of_runner_run_names_the_python_argument(tmp_path, tiny_llama, llama_engine):
    """runner.run's warning of a chat model given raw prompts said "Pass --chat" in the notebook cell."""
    lines: list[str] = []
    rows = [{"prompt": "hello"}]
    runner.run(rows, tiny_llama, GenerationParams(max_new_tokens=2), output=tmp_path / "j", echo=lines.append,
               engine=llama_engine)  # fmt: skip
    warning = next(line for line in lines if line.startswith("WARNING: the model has a chat template"))
    assert "Pass chat=True to send each prompt as a user message" in warning, warning


def test_the_errors_file_says_the_same_whoever_submitted(tmp_path, tiny_gpt2):
    """errors.jsonl holds its problems in one spelling, the command line's: a repair writes it again and compares
    the bytes, so a notebook's job repaired from a terminal (or the other way round) must write the same."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello"}, {"prompt": LONG}])
    job = runner.submit(path, tiny_gpt2, GenerationParams(max_new_tokens=4), skip_invalid=True,
                        home=tmp_path / "py")  # fmt: skip
    cli = invoke(
        "--home", tmp_path / "cli", "submit", path, "-m", tiny_gpt2, "--max-new-tokens", 4, "--skip-invalid"
    )
    assert cli.exit_code == 0, cli.output
    stored = (job.dir / "errors.jsonl").read_bytes()
    assert stored == (tmp_path / "cli" / cli.stdout.strip() / "errors.jsonl").read_bytes()
    assert "pass --truncate left" in json.loads(stored.decode().splitlines()[0])["message"]
    # and the spelling of the command line ends with the command: Python's calls are told Python's again
    with pytest.raises(RunnerError, match=r"use skip_invalid=True"):
        runner.submit(path, tiny_gpt2, GenerationParams(max_new_tokens=4))


def test_a_model_or_device_a_notebook_cannot_use_is_named_as_its_call_gives_it(tiny_gpt2, monkeypatch):
    """A Colab CPU runtime (no GPU chosen) told `runner.generate(..., options=EngineOptions(device="cuda"))`
    "--device cuda: CUDA is not available", and an empty model "--model is empty"."""
    import torch

    params = GenerationParams(max_new_tokens=2)
    with pytest.raises(RunnerError, match=r"^model is empty: give a Hugging Face model id"):
        runner.generate("hi", "", params)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cuda = runner.EngineOptions(device="cuda")
    with pytest.raises(RunnerError, match=r"^EngineOptions\(device='cuda'\): CUDA is not available"):
        runner.generate("hi", tiny_gpt2, params, cuda)
    said = invoke("generate", "hi", "-m", tiny_gpt2, "--device", "cuda").output
    assert said.startswith("Error: --device cuda: CUDA is not available"), said
