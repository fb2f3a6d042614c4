import os
import subprocess
import sys

import pytest

from agent.discovery import Discovery
from agent.httpbody import BodyError
from agent.k8s import PodResolver, parse_cgroup
from agent.pyroscope_ingest import folded_profile, parse_app_name


def test_app_names():
    assert parse_app_name("shop.cpu{env=prod, region=eu}") == ("shop", {"env": "prod", "region": "eu"})
    assert parse_app_name("worker") == ("worker", {})
    with pytest.raises(BodyError, match="invalid tag"):
        parse_app_name("x{novalue}")
    with pytest.raises(BodyError, match="invalid name"):
        parse_app_name("{a=b}")


def test_folded_ingest():
    p = folded_profile("main;handle;parse 3\nmain;idle 2\n\n", 100, 0, 10**10)
    assert p.total("cpu") == 50_000_000 and p.total("samples") == 5
    stacks = {tuple(f.name for f in s): v for s, _l, v in p.iter_type("samples")}
    assert stacks[("parse", "handle", "main")] == 3
    with pytest.raises(BodyError, match="line 1"):
        folded_profile("no count here", 100, 0, 1)


SYSTEMD = """0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5b1e8b0f_9d0a_4c1f_8f3a_2d6c1a7e9b10.slice/cri-containerd-3f8a2e6a5d4c3b2a19081726354453627181920a1b2c3d4e5f60718293a4b5c6.scope
"""
CGROUPFS = """12:cpu,cpuacct:/kubepods/besteffort/pod1f7d2c3e-4b5a-4c6d-8e9f-0a1b2c3d4e5f/9c8b7a6f5e4d3c2b1a0f9e8d7c6b5a493827161514131211100f0e0d0c0b0a09
"""
DOCKER = "0::/system.slice/docker-aabbccddeeff00112233445566778899aabbccddeeff00112233445566778899.scope\n"


def test_cgroup_paths():
    assert parse_cgroup(SYSTEMD) == {
        "container_id": "3f8a2e6a5d4c3b2a19081726354453627181920a1b2c3d4e5f60718293a4b5c6",
        "pod_uid": "5b1e8b0f-9d0a-4c1f-8f3a-2d6c1a7e9b10"}
    assert parse_cgroup(CGROUPFS)["pod_uid"] == "1f7d2c3e-4b5a-4c6d-8e9f-0a1b2c3d4e5f"
    assert parse_cgroup(DOCKER) == {"container_id": "aabbccddeeff00112233445566778899aabbccddeeff00112233445566778899"}
    assert parse_cgroup("0::/user.slice/user-0.slice/session-1.scope\n") == {}


def test_pod_names_from_a_fake_api_server(tmp_path):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from agent.httpserver import ServerThread

    seen = {}

    async def pods(request):
        seen["auth"] = request.headers.get("authorization")
        seen["selector"] = request.query_params.get("fieldSelector")
        return JSONResponse({"items": [{
            "metadata": {"uid": "5b1e8b0f-9d0a-4c1f-8f3a-2d6c1a7e9b10", "name": "web-7d9",
                         "namespace": "shop"},
            "status": {"containerStatuses": [{"name": "app", "containerID":
                "containerd://3f8a2e6a5d4c3b2a19081726354453627181920a1b2c3d4e5f60718293a4b5c6"}]}}]})

    proc = tmp_path / "proc"
    (proc / "42").mkdir(parents=True)
    (proc / "42" / "cgroup").write_text(SYSTEMD)
    with ServerThread(Starlette(routes=[Route("/api/v1/pods", pods)]), "127.0.0.1", 0) as srv:
        r = PodResolver("node-1", api_url=srv.url, token="tok")
        assert r.labels(42, proc=str(proc)) == {
            "container_id": "3f8a2e6a5d4c3b2a19081726354453627181920a1b2c3d4e5f60718293a4b5c6",
            "namespace": "shop", "pod": "web-7d9", "container": "app"}
    assert seen == {"auth": "Bearer tok", "selector": "spec.nodeName=node-1"}
    # without a token the lookup is skipped, quietly
    none = PodResolver("node-1", api_url="http://127.0.0.1:9", token=None)
    assert not none.enabled
    assert none.labels(42, proc=str(proc)) == {"container_id": parse_cgroup(SYSTEMD)["container_id"]}


def test_discovery_finds_python_with_filters():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "marker-abc"])
    q = subprocess.Popen(["sleep", "30"])
    try:
        import time
        time.sleep(0.3)
        found = Discovery(include="marker-abc").scan()
        # children of the agent itself (py-spy) are never targets: run from a grandchild
        assert p.pid not in found
        sh = subprocess.run(["sh", "-c", f"{sys.executable} -c 'import time; time.sleep(30)' "
                             "marker-xyz >/dev/null 2>&1 & echo $!"], capture_output=True, text=True)
        gpid = int(sh.stdout.strip())
        time.sleep(0.3)
        found = Discovery(include="marker-xyz").scan()
        assert list(found) == [gpid] and found[gpid].create_time > 0
        assert gpid not in Discovery(include="marker-xyz", exclude="xyz").scan()
        assert q.pid not in Discovery().scan()  # not Python
        os.kill(gpid, 9)
    finally:
        p.kill()
        q.kill()
    from agent.errors import SpanflameError
    with pytest.raises(SpanflameError, match="regular expression"):
        Discovery(include="(")
