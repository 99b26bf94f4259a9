"""User-facing errors: each message is one line that names the fix."""

from __future__ import annotations

import sys


class ConfigError(ValueError):
    """An invalid configuration value, caught before any work starts."""


def exit_with(err: BaseException, code: int = 2) -> None:
    """Print `error: <message>` as one line on stderr and exit non-zero."""
    message = " ".join(str(err).split())  # one line, whatever the message holds
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)
