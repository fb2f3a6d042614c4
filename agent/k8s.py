"""Where a process runs: container id and Kubernetes pod from its cgroup, pod names from the
API server.

cgroup paths name the pod UID and the container id under both cgroup drivers:
  systemd:  /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/
            cri-containerd-<id>.scope            (the UID's dashes written as underscores)
  cgroupfs: /kubepods/burstable/pod<uid>/<id>
Docker, CRI-O and containerd scopes outside Kubernetes give a container id only.

Pod names and namespaces come from the API server (pods on this node) when the pod's service
account token is mounted; without a token the lookup is skipped, quietly.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path

import httpx

log = logging.getLogger(__name__)

_POD_UID = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")
_CONTAINER = re.compile(r"(?:^|[/-])(?:cri-containerd-|crio-|docker-|libpod-)?([0-9a-f]{64})(?:\.scope)?$")
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def cgroup_info(pid: int, proc: str = "/proc") -> dict[str, str]:
    """{'container_id', 'pod_uid'} (those found) from /proc/<pid>/cgroup."""
    try:
        text = Path(proc, str(pid), "cgroup").read_text()
    except OSError:
        return {}
    return parse_cgroup(text)


def parse_cgroup(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        path = line.split(":", 2)[-1].strip()
        for part in reversed(path.split("/")):
            m = _CONTAINER.search(part)
            if m and "container_id" not in out:
                out["container_id"] = m.group(1)
        m = _POD_UID.search(path)
        if m and "pod_uid" not in out:
            out["pod_uid"] = m.group(1).replace("_", "-")
    return out


class PodResolver:
    """pod UID -> {namespace, pod, containers: {container_id: name}}, from the API server.

    Thread-safe. Refreshes at most every `ttl_s`; a failing API server is retried after `ttl_s`
    and never raises into callers.
    """

    def __init__(self, node: str, *, api_url: str | None = None, token: str | None = None,
                 ca_file: str | None = None, ttl_s: float = 30.0) -> None:
        self.node = node
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        self.api_url = api_url or (f"https://{host}:{port}" if host and port else None)
        if token is None and (SA_DIR / "token").exists():
            token = (SA_DIR / "token").read_text().strip()
        self.token = token
        if ca_file is None and (SA_DIR / "ca.crt").exists():
            ca_file = str(SA_DIR / "ca.crt")
        self.ca_file = ca_file
        self.ttl_s = ttl_s
        self._pods: dict[str, dict] = {}
        self._fetched = 0.0
        self._lock = threading.Lock()
        self.errors = 0

    @property
    def enabled(self) -> bool:
        return bool(self.api_url and self.token)

    def _refresh(self) -> None:
        url = f"{self.api_url}/api/v1/pods"
        params = {"fieldSelector": f"spec.nodeName={self.node}"} if self.node else {}
        verify: bool | str = self.ca_file or True
        try:
            r = httpx.get(url, params=params, headers={"authorization": f"Bearer {self.token}"},
                          verify=verify, timeout=5)
            r.raise_for_status()
            pods = {}
            for item in r.json().get("items", []):
                meta = item.get("metadata", {})
                containers = {}
                for cs in (item.get("status", {}).get("containerStatuses") or []):
                    cid = (cs.get("containerID") or "").split("://", 1)[-1]
                    if cid:
                        containers[cid] = cs.get("name", "")
                pods[meta.get("uid", "")] = {"namespace": meta.get("namespace", ""),
                                             "pod": meta.get("name", ""), "containers": containers}
            self._pods = pods
        except (httpx.HTTPError, ValueError) as exc:
            self.errors += 1
            log.info("pod lookup failed: %s", exc)

    def labels(self, pid: int, proc: str = "/proc") -> dict[str, str]:
        """container_id, and namespace/pod/container when known, for process `pid`."""
        info = cgroup_info(pid, proc)
        out = {}
        if "container_id" in info:
            out["container_id"] = info["container_id"]
        uid = info.get("pod_uid")
        if not uid or not self.enabled:
            return out
        with self._lock:
            if time.monotonic() - self._fetched > self.ttl_s or uid not in self._pods:
                if time.monotonic() - self._fetched > min(self.ttl_s, 5.0):
                    self._fetched = time.monotonic()
                    self._refresh()
            pod = self._pods.get(uid)
        if pod:
            out["namespace"] = pod["namespace"]
            out["pod"] = pod["pod"]
            cname = pod["containers"].get(out.get("container_id", ""))
            if cname:
                out["container"] = cname
        return out
