"""User-facing errors: the CLI prints these as one line and exits with status 2."""


class ConfigError(ValueError):
    """Bad input from the user: a file, an option or a combination of them."""
