"""The transformers versions runner is tested on, and the check that refuses others.

The engine's KV cache and grouped attention (kvcache.py) reach into transformers' cache layers and attention
interface, which change between releases; Colab preinstalls whatever transformers it likes. So the range in
pyproject.toml is the range the suite has passed on: LOWEST by `make test-compat` (a second environment),
NEWEST by `make test`. Outside it, loading a model stops with a message saying what to install, instead of
risking a wrong result; RUNNER_UNTESTED_TRANSFORMERS=1 lets it run anyway, with a warning.
"""

from __future__ import annotations

import os
import sys

from .errors import RunnerError

LOWEST = "5.0.0"  # the oldest release the engine tests pass on (make test-compat)
NEWEST = "5.24.0"  # the newest release the full suite passes on
ALLOW_ENV = "RUNNER_UNTESTED_TRANSFORMERS"


def _key(version: str) -> tuple[int, ...]:
    """'5.17.0' -> (5, 17, 0); a pre-release or local suffix ('5.25.0.dev0', '5.1.0+cu') is cut off."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(c for c in piece if c.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def supported(version: str) -> bool:
    """Within [LOWEST, NEWEST], compared by major.minor.patch (5.24.3 counts as tested with 5.24.0)."""
    return _key(LOWEST) <= _key(version) and _key(version)[:2] <= _key(NEWEST)[:2]


def check_transformers(version: str | None = None) -> None:
    """Raise RunnerError naming the tested range when transformers is outside it (unless ALLOW_ENV is set)."""
    if version is None:
        import transformers

        version = transformers.__version__
    if supported(version):
        return
    message = (
        f"runner is tested with transformers {LOWEST} to {_minor(NEWEST)}.x, and this environment has {version}: "
        f"pip install 'transformers>={LOWEST},<{_next_minor(NEWEST)}' (or set {ALLOW_ENV}=1 to try it anyway)"
    )
    if os.environ.get(ALLOW_ENV) == "1":
        print(f"warning: {message}", file=sys.stderr)
        return
    raise RunnerError(message)


def _minor(version: str) -> str:
    return ".".join(str(p) for p in _key(version)[:2])


def _next_minor(version: str) -> str:
    major, minor = _key(version)[:2]
    return f"{major}.{minor + 1}"
