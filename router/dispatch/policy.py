"""The one policy every destination and remote node is held to: which addresses the router may
connect to (router.dispatch.ssrf) and which folders it may write to (router.dispatch.folders).

Built once from the settings; checked when a destination or remote node is saved (API, UI, the
TOML file, ``dicom-router check-config``: :meth:`DestinationPolicy.problems` names the field and
says why), and again by the adapters at every connection or write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from router.dispatch.ai import AIDestinationConfig
from router.dispatch.dicom import DicomDestinationConfig
from router.dispatch.file import FileDestinationConfig
from router.dispatch.folders import FolderPolicy
from router.dispatch.s3 import S3DestinationConfig
from router.dispatch.ssrf import AddressPolicy, url_problem
from router.settings import Settings


@dataclass(frozen=True)
class DestinationPolicy:
    """Addresses for DICOM, S3 and remote nodes; for AI URLs the same plus the AI allow-list;
    folders for file destinations."""

    addresses: AddressPolicy
    ai_addresses: AddressPolicy
    folders: FolderPolicy

    @classmethod
    def from_settings(cls, settings: Settings) -> DestinationPolicy:
        return cls(addresses=AddressPolicy.from_settings(settings),
                   ai_addresses=AddressPolicy.from_settings(
                       settings, allowed=settings.ai.allowed_networks),
                   folders=FolderPolicy.from_settings(settings))

    def problems(self, config: Any) -> dict[str, str]:
        """Field -> why the policy refuses this (otherwise valid) destination config."""
        problem: str | None = None
        key = ""
        if isinstance(config, DicomDestinationConfig):
            key, problem = "host", self.addresses.host_problem(config.host, config.port)
        elif isinstance(config, FileDestinationConfig):
            key, problem = "path", self.folders.problem(config.path)
        elif isinstance(config, S3DestinationConfig) and config.endpoint_url:
            key, problem = "endpoint_url", url_problem(config.endpoint_url, self.addresses)
        elif isinstance(config, AIDestinationConfig):
            key, problem = "url", url_problem(config.url, self.ai_addresses)
            if problem is not None and not self.ai_addresses.allowed:
                problem += " (an administrator may allow a network in [ai] allowed_networks)"
        return {key: problem} if problem else {}

    def remote_node_problems(self, host: str, port: int) -> dict[str, str]:
        """Field -> why the policy refuses a remote node at ``host``:``port``."""
        problem = self.addresses.host_problem(host, port)
        return {"host": problem} if problem else {}

