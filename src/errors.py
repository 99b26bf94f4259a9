"""User-facing errors: each message is one line that names the fix."""


class ConfigError(ValueError):
    """An invalid configuration value, caught before any work starts."""
