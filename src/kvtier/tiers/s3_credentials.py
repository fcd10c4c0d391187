"""S3 credentials: from the environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``) or a profile of the shared credentials file (``AWS_PROFILE``,
``AWS_SHARED_CREDENTIALS_FILE``), never from a URL or a command line, and never logged: no
error message here quotes the file, and a credential's repr hides its secret."""

from __future__ import annotations

import configparser
import os
from dataclasses import dataclass
from pathlib import Path

from kvtier.errors import ConfigError


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    token: str = ""

    def __repr__(self) -> str:  # never print a secret
        return f"Credentials(access_key={self.access_key!r}, secret_key=***)"


def load_credentials(profile: str = "", path: str | None = None) -> Credentials:
    """Credentials from the environment, else from ``profile`` (or ``AWS_PROFILE``, else
    ``default``) in the shared credentials file (``path``, ``AWS_SHARED_CREDENTIALS_FILE``, or
    ``~/.aws/credentials``)."""
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY") and not profile:
        return _clean(
            env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], env.get("AWS_SESSION_TOKEN", "")
        )
    name = profile or env.get("AWS_PROFILE") or "default"
    where = Path(path or env.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials")
    where = where.expanduser()
    parser = configparser.ConfigParser(interpolation=None)  # a % in a secret is a character
    try:
        parser.read_string(where.read_text())
    except OSError as exc:
        raise ConfigError(
            f"S3 credentials: none in the environment (AWS_ACCESS_KEY_ID,"
            f" AWS_SECRET_ACCESS_KEY) and no readable credentials file at {where}"
            f" ({exc.strerror})"
        ) from None
    except configparser.Error:  # its message may quote a line of the file: a secret
        raise ConfigError(f"S3 credentials: {where} is not an INI credentials file") from None
    if name not in parser or "aws_access_key_id" not in parser[name]:
        raise ConfigError(f"S3 credentials: no profile {name!r} with aws_access_key_id in {where}")
    section = parser[name]
    return _clean(
        section["aws_access_key_id"],
        section.get("aws_secret_access_key", ""),
        section.get("aws_session_token", ""),
    )


def _clean(access_key: str, secret_key: str, token: str) -> Credentials:
    """Credentials without the white space a secret mounted from a file often ends with (a
    newline in a header would make http.client raise with the value in its message)."""
    return Credentials(access_key.strip(), secret_key.strip(), token.strip())
