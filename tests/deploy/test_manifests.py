"""The Kubernetes deployment (deploy/kubernetes, deploy/helm, deploy/Dockerfile), checked offline.

kubernetes-validate checks each document against the API schemas; the tests below check what
it cannot: that the pieces fit together (selectors, volumes, secret and config references) and
that the agent gets exactly the privileges, mounts, ports and settings it is meant to.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
CHART = DEPLOY / "helm" / "spanflame"
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
# An older release still in wide use, and the newest that kubernetes-validate bundles.
K8S_VERSIONS = ("1.30.0", "1.37.0")
NAMESPACE = "spanflame"
POD_LABELS = {"app.kubernetes.io/name": "spanflame",
              "app.kubernetes.io/component": "node-agent"}

DEFAULT_RESOURCES = ["namespace.yaml", "rbac.yaml", "configmap.yaml", "daemonset.yaml",
                     "service.yaml", "token.yaml"]
EXAMPLES = ["secret-example.yaml", "example-app.yaml"]

# The options of `spanflame run` the DaemonSet may set, as environment variables, and
# SPANFLAME_KERNEL_SRC (where probes/kheaders.py looks for the image's fallback headers).
ALLOWED_ENV = {
    "SPANFLAME_STORE", "SPANFLAME_LISTEN", "SPANFLAME_OTLP_LISTEN", "SPANFLAME_RATE",
    "SPANFLAME_WINDOW", "SPANFLAME_PROBES", "SPANFLAME_INCLUDE", "SPANFLAME_EXCLUDE",
    "SPANFLAME_EXPORT_PYROSCOPE", "SPANFLAME_EXPORT_PYROSCOPE_TENANT",
    "SPANFLAME_EXPORT_PYROSCOPE_USER", "SPANFLAME_EXPORT_PYROSCOPE_PASSWORD",
    "SPANFLAME_EXPORT_PYROSCOPE_TOKEN", "SPANFLAME_AUTH_TOKEN", "SPANFLAME_NODE",
    "SPANFLAME_RETENTION_HOURS", "SPANFLAME_RETENTION_SIZE", "SPANFLAME_KERNEL_SRC",
    "SPANFLAME_ALLOWED_HOSTS",
}
SECRET_ENV = {"SPANFLAME_AUTH_TOKEN", "SPANFLAME_EXPORT_PYROSCOPE_USER",
              "SPANFLAME_EXPORT_PYROSCOPE_PASSWORD", "SPANFLAME_EXPORT_PYROSCOPE_TOKEN"}
# Where the image keeps its fallback kernel header trees (SPANFLAME_KERNEL_SRC).
IMAGE_KERNEL_SRC = "/opt/spanflame/kernel-src"
CAPABILITIES = {"BPF", "PERFMON", "SYS_PTRACE", "SYS_RESOURCE", "SYS_ADMIN"}

# mountPath of the agent container -> (host path or "emptyDir", readOnly)
AGENT_MOUNTS = {
    "/sys/kernel/tracing": ("/sys/kernel/tracing", True),
    "/sys/kernel/debug": ("/sys/kernel/debug", True),
    "/sys/fs/cgroup": ("/sys/fs/cgroup", True),
    "/lib/modules": ("/lib/modules", True),
    # The host's /usr/src, at the path the host's /lib/modules/<release>/build links point to.
    # The image's fallback headers are in /opt/spanflame/kernel-src, which this does not hide.
    "/usr/src": ("/usr/src", True),
    "/var/lib/spanflame": ("/var/lib/spanflame", False),
    "/var/cache/spanflame": ("emptyDir", False),
    "/tmp": ("emptyDir", False),
}


# -- loading and rendering -------------------------------------------------------------------

def load_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def load_file(path: Path) -> list[dict]:
    return load_docs(path.read_text())


def by_kind(docs: list[dict]) -> dict[str, dict]:
    """Documents by kind; the two service accounts (the agent's, token.yaml's) by kind/name."""
    out: dict[str, dict] = {}
    for d in docs:
        key = d["kind"]
        if key == "ServiceAccount":
            key = f"ServiceAccount/{d['metadata']['name']}"
        assert key not in out, f"two {key} documents"
        out[key] = d
    return out


_PLACEHOLDER = re.compile(r"\{\{\s*\.(Values(?:\.\w+)+|Release\.Namespace)\s*\}\}")


def render_chart(values: dict | None = None, namespace: str = NAMESPACE) -> dict[str, str]:
    """What `helm template -n <namespace>` makes of the chart's plain substitutions."""
    values = values if values is not None else yaml.safe_load((CHART / "values.yaml").read_text())

    def lookup(m: re.Match) -> str:
        path = m.group(1)
        if path == "Release.Namespace":
            return namespace
        node = values
        for key in path.split(".")[1:]:
            assert isinstance(node, dict) and key in node, f"{m.group(0)}: no such value"
            node = node[key]
        assert isinstance(node, (str, int, float, bool)), f"{m.group(0)} is not a scalar"
        return str(node).lower() if isinstance(node, bool) else str(node)

    rendered = {}
    for path in sorted((CHART / "templates").glob("*.yaml")):
        text = _PLACEHOLDER.sub(lookup, path.read_text())
        leftover = re.search(r"\{\{.*?\}\}", text)
        assert leftover is None, f"{path.name}: unresolved template {leftover.group(0)}"
        rendered[path.name] = text
    return rendered


def run_validate(paths: list[Path]) -> None:
    cmd = [str(VALIDATE), "--strict"]
    for v in K8S_VERSIONS:
        cmd += ["-k", v]
    cmd += [str(p) for p in paths]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{shlex.join(cmd)} exited {proc.returncode}:\n{out}"
    # An unknown kind or apiVersion is only a WARN with exit code 0: not good enough.
    assert "WARN" not in out and "ERROR" not in out, out
    expected = sum(len(load_file(p)) for p in paths) * len(K8S_VERSIONS)
    assert out.count(" passed for resource ") == expected, out


@pytest.fixture(scope="module")
def kustomize_docs() -> list[dict]:
    return [d for name in DEFAULT_RESOURCES for d in load_file(K8S / name)]


@pytest.fixture(scope="module")
def helm_docs() -> list[dict]:
    return [d for text in render_chart().values() for d in load_docs(text)]


@pytest.fixture(scope="module", params=["kustomize", "helm"])
def resources(request, kustomize_docs, helm_docs) -> dict[str, dict]:
    """The default resources, by kind, from either source: every check below runs on both."""
    return by_kind(kustomize_docs if request.param == "kustomize" else helm_docs)


def agent_container(resources: dict[str, dict]) -> dict:
    containers = resources["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["agent"]
    return containers[0]


def pod_spec(resources: dict[str, dict]) -> dict:
    return resources["DaemonSet"]["spec"]["template"]["spec"]


# -- schema validation ----------------------------------------------------------------------

def test_validator_is_strict(tmp_path):
    """Guard for the tests below: --strict really rejects an unknown field."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {}\nbogus: 1\n")
    proc = subprocess.run([str(VALIDATE), "--strict", str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0, proc.stdout


def test_kubernetes_manifests_validate():
    files = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert {p.name for p in files} == set(DEFAULT_RESOURCES) | set(EXAMPLES)
    run_validate(files)


def test_kustomization_lists_the_default_resources():
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert k["kind"] == "Kustomization"
    assert k["resources"] == DEFAULT_RESOURCES
    assert all((K8S / name).is_file() for name in k["resources"])
    assert [i["name"] for i in k["images"]] == ["spanflame"]


def test_helm_chart_renders_and_validates(tmp_path):
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "spanflame"
    paths = []
    for name, text in render_chart().items():
        (tmp_path / name).write_text(text)
        paths.append(tmp_path / name)
    run_validate(paths)


def test_helm_values_are_used():
    """Changed values reach the output (and the renderer fails on an unknown value)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    values["image"]["repository"] = "registry.example.com/spanflame"
    values["ports"]["otlp"] = 14318
    values["config"]["include"] = r"gunicorn|uvicorn\b"
    docs = by_kind([d for t in render_chart(values, namespace="obs").values()
                    for d in load_docs(t)])
    c = agent_container(docs)
    assert c["image"] == "registry.example.com/spanflame:0.1.0"
    assert docs["DaemonSet"]["metadata"]["namespace"] == "obs"
    assert docs["ClusterRoleBinding"]["subjects"][0]["namespace"] == "obs"
    assert {p["containerPort"] for p in c["ports"]} == {4040, 14318}
    assert docs["ConfigMap"]["data"]["SPANFLAME_INCLUDE"] == r"gunicorn|uvicorn\b"
    del values["ports"]["otlp"]
    with pytest.raises(AssertionError, match="no such value"):
        render_chart(values)


def test_helm_matches_kustomize(kustomize_docs, helm_docs):
    """With the default values the chart renders the same resources (bar the Namespace,
    which the chart leaves to the user, see its README)."""
    kust = {(d["kind"], d["metadata"]["name"]): d for d in kustomize_docs}
    helm = {(d["kind"], d["metadata"]["name"]): d for d in helm_docs}
    assert ("Namespace", NAMESPACE) in kust
    del kust[("Namespace", NAMESPACE)]
    assert sorted(helm) == sorted(kust)
    for key in kust:
        assert helm[key] == kust[key], f"{key} differs between the chart and deploy/kubernetes"


# -- what the schemas do not check --------------------------------------------------------

def test_labels_and_selectors(resources):
    for kind, doc in resources.items():
        labels = doc["metadata"].get("labels", {})
        assert {k: labels.get(k) for k in POD_LABELS} == POD_LABELS, kind
    ds = resources["DaemonSet"]
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    selector = ds["spec"]["selector"]
    assert set(selector) == {"matchLabels"}
    assert selector["matchLabels"].items() <= pod_labels.items()
    assert selector["matchLabels"] == POD_LABELS
    svc_selector = resources["Service"]["spec"]["selector"]
    assert svc_selector and svc_selector.items() <= pod_labels.items()


def test_namespace_allows_privileged_pods(kustomize_docs):
    ns = by_kind(kustomize_docs)["Namespace"]
    assert ns["metadata"]["name"] == NAMESPACE
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    for d in kustomize_docs:
        if d["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert d["metadata"]["namespace"] == NAMESPACE, d["kind"]


def test_rbac_reads_pods_only(resources):
    sa = resources["ServiceAccount/spanflame"]
    spec = pod_spec(resources)
    assert spec["serviceAccountName"] == sa["metadata"]["name"]
    assert spec.get("automountServiceAccountToken", True) is True
    role = resources["ClusterRole"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"],
                              "verbs": ["get", "list", "watch"]}]
    binding = resources["ClusterRoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]


def test_privileges(resources):
    spec = pod_spec(resources)
    assert spec["hostPID"] is True
    assert not spec.get("hostNetwork", False)
    sc = agent_container(resources)["securityContext"]
    assert not sc.get("privileged", False)
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sorted(sc["capabilities"]["add"]) == sorted(CAPABILITIES)
    assert len(sc["capabilities"]["add"]) == len(CAPABILITIES)
    assert sc["readOnlyRootFilesystem"] is True
    # Kubernetes rejects allowPrivilegeEscalation: false together with CAP_SYS_ADMIN.
    assert "allowPrivilegeEscalation" not in sc
    for init in spec.get("initContainers", []):
        isc = init["securityContext"]
        assert isc["capabilities"] == {"drop": ["ALL"]}, init["name"]
        assert isc["readOnlyRootFilesystem"] is True and isc["allowPrivilegeEscalation"] is False


def test_every_mount_has_a_volume(resources):
    spec = pod_spec(resources)
    names = [v["name"] for v in spec["volumes"]]
    assert len(names) == len(set(names)), names
    used = set()
    for c in spec["containers"] + spec.get("initContainers", []):
        paths = [m["mountPath"] for m in c["volumeMounts"]]
        assert len(paths) == len(set(paths)), c["name"]
        for m in c["volumeMounts"]:
            assert m["name"] in names, f"{c['name']}: mount {m['name']} has no volume"
            used.add(m["name"])
    assert used == set(names), f"unused volumes: {set(names) - used}"


def test_agent_mounts(resources):
    spec = pod_spec(resources)
    volumes = {v["name"]: v for v in spec["volumes"]}
    found = {}
    for m in agent_container(resources)["volumeMounts"]:
        v = volumes[m["name"]]
        source = v["hostPath"]["path"] if "hostPath" in v else ("emptyDir" if "emptyDir" in v
                                                                  else None)
        found[m["mountPath"]] = (source, m.get("readOnly", False))
    assert found == AGENT_MOUNTS
    store = next(v for v in volumes.values()
                 if v.get("hostPath", {}).get("path") == "/var/lib/spanflame")
    assert store["hostPath"]["type"] == "DirectoryOrCreate"


def test_kernel_headers(resources, monkeypatch):
    """No init container: the host's /usr/src is mounted read-only where the host's
    /lib/modules/<release>/build links point, and the agent itself falls back to the image's
    trees in SPANFLAME_KERNEL_SRC, a path the mount does not hide."""
    spec = pod_spec(resources)
    assert "initContainers" not in spec
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in agent_container(resources)["volumeMounts"]}
    for path in ("/usr/src", "/lib/modules"):
        m = mounts[path]
        assert m["readOnly"] is True, path
        assert set(volumes[m["name"]]) == {"name", "hostPath"}, path
        assert volumes[m["name"]]["hostPath"]["path"] == path
    assert volumes[mounts["/lib/modules"]["name"]]["hostPath"]["type"] == "Directory"
    assert not any(p == IMAGE_KERNEL_SRC or p.startswith(IMAGE_KERNEL_SRC + "/")
                   or IMAGE_KERNEL_SRC.startswith(p.rstrip("/") + "/") for p in mounts), \
        "a mount hides the image's fallback headers"

    env = {e["name"]: e for e in agent_container(resources)["env"]}
    assert env["SPANFLAME_KERNEL_SRC"] == {"name": "SPANFLAME_KERNEL_SRC",
                                           "value": IMAGE_KERNEL_SRC}
    # It is also the agent's default, searched after /usr/src.
    from probes import kheaders
    monkeypatch.delenv("SPANFLAME_KERNEL_SRC", raising=False)
    assert kheaders.src_dirs() == [Path("/usr/src"), Path(IMAGE_KERNEL_SRC)]


def test_ports_and_probes(resources):
    c = agent_container(resources)
    ports = {p["name"]: p for p in c["ports"]}
    assert {(p["containerPort"], p.get("hostPort"), p["protocol"]) for p in ports.values()} == {
        (4040, 4040, "TCP"), (4318, 4318, "TCP")}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": 4040}, probe
    ann = resources["DaemonSet"]["spec"]["template"]["metadata"]["annotations"]
    assert ann == {"prometheus.io/scrape": "true", "prometheus.io/port": "4040",
                   "prometheus.io/path": "/metrics"}
    svc = resources["Service"]["spec"]
    assert svc["type"] == "ClusterIP" and svc["internalTrafficPolicy"] == "Local"
    assert {(p["port"], p["targetPort"]) for p in svc["ports"]} == {
        (4040, "http"), (4318, "otlp-http")}
    assert {p["targetPort"] for p in svc["ports"]} <= set(ports)
    for p in svc["ports"]:
        assert ports[p["targetPort"]]["containerPort"] == p["port"]


def test_rollout_and_scheduling(resources):
    ds = resources["DaemonSet"]["spec"]
    assert ds["updateStrategy"] == {"type": "RollingUpdate",
                                    "rollingUpdate": {"maxUnavailable": 1}}
    assert {"operator": "Exists"} in ds["template"]["spec"]["tolerations"]


def test_environment(resources):
    c = agent_container(resources)
    assert c["command"] == ["spanflame", "run"]
    env = {e["name"]: e for e in c["env"]}
    assert len(env) == len(c["env"]), "duplicate env entries"
    config = resources["ConfigMap"]
    assert c["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    names = set(env) | set(config["data"])
    assert names <= ALLOWED_ENV, names - ALLOWED_ENV
    assert not set(env) & set(config["data"]), "set twice"
    assert all(isinstance(v, str) for v in config["data"].values())
    assert not SECRET_ENV & set(config["data"]), "credentials belong in the Secret"

    assert env["SPANFLAME_NODE"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["SPANFLAME_STORE"]["value"] == "/var/lib/spanflame"
    assert env["SPANFLAME_LISTEN"]["value"] == "0.0.0.0:4040"
    assert env["SPANFLAME_OTLP_LISTEN"]["value"] == "0.0.0.0:4318"
    assert config["data"]["SPANFLAME_RETENTION_HOURS"] == "72"
    assert config["data"]["SPANFLAME_RETENTION_SIZE"] == "10GiB"
    assert config["data"]["SPANFLAME_WINDOW"] == "10"

    secret_refs = {n: e["valueFrom"]["secretKeyRef"] for n, e in env.items()
                   if "secretKeyRef" in e.get("valueFrom", {})}
    assert set(secret_refs) == SECRET_ENV
    # The auth token: required, from the Secret the deployment creates (test_auth_token).
    assert secret_refs.pop("SPANFLAME_AUTH_TOKEN") == {"name": "spanflame-auth", "key": "token"}
    for name, ref in secret_refs.items():
        assert ref["optional"] is True, name
        assert ref["name"] == "spanflame" and ref["key"] == name
    # The example Secret has exactly the (optional) keys the DaemonSet reads from it.
    example = load_file(K8S / "secret-example.yaml")[0]
    assert example["metadata"]["name"] == "spanflame"
    assert example["metadata"]["namespace"] == NAMESPACE
    assert set(example["stringData"]) == set(secret_refs)
    # Host names the Service gives the agents (the guard checks the Host header).
    assert config["data"]["SPANFLAME_ALLOWED_HOSTS"].split(",") == [
        f"spanflame.{NAMESPACE}.svc", f"spanflame.{NAMESPACE}.svc.cluster.local"]


def test_auth_token_is_created_and_mounted_by_default(resources):
    """The agents listen on the nodes' addresses, so they need a token (agent/httpguard.py):
    the deployment creates a Secret that the cluster fills with one (a service-account token
    of an account with no roles and no mounted token), and the agent reads it, required."""
    secret = resources["Secret"]
    assert secret["metadata"]["name"] == "spanflame-auth"
    assert secret["type"] == "kubernetes.io/service-account-token"
    account = secret["metadata"]["annotations"]["kubernetes.io/service-account.name"]
    sa = resources[f"ServiceAccount/{account}"]
    assert sa["automountServiceAccountToken"] is False
    assert sa["metadata"]["namespace"] == secret["metadata"]["namespace"]
    bound = {s["name"] for s in resources["ClusterRoleBinding"]["subjects"]}
    assert account not in bound, "the token's account has no roles"
    env = {e["name"]: e for e in agent_container(resources)["env"]}
    ref = env["SPANFLAME_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "spanflame-auth", "key": "token"} and "optional" not in ref


def test_resources(resources):
    r = agent_container(resources)["resources"]
    assert r["limits"] == {"cpu": "500m", "memory": "256Mi"}
    assert r["requests"]["cpu"] == "50m"
    assert r["requests"]["memory"] == "200Mi"


def test_images_agree(resources):
    spec = pod_spec(resources)
    images = {c["image"] for c in spec["containers"] + spec.get("initContainers", [])}
    assert images == {"spanflame:0.1.0"}


# -- the example app -------------------------------------------------------------------------

def test_example_app():
    [dep] = load_file(K8S / "example-app.yaml")
    assert dep["kind"] == "Deployment"
    assert dep["spec"]["selector"]["matchLabels"].items() <= \
        dep["spec"]["template"]["metadata"]["labels"].items()
    [c] = dep["spec"]["template"]["spec"]["containers"]
    names = [e["name"] for e in c["env"]]
    env = {e["name"]: e for e in c["env"]}
    assert env["HOST_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "http://$(HOST_IP):4318"
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"]["value"] == "http/protobuf"
    assert env["PYROSCOPE_SERVER_ADDRESS"]["value"] == "http://$(HOST_IP):4040"
    # $(VAR) only expands variables defined earlier in the list.
    for name, e in env.items():
        for ref in re.findall(r"\$\((\w+)\)", e.get("value", "")):
            assert names.index(ref) < names.index(name), f"{name} uses {ref} before it is set"


# -- the image -------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text()
    text = re.sub(r"^\s*#.*\n", "", text, flags=re.M)   # comments (also inside continuations)
    text = re.sub(r"\\\n", " ", text)                   # line continuations
    out = []
    for line in text.splitlines():
        if line.strip():
            op, _, rest = line.strip().partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile():
    instr = dockerfile_instructions()
    froms = [arg for op, arg in instr if op == "FROM"]
    assert froms == ["debian:bookworm-slim"]

    runs = " ".join(arg for op, arg in instr if op == "RUN")
    install = re.search(r"apt-get install ([^&;]*)", runs)
    assert install, "no apt-get install"
    words = install.group(1).split()
    assert "--no-install-recommends" in words
    assert {"python3", "python3-venv", "python3-bpfcc", "bpfcc-tools", "linux-headers-amd64",
            "ca-certificates"} <= set(words)
    assert "/usr/bin/python3 -m venv /opt/spanflame/.venv" in runs
    pip = re.search(r"/opt/spanflame/\.venv/bin/pip install ([^&;]*)", runs)
    assert pip and "-e" not in pip.group(1).split() and "--editable" not in pip.group(1)
    assert "import bcc, os; print(os.path.dirname(bcc.__file__))" in runs
    assert re.search(r"ln -s .*/bcc\"", runs), "bcc is not linked into the venv"

    copies = [arg.split() for op, arg in instr if op == "COPY"]
    assert copies
    sources = []
    for args in copies:
        assert not any(a.startswith("--from") for a in args)
        sources += args[:-1]
    for src in sources:
        assert (ROOT / src).exists(), f"COPY source {src} is not in the repository"
    assert {"pyproject.toml", "README.md", "agent", "probes", "flamegraph"} <= set(sources)

    [entry] = [json.loads(arg) for op, arg in instr if op == "ENTRYPOINT"]
    assert entry == ["/opt/spanflame/.venv/bin/spanflame", "run"]
    env = " ".join(arg for op, arg in instr if op == "ENV")
    assert "PATH=/opt/spanflame/.venv/bin:$PATH" in env
    # The fallback headers move out of /usr/src, which the DaemonSet's hostPath mount hides.
    assert f"mv /usr/src/linux-headers-* {IMAGE_KERNEL_SRC}/" in runs


def test_dockerignore_keeps_the_copied_sources():
    lines = [ln.strip() for ln in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"
    kept = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    sources = {a for op, arg in dockerfile_instructions() if op == "COPY"
               for a in arg.split()[:-1]}
    assert sources <= kept
