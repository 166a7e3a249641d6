"""`python -m runner ...` and the `runner` command."""

import sys


def main() -> None:
    """The `runner` command: runner.cli.main, with a Ctrl-C while its modules load (a tenth of a second, more on a
    busy machine) ending it as a Ctrl-C later does (exit 130, one line), not with Python's traceback."""
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("[runner] interrupted\n")
        raise SystemExit(130) from None
    cli_main()


if __name__ == "__main__":
    main()
