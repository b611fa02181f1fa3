"""User-facing errors: the CLI prints these as one line and exits with status 2."""
import argparse


class ConfigError(ValueError):
    """Bad input from the user: a file, an option or a combination of them."""


class RunStopped(Exception):
    """A run stopped by SIGTERM or SIGINT: the CLI prints this as one line and exits with
    status 128 + the signal's number, like a process the signal ended."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one `dafl: error:` line (a ConfigError), not a usage block."""

    def error(self, message: str):
        raise ConfigError(f"{message} (`{self.prog} --help` lists the options)")


def read_yaml_mapping(path, what: str) -> dict:
    """A YAML file that must hold a mapping (`key: value` lines), or a one-line ConfigError."""
    import yaml

    try:
        data = yaml.safe_load(open(path).read())
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path} cannot be read: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{what} {path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold `key: value` settings, not a {type(data).__name__}")
    return data
