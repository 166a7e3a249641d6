"""Adversarial: the context-window rule (GenerationParams.prompt_budget) outside submit."""

import pytest


@pytest.mark.parametrize("extra", [[], ["--num-beams", "2"]], ids=["loop", "beams"])
def test_runner_generate_refuses_a_prompt_over_the_context_window(tiny_gpt2, extra):
    """Submit refuses such a row with "exceeds the model's context window"; `runner generate` feeds it to
    the model and dies in GPT-2's position embedding with a raw IndexError traceback."""
    from click.testing import CliRunner

    from runner.cli import cli

    prompt = "x" + " x" * 200  # ~400 tokens; the tiny GPT-2 has 256 positions
    result = CliRunner().invoke(cli, ["generate", prompt, "-m", tiny_gpt2, "--max-new-tokens", "4", *extra])
    assert not isinstance(result.exception, IndexError), repr(result.exception)
    assert result.exit_code != 0 and "context window" in result.output, result.output
