"""``ftpfix k8s`` and the committed deploy/k8s/ example: the manifests parse and agree with the config.

Each pod is simulated the way ftpfix in it reads its config: the ConfigMap's
file with the StatefulSet's environment (``HOSTNAME`` is the pod's name), so
the slice a pod leases is computed by ftpfix itself, not by the test.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from ftpfix import cli, k8s
from ftpfix.config import _environment_overrides, parse_config
from ftpfix.ports import PortRange

ROOT = Path(__file__).resolve().parent.parent.parent
EXAMPLE = ROOT / "deploy" / "k8s"
COMMAND = ["k8s", "--replicas", "3", "--ports", "50000-50029", "--config", "deploy/k8s/ftpfix.toml"]


def generate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        status = cli.main(list(args))
    finally:
        os.chdir(cwd)
    out, err = capsys.readouterr()
    return status, out, err


def by_kind(documents: list[dict], kind: str) -> list[dict]:
    return [document for document in documents if document["kind"] == kind]


def pod_config(documents: list[dict], ordinal: int, monkeypatch: pytest.MonkeyPatch):
    """The config ftpfix in pod ``ordinal`` runs with (TLS files aside: they are the Secret's)."""
    (configmap,) = by_kind(documents, "ConfigMap")
    (statefulset,) = by_kind(documents, "StatefulSet")
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    pod = f"{statefulset['metadata']['name']}-{ordinal}"
    for variable in container["env"]:
        if "value" in variable:
            # Kubernetes expands $(VAR) from the variables defined before it.
            monkeypatch.setenv(variable["name"], variable["value"].replace("$(POD_NAME)", pod))
    monkeypatch.setenv("HOSTNAME", pod)
    document = tomllib.loads(configmap["data"]["ftpfix.toml"])
    document = _environment_overrides(document, Path("ftpfix.toml"))
    return parse_config({name: table for name, table in document.items() if name != "tls"}), document.get("tls", {})


def test_the_committed_example_is_what_the_command_prints(capsys) -> None:
    status, out, err = generate(capsys, *COMMAND)
    assert status == 0, err
    assert out == (EXAMPLE / "ftpfix.yaml").read_text(), "run deploy/k8s/generate"
    assert " ".join(COMMAND) in (EXAMPLE / "generate").read_text()


def test_the_yaml_parses_and_says_what_the_generator_meant() -> None:
    text = (EXAMPLE / "ftpfix.toml").read_text()
    config, tls = k8s.read_config(text, "ftpfix.toml")
    meant = k8s.manifests(text, config, tls, k8s.Options(replicas=3, ports=PortRange(50000, 50029)))
    parsed = [document for document in yaml.safe_load_all((EXAMPLE / "ftpfix.yaml").read_text()) if document]
    assert parsed == meant


def test_every_passive_port_belongs_to_exactly_one_pod_and_its_slice(monkeypatch) -> None:
    documents = list(yaml.safe_load_all((EXAMPLE / "ftpfix.yaml").read_text()))
    services = {
        s["metadata"]["name"]: s for s in by_kind(documents, "Service") if s["spec"].get("type") == "LoadBalancer"
    }
    assert sorted(services) == ["ftpfix-0", "ftpfix-1", "ftpfix-2"]
    exposed: dict[int, list[str]] = {}
    for ordinal in range(3):
        name = f"ftpfix-{ordinal}"
        service = services[name]
        assert service["spec"]["selector"] == {"statefulset.kubernetes.io/pod-name": name}
        assert service["spec"]["externalTrafficPolicy"] == "Local"
        config, _ = pod_config(documents, ordinal, monkeypatch)
        ports = service["spec"]["ports"]
        control = [port for port in ports if port["name"] == "ftp"]
        assert control == [{"name": "ftp", "port": 21, "targetPort": config.listen.port}]
        passive = [port["port"] for port in ports if port["name"] != "ftp"]
        assert all(port["targetPort"] == port["port"] for port in ports if port["name"] != "ftp")
        # What this pod's ftpfix leases is exactly what its Service exposes.
        assert passive == list(config.passive.leased_ports), name
        for port in passive:
            exposed.setdefault(port, []).append(name)
        # ... and it advertises the name that points at its own Service.
        assert (
            config.passive.public_address
            == service["metadata"]["annotations"]["external-dns.alpha.kubernetes.io/hostname"]
        )
    assert sorted(exposed) == list(range(50000, 50030))
    assert all(len(owners) == 1 for owners in exposed.values())


def test_the_probes_ask_the_health_endpoints_on_the_metrics_port(monkeypatch) -> None:
    documents = list(yaml.safe_load_all((EXAMPLE / "ftpfix.yaml").read_text()))
    config, _ = pod_config(documents, 0, monkeypatch)
    (statefulset,) = by_kind(documents, "StatefulSet")
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    named = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert named["metrics"] == config.metrics.listen.port
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert config.metrics.listen.host == "0.0.0.0"
    # The metrics port is never on a public Service.
    for service in by_kind(documents, "Service"):
        assert all(port.get("targetPort", port["port"]) != named["metrics"] for port in service["spec"]["ports"])
    assert statefulset["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > config.limits.shutdown_grace


def test_the_config_and_the_tls_secret_are_mounted_where_the_config_says(monkeypatch) -> None:
    documents = list(yaml.safe_load_all((EXAMPLE / "ftpfix.yaml").read_text()))
    _, tls = pod_config(documents, 0, monkeypatch)
    (statefulset,) = by_kind(documents, "StatefulSet")
    spec = statefulset["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    config_path = container["args"][container["args"].index("--config") + 1]
    assert Path(config_path).parent == Path(mounts["config"])
    assert volumes["config"]["configMap"]["name"] == "ftpfix-config"
    assert volumes["tls"]["secret"]["secretName"] == "ftpfix-tls"
    files = {item["key"]: f"{mounts['tls']}/{item['path']}" for item in volumes["tls"]["secret"]["items"]}
    assert files == {"tls.crt": tls["certificate"], "tls.key": tls["key"]}


def test_the_tls_secret_is_in_the_output_only_when_asked(capsys, tmp_path) -> None:
    (tmp_path / "c.pem").write_text("CERT")
    (tmp_path / "k.pem").write_text("KEY")
    status, out, err = generate(
        capsys, *COMMAND, "--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem")
    )
    assert status == 0, err
    (secret,) = by_kind(list(yaml.safe_load_all(out)), "Secret")
    assert secret["type"] == "kubernetes.io/tls" and secret["data"] == {"tls.crt": "Q0VSVA==", "tls.key": "S0VZ"}


def test_implicit_ftps_is_listed_on_every_pod_service() -> None:
    text = (EXAMPLE / "ftpfix.toml").read_text()
    config, tls = k8s.read_config(text, "ftpfix.toml")
    tls = dataclasses.replace(tls, implicit_port=2990)
    documents = k8s.manifests(text, config, tls, k8s.Options(replicas=2))
    for service in by_kind(documents, "Service")[1:]:
        assert {"name": "ftps", "port": 990, "targetPort": 2990} in service["spec"]["ports"]


def test_the_template_and_uneven_slices(capsys, monkeypatch) -> None:
    status, out, err = generate(capsys, "k8s", "--replicas", "3", "--ports", "40000-40019")
    assert status == 0, err
    documents = list(yaml.safe_load_all(out))
    slices = [
        [port["port"] for port in service["spec"]["ports"] if port["name"] != "ftp"]
        for service in by_kind(documents, "Service")[1:]
    ]
    # 20 ports in 3: the first 20 % 3 = 2 slices get one more.
    assert [len(piece) for piece in slices] == [7, 7, 6]
    assert [port for piece in slices for port in piece] == list(range(40000, 40020))
    for ordinal in range(3):
        assert list(pod_config(documents, ordinal, monkeypatch)[0].passive.leased_ports) == slices[ordinal]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--replicas", "0"], "--replicas 0: between 1 and the 30 ports of 50000-50029"),
        (["--replicas", "4", "--ports", "40000-40002"], "--replicas 4: between 1 and the 3 ports of 40000-40002"),
        (["--replicas", "2", "--ports", "40002-40000"], "runs backwards"),
        (["--replicas", "2", "--name", "Bad_Name"], "--name 'Bad_Name'"),
        (["--replicas", "2", "--config", "/nonexistent.toml"], "/nonexistent.toml: No such file"),
    ],
)
def test_bad_options_exit_2_with_a_message(capsys, args: list[str], message: str) -> None:
    status, out, err = generate(capsys, "k8s", *args)
    assert status == 2 and out == ""
    assert message in err


def test_probes_need_a_metrics_listener_the_kubelet_reaches(capsys, tmp_path) -> None:
    loopback = k8s.DEFAULT_CONFIG.replace('listen = "0.0.0.0:9121"', 'listen = "127.0.0.1:9121"')
    (tmp_path / "a.toml").write_text(loopback)
    status, _, err = generate(capsys, "k8s", "--replicas", "2", "--config", str(tmp_path / "a.toml"))
    assert status == 2 and 'listen on "0.0.0.0:9121"' in err
    (tmp_path / "b.toml").write_text(loopback.replace('listen = "127.0.0.1:9121"', ""))
    status, _, err = generate(capsys, "k8s", "--replicas", "2", "--config", str(tmp_path / "b.toml"))
    assert status == 2 and "[metrics] listen is not set" in err


_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)


@given(st.dictionaries(_TEXT, st.one_of(_TEXT, st.integers(), st.booleans(), st.lists(_TEXT, max_size=3)), max_size=5))
def test_the_yaml_writer_round_trips_through_pyyaml(document: dict) -> None:
    """Keys and strings that look like numbers, booleans, comments or flow syntax stay strings."""
    parsed = list(yaml.safe_load_all(k8s.render_yaml([{"data": document}], "header")))
    assert parsed == [{"data": document}]


def test_multi_line_strings_are_literal_blocks() -> None:
    document = {"data": {"a.toml": "[x]\n  indented = 1\n\nlast = 2\n", "b": "no newline\nat end"}}
    text = k8s.render_yaml([document], "")
    assert "a.toml: |\n" in text and "b: |-\n" in text
    assert list(yaml.safe_load_all(text))[-1] == document
