"""Who may do what: NATS users per role, admin tokens, and the client side of both.

Safe as shipped: the embedded server runs with authorization. `ensure_credentials` generates,
once, a password per role and an admin token into `<data dir>/auth/` (owner-only), and the
nats-server configuration that grants each role only its subjects:

| role      | may publish                         | may subscribe | for                          |
|-----------|-------------------------------------|---------------|------------------------------|
| publisher | `<p>.events.>`, `<p>.info`          | `_INBOX.>`    | your services' events        |
| querier   | `<p>.query.>`, `<p>.q.>`, `<p>.info`| `_INBOX.>`    | asking for content weights   |
| catalog   | `<p>.content`, `<p>.info`           | `_INBOX.>`    | your CMS's item features     |
| admin     | everything                          | everything    | operators (rejected stream)  |
| service   | everything                          | everything    | `microtune serve` itself     |

A publisher cannot erase or roll back users, clear bot verdicts, write the catalog, or read
the rejected stream's raw bytes; what changes users also needs an admin token in the request
(see `adapters.nats_service`), so a NATS account shared with other teams is not enough.

For an external NATS, `microtune auth-config` writes the same files for your server.
Secrets never need the command line (`ps` shows it): clients read `MICROTUNE_NATS_USER`,
`MICROTUNE_NATS_PASSWORD` (or `MICROTUNE_NATS_PASSWORD_FILE`), `MICROTUNE_ADMIN_TOKEN` (or
`MICROTUNE_ADMIN_TOKEN_FILE`) from the environment; `. <data dir>/auth/<role>.env` sets them.
"""

from __future__ import annotations

import json
import os
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("service", "publisher", "querier", "catalog", "admin")
ADMIN_TOKEN_NAME = "admin"


def permissions(role: str, prefix: str = "microtune") -> dict[str, Any]:
    """The nats-server permissions of a role (allow lists; anything else is denied)."""
    if role in ("service", "admin"):
        return {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}
    subjects = {"publisher": [f"{prefix}.events.>"],
                # a fleet's server maps `query.<user>` to `q.<partition>.<user>` before it
                # checks permissions (adapters/fleet/worker.py)
                "querier": [f"{prefix}.query.>", f"{prefix}.q.>"],
                "catalog": [f"{prefix}.content"]}[role]
    # every client may ask `<prefix>.info` (read-only: the dimension, versions, catalog)
    return {"publish": {"allow": [*subjects, f"{prefix}.info"]},
            "subscribe": {"allow": ["_INBOX.>"]}}


@dataclass(frozen=True, slots=True)
class Credentials:
    """The generated secrets of one deployment (see `ensure_credentials`)."""

    folder: Path
    passwords: dict[str, str]  # role -> password
    admin_tokens: dict[str, str]  # name -> token

    @property
    def server_config(self) -> Path:
        return self.folder / "nats-server.conf"

    def connect_options(self, role: str) -> dict[str, str]:
        return {"user": role, "password": self.passwords[role]}


def server_config_text(passwords: dict[str, str], prefix: str = "microtune") -> str:
    """A nats-server configuration with one user per role (JSON is valid nats-server
    configuration syntax, and quoting cannot go wrong)."""
    users = [{"user": role, "password": passwords[role], "permissions": permissions(role, prefix)}
             for role in ROLES]
    return "authorization " + json.dumps({"users": users}, indent=2) + "\n"


def ensure_credentials(folder: Path | str, prefix: str = "microtune") -> Credentials:
    """Load the deployment's credentials from `folder`, generating what is missing (once:
    clients keep working across restarts). Files are owner-only (0600, folder 0700)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    secrets_file = folder / "secrets.toml"
    stored: dict[str, Any] = {}
    if secrets_file.exists():
        with secrets_file.open("rb") as f:
            stored = tomllib.load(f)
    passwords = dict(stored.get("passwords", {}))
    tokens = dict(stored.get("admin_tokens", {}))
    changed = False
    for role in ROLES:
        if role not in passwords:
            passwords[role] = secrets.token_urlsafe(24)
            changed = True
    if not tokens:
        tokens[ADMIN_TOKEN_NAME] = secrets.token_urlsafe(32)
        changed = True
    creds = Credentials(folder, passwords, tokens)
    _write_private(creds.server_config, server_config_text(passwords, prefix))  # the prefix
    if changed:
        _write_private(secrets_file, _secrets_toml(passwords, tokens))
        for role in ROLES:
            lines = [f"MICROTUNE_NATS_USER={role}", f"MICROTUNE_NATS_PASSWORD={passwords[role]}"]
            if role == "admin":
                lines.append(f"MICROTUNE_ADMIN_TOKEN={tokens[ADMIN_TOKEN_NAME]}")
            _write_private(folder / f"{role}.env", "\n".join(lines) + "\n")
    return creds


def load_admin_tokens(path: Path | str) -> dict[str, str]:
    """Admin tokens from a TOML file: `name = "token"` pairs, or an `[admin_tokens]` table
    (the `secrets.toml` that `ensure_credentials` writes)."""
    with Path(path).open("rb") as f:
        values = tomllib.load(f)
    tokens = values.get("admin_tokens", values)
    bad = [k for k, v in tokens.items() if not isinstance(v, str) or len(v) < 16]
    if bad:
        raise ValueError(f"{path}: admin tokens must be strings of 16 characters or more "
                         f"({', '.join(bad)})")
    return dict(tokens)


def _secrets_toml(passwords: dict[str, str], tokens: dict[str, str]) -> str:
    lines = ["# generated by microtune: keep private", "[passwords]"]
    lines += [f"{role} = {json.dumps(pw)}" for role, pw in passwords.items()]
    lines += ["", "[admin_tokens]"]
    lines += [f"{json.dumps(name)} = {json.dumps(tok)}" for name, tok in tokens.items()]
    return "\n".join(lines) + "\n"


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT


# ---------------------------------------------------------------- the client side


def _secret(name: str) -> str | None:
    """`MICROTUNE_<NAME>`, or the first line of the file named by `MICROTUNE_<NAME>_FILE`."""
    value = os.environ.get(f"MICROTUNE_{name}")
    if value:
        return value
    path = os.environ.get(f"MICROTUNE_{name}_FILE")
    if path:
        return Path(path).read_text().strip()
    return None


def client_options() -> dict[str, Any]:
    """nats.connect options from the environment (user and password, token or creds file)."""
    options: dict[str, Any] = {}
    user = os.environ.get("MICROTUNE_NATS_USER")
    if user:
        options.update(user=user, password=_secret("NATS_PASSWORD") or "")
    token = _secret("NATS_TOKEN")
    if token:
        options["token"] = token
    creds = os.environ.get("MICROTUNE_NATS_CREDS")
    if creds:
        options["user_credentials"] = creds
    return options


def admin_token() -> str | None:
    return _secret("ADMIN_TOKEN")
