"""User actors, the pure state transition, the directory and the pooled runtime."""

# First, before any other import: importing it checks that `events`, `store`, `actors` and
# `adapters` are microtune's own here, with a clear error if not (README "Installed names").
# If `events` itself is another one, the check cannot be imported: say so instead.
try:
    from events import _distribution  # noqa: F401
except ImportError as error:
    if error.name != "events":
        raise
    raise ImportError(
        f"microtune cannot import its own `events` ({error}): another module or folder named "
        "`events` comes first on sys.path, or microtune's is missing. Rename that one or start "
        'Python from another directory; README "Installed names" says more.'
    ) from error

from actors.hygiene import engagement
from actors.learning import apply, predict
from actors.messages import Outcome
from actors.replay import replay_all, replay_user
from actors.state import UserState, decode_state, encode_state
from actors.system import DEFAULT_CONFIG, Microtune

__all__ = [
    "DEFAULT_CONFIG",
    "Microtune",
    "Outcome",
    "UserState",
    "apply",
    "decode_state",
    "encode_state",
    "engagement",
    "predict",
    "replay_all",
    "replay_user",
]
