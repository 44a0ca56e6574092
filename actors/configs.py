"""The registry of tuning-config versions: append-only, persisted in the store."""

from __future__ import annotations

import threading
from dataclasses import replace

import structlog

from events.config import TuningConfig
from events.errors import Reason, Rejected
from store.recorder import Recorder

log = structlog.get_logger(__name__)


class ConfigRegistry:
    """Every config version ever used, by version; `current` stamps new events.

    Versions are never replaced: a change is a new version. The feature dimension is fixed for
    a store (changing it would make old weights meaningless).
    """

    def __init__(self, recorder: Recorder, default: TuningConfig) -> None:
        self._recorder = recorder
        self._lock = threading.Lock()
        self._versions: dict[int, TuningConfig] = {
            v: TuningConfig.decode(body) for v, body in recorder.configs().items()
        }
        if not self._versions:  # a new store; otherwise its recorded history wins
            self._save(default)
        self.current = self._newest()

    def _newest(self) -> TuningConfig:
        """The current config: the newest version that is the service's own (an experiment
        arm's config is labelled and never current)."""
        own = [v for v, c in self._versions.items() if c.label is None]
        return self._versions[max(own or self._versions)]

    def _save(self, config: TuningConfig) -> None:
        if not self._recorder.save_config(config.version, config.encode()):
            raise Rejected(
                Reason.UNKNOWN_CONFIG, f"config version {config.version} exists with other values"
            )
        self._versions[config.version] = config

    def add(self, config: TuningConfig) -> TuningConfig:
        """Record `config` as the next version and make it current."""
        with self._lock:
            if config.dim != self.current.dim:
                raise Rejected(
                    Reason.DIMENSION,
                    f"the store's feature dimension is {self.current.dim}, not {config.dim}",
                )
            config = config.with_version(max(self._versions) + 1)
            self._save(config)
            self.current = config
            log.info("config.added", version=config.version)
            return config

    def register(self, config: TuningConfig, label: str) -> TuningConfig:
        """Record `config` as the next version, labelled (an experiment arm's), without
        making it current."""
        with self._lock:
            if config.dim != self.current.dim:
                raise Rejected(
                    Reason.DIMENSION,
                    f"the store's feature dimension is {self.current.dim}, not {config.dim}",
                )
            config = replace(config, version=max(self._versions) + 1, label=label)
            self._save(config)
            log.info("config.registered", version=config.version, label=label)
            return config

    def adopt(self, config: TuningConfig) -> TuningConfig:
        """Make `config`'s settings current: a new version if they differ from the current
        ones (a change is a new version, never an edit), else the current version as it is.
        `microtune serve` adopts the TOML file's [tuning] table this way at every start."""
        if config.dim == self.current.dim and config.segments == self.current.segments:
            return self.current
        return self.add(config)

    def get(self, version: int | None) -> TuningConfig:
        if version is None:
            return self.current
        try:
            return self._versions[version]
        except KeyError:
            raise Rejected(
                Reason.UNKNOWN_CONFIG, f"config version {version} is unknown", "c"
            ) from None

    def refresh(self) -> None:
        """Read versions added by the store's writer since (a query process follows it)."""
        with self._lock:
            for version, body in self._recorder.configs().items():
                if version not in self._versions:
                    self._versions[version] = TuningConfig.decode(body)
            self.current = self._newest()

    def get_fresh(self, version: int | None) -> TuningConfig:
        """`get`, reading the store again for a version not seen yet."""
        try:
            return self.get(version)
        except Rejected:
            self.refresh()
            return self.get(version)

    def versions(self) -> dict[int, TuningConfig]:
        return dict(self._versions)
