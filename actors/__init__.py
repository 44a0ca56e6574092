"""User actors, the pure state transition, the directory and the pooled runtime."""

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
