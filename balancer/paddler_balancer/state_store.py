"""Desired state per model group, kept in memory or in a JSON file.

``memory://`` forgets on restart; ``file:///path.json`` survives it. The file is
written atomically (temp file + rename). Each group's state carries its ``version``
(only grows; :func:`paddler_core.desired_state.next_state_version`); a file written
before versions existed reads as version 0.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from paddler_core.desired_state import DEFAULT_MODEL_GROUP, BalancerDesiredState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupState:
    state: BalancerDesiredState
    owner: str | None = None
    """Who manages this group, e.g. ``ModelDeployment/ns/name``; None when edited by hand."""
    version: int = 0
    """The state's version (0: never set, or stored before versions existed)."""


class StateStore:
    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        if parsed.scheme == "memory":
            self.path: Path | None = None
        elif parsed.scheme == "file" and parsed.path:
            self.path = Path(parsed.path)
        else:
            raise ValueError(f"invalid --state-database {url!r}; use memory:// or file:///path.json")
        self.groups: dict[str, GroupState] = {}
        self.deleted: dict[str, int] = {}
        """Per deleted group, the version it had: agents still holding that state (their
        pods are being collected) must not bring the group back (no adoption at or below
        it), and a state set again later gets a newer version."""
        self._load()

    def get(self, group: str) -> BalancerDesiredState:
        return self.entry(group).state

    def entry(self, group: str) -> GroupState:
        """The group's state, owner and version; a group never set: the default state at version 0."""
        entry = self.groups.get(group)
        return entry if entry is not None else GroupState(BalancerDesiredState(), version=self.deleted.get(group, 0))

    def version(self, group: str) -> int:
        return self.entry(group).version

    def put(self, group: str, state: BalancerDesiredState, owner: str | None = None, version: int = 0) -> None:
        self.groups[group] = GroupState(state, owner, version)
        self.deleted.pop(group, None)
        self._save()

    def delete(self, group: str) -> bool:
        if group not in self.groups:
            return False
        self.deleted[group] = self.groups.pop(group).version
        self._save()
        return True

    def names(self) -> list[str]:
        return sorted(set(self.groups) | {DEFAULT_MODEL_GROUP})

    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        data = json.loads(self.path.read_text())
        for name, entry in data.get("groups", {}).items():
            self.groups[name] = GroupState(
                BalancerDesiredState.model_validate(entry["state"]), entry.get("owner"), int(entry.get("version", 0))
            )
        self.deleted = {name: int(version) for name, version in data.get("deleted", {}).items()}
        log.info("state loaded path=%s groups=%d", self.path, len(self.groups))

    def _save(self) -> None:
        if self.path is None:
            return
        data = {
            "groups": {
                name: {"state": g.state.to_json_dict(), "owner": g.owner, "version": g.version}
                for name, g in self.groups.items()
            },
            "deleted": self.deleted,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, self.path)
