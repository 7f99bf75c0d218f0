"""``ftpfix k8s``: Kubernetes manifests for replicas of ftpfix, each with its passive slice.

A Kubernetes Service cannot take a port range (kubernetes/kubernetes #23864),
so each port is listed by name; these lists are long and easy to get wrong
by hand, so they are generated here from the same numbers ftpfix reads.

What comes out, for ``--replicas n``:

- a ConfigMap with the config file, the same for every replica;
- a StatefulSet of n pods. Each pod takes everything that differs from one
  replica to the next from its environment, none of it from its config file:
  its slice of the passive range (``FTPFIX_PASSIVE_SLICE=ordinal/n``: ftpfix
  reads the ordinal from the host name, ``ftpfix-2`` is 2, so it works on
  every Kubernetes version) and the address it advertises in every 227
  (``FTPFIX_PUBLIC_ADDRESS=$(POD_NAME).<domain>``, a name that resolves to the
  external address of that pod's own Service; ftpfix resolves it again every
  ``public_address_ttl`` seconds, so an address the cloud assigns late is
  picked up);
- one LoadBalancer Service per pod (selector
  ``statefulset.kubernetes.io/pod-name``) that lists the control port (and the
  implicit FTPS port when the config sets one) and exactly that pod's slice,
  with ``externalTrafficPolicy: Local`` so that ftpfix sees the client's own
  address: the data-connection peer check and the per-address limits depend
  on it. The external-dns annotation publishes the name the pod advertises;
- a headless Service, which a StatefulSet needs for its pods' identities;
- when the config turns TLS on, the pod mounts the Secret ``<name>-tls`` (a
  ``kubernetes.io/tls`` Secret) where the config expects the certificate and
  key; ``--tls-cert`` and ``--tls-key`` put that Secret in the output.

Liveness and readiness probes ask ``/healthz`` and ``/readyz`` on ``[metrics]
listen``, which must therefore listen on an address the kubelet reaches
(``0.0.0.0``); that port is never put on the public Services.

The YAML is written here rather than by a library: ftpfix's runtime
dependencies stay trio, structlog and prometheus_client, and the subset
needed (maps, lists, strings, numbers, literal blocks) is small. The tests
parse every document with PyYAML and compare it with what was meant.
"""

from __future__ import annotations

import base64
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from .config import (
    PASSIVE_PORTS_VARIABLE,
    PASSIVE_SLICE_VARIABLE,
    PUBLIC_ADDRESS_VARIABLE,
    Config,
    ConfigError,
    parse_config,
)
from .ports import PortRange, Slice

#: Where the ConfigMap is mounted: a directory of its own, since a volume
#: mounted inside a ConfigMap's mount cannot be (the TLS Secret's goes beside it).
CONFIG_DIRECTORY = "/etc/ftpfix/config"
CONFIG_FILE = "ftpfix.toml"

#: Seconds Kubernetes waits after SIGTERM beyond ``[limits] shutdown_grace``
#: before it kills the pod: ftpfix exits on its own within the grace.
TERMINATION_MARGIN = 5

#: The config written when ``--config`` is not given.
DEFAULT_CONFIG = """\
# ftpfix in Kubernetes: one ConfigMap for every replica. What differs from pod
# to pod comes from the environment the StatefulSet sets: the passive slice
# (FTPFIX_PASSIVE_SLICE=ordinal/N) and the public address (FTPFIX_PUBLIC_ADDRESS).

[listen]
address = "0.0.0.0"
port = 2121                       # the Services map port 21 to it: no privileged port in the pod

[backend]
# The legacy FTP server's Service. Make it headless (clusterIP: None), or list
# the server's own passive range on it: ftpfix dials the data port the 227
# names at the address its control connection reached.
address = "ftp-backend"
port = 21

[passive]
public_address = "auto"           # each pod gets its own from FTPFIX_PUBLIC_ADDRESS
ports = "50000-50029"             # the whole range; each pod leases only its slice

[limits]
shutdown_grace = 25               # below terminationGracePeriodSeconds

[log]
format = "json"

[metrics]
listen = "0.0.0.0:9121"           # the kubelet's probes reach it on the pod's address
"""


class ManifestError(Exception):
    """The manifests cannot be made from these settings; the message says why."""


@dataclass(frozen=True, slots=True)
class Options:
    replicas: int
    ports: PortRange | None = None  # None: the config's [passive] ports
    image: str = "ftpfix:latest"
    name: str = "ftpfix"
    domain: str = "ftp.example.org"
    tls_cert: bytes | None = None
    tls_key: bytes | None = None


@dataclass(frozen=True, slots=True)
class _Tls:
    on: bool
    certificate: str
    key: str
    implicit_port: int


def read_config(text: str, where: str) -> tuple[Config, _Tls]:
    """The config as ftpfix in the pod reads it, minus what only the pod can check.

    The TLS files are the pod's (from the Secret), not this machine's, so they
    are not opened here; nor are environment overrides applied, since this
    environment is not the pod's.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{where}: not valid TOML: {error}") from None
    raw_tls = document.get("tls", {})
    if not isinstance(raw_tls, dict):
        raise ConfigError(f"{where}: [tls] must be a table")
    config = parse_config({name: table for name, table in document.items() if name != "tls"}, None)
    mode = raw_tls.get("mode", "off")
    tls = _Tls(
        on=mode != "off" or bool(raw_tls.get("implicit_port")),
        certificate=str(raw_tls.get("certificate", "")),
        key=str(raw_tls.get("key", "")),
        implicit_port=int(raw_tls.get("implicit_port", 0) or 0),
    )
    return config, tls


def manifests(config_text: str, config: Config, tls: _Tls, options: Options) -> list[dict[str, Any]]:
    """The Kubernetes documents, in the order to apply them."""
    name = options.name
    ports = options.ports or config.passive.ports
    if not 1 <= options.replicas <= len(ports):
        raise ManifestError(f"--replicas {options.replicas}: between 1 and the {len(ports)} ports of {ports}")
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,40}[a-z0-9])?", name):
        raise ManifestError(f"--name {name!r}: a DNS label of lowercase letters, digits and '-'")
    probe = config.metrics.listen
    if probe is None:
        raise ManifestError('[metrics] listen is not set: the probes need it, e.g. listen = "0.0.0.0:9121"')
    if probe.host not in ("0.0.0.0", "::"):
        raise ManifestError(
            f'[metrics] listen = "{probe}": the kubelet probes the pod\'s address; listen on "0.0.0.0:{probe.port}"'
        )
    if tls.on and not (tls.certificate and tls.key):
        raise ManifestError("[tls] certificate and key: set both to paths where the Secret is mounted")
    if (options.tls_cert is None) != (options.tls_key is None):
        raise ManifestError("--tls-cert and --tls-key go together")
    labels = {"app.kubernetes.io/name": name}
    control = [("ftp", 21, config.listen.port)]
    if tls.implicit_port:
        control.append(("ftps", 990, tls.implicit_port))
    documents: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"{name}-config", "labels": labels},
            "data": {CONFIG_FILE: config_text},
        }
    ]
    if options.tls_cert is not None and options.tls_key is not None:
        documents.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": f"{name}-tls", "labels": labels},
                "type": "kubernetes.io/tls",
                "data": {
                    "tls.crt": base64.b64encode(options.tls_cert).decode(),
                    "tls.key": base64.b64encode(options.tls_key).decode(),
                },
            }
        )
    documents.append(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "clusterIP": "None",
                "selector": labels,
                "ports": [{"name": "ftp", "port": config.listen.port}],
            },
        }
    )
    documents.append(_statefulset(config, tls, options, ports, control, labels))
    for ordinal in range(options.replicas):
        pod = f"{name}-{ordinal}"
        piece = Slice(ordinal + 1, options.replicas).of(ports)
        documents.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": pod,
                    "labels": labels,
                    "annotations": {
                        "external-dns.alpha.kubernetes.io/hostname": f"{pod}.{options.domain}",
                        "ftpfix/passive-slice": f"{ordinal + 1}/{options.replicas} = {piece}",
                    },
                },
                "spec": {
                    "type": "LoadBalancer",
                    # Keep the client's address: without it the pod sees a
                    # node's, and the data connection's peer check fails.
                    "externalTrafficPolicy": "Local",
                    "selector": {"statefulset.kubernetes.io/pod-name": pod},
                    "ports": [
                        *({"name": label, "port": port, "targetPort": target} for label, port, target in control),
                        *({"name": f"p{port}", "port": port, "targetPort": port} for port in piece),
                    ],
                },
            }
        )
    return documents


def _statefulset(
    config: Config,
    tls: _Tls,
    options: Options,
    ports: PortRange,
    control: Sequence[tuple[str, int, int]],
    labels: dict[str, str],
) -> dict[str, Any]:
    name = options.name
    probe_port = config.metrics.listen.port if config.metrics.listen else 0
    mounts = [{"name": "config", "mountPath": CONFIG_DIRECTORY, "readOnly": True}]
    volumes: list[dict[str, Any]] = [{"name": "config", "configMap": {"name": f"{name}-config"}}]
    if tls.on:
        certificate, key = PurePosixPath(tls.certificate), PurePosixPath(tls.key)
        if certificate.parent != key.parent or certificate.parent.is_relative_to(CONFIG_DIRECTORY):
            raise ManifestError(
                f"[tls] certificate and key: {certificate} and {key} must share a directory, outside "
                f"{CONFIG_DIRECTORY} (the ConfigMap's), where the Secret is mounted"
            )
        mounts.append({"name": "tls", "mountPath": str(certificate.parent), "readOnly": True})
        volumes.append(
            {
                "name": "tls",
                "secret": {
                    "secretName": f"{name}-tls",
                    "items": [{"key": "tls.crt", "path": certificate.name}, {"key": "tls.key", "path": key.name}],
                },
            }
        )

    def probe(path: str, period: int) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": "metrics"}, "periodSeconds": period, "timeoutSeconds": 5}

    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "serviceName": name,
            "replicas": options.replicas,
            # Replicas are independent: start and stop them all at once.
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": int(config.limits.shutdown_grace) + TERMINATION_MARGIN,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 2121,
                        # Keep the kernel's outgoing connections off the
                        # passive range (a safe sysctl since Kubernetes 1.27).
                        "sysctls": [{"name": "net.ipv4.ip_local_reserved_ports", "value": str(ports)}],
                    },
                    "containers": [
                        {
                            "name": "ftpfix",
                            "image": options.image,
                            "args": ["run", "--config", f"{CONFIG_DIRECTORY}/{CONFIG_FILE}"],
                            "env": [
                                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                                {"name": PASSIVE_PORTS_VARIABLE, "value": str(ports)},
                                {"name": PASSIVE_SLICE_VARIABLE, "value": f"ordinal/{options.replicas}"},
                                {"name": PUBLIC_ADDRESS_VARIABLE, "value": f"$(POD_NAME).{options.domain}"},
                            ],
                            "ports": [
                                *({"name": port_name, "containerPort": target} for port_name, _, target in control),
                                # The passive ports need no containerPort: the
                                # Services name them by number.
                                {"name": "metrics", "containerPort": probe_port},
                            ],
                            "livenessProbe": probe("/healthz", 10),
                            "readinessProbe": probe("/readyz", 5),
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]},
                            },
                            "volumeMounts": mounts,
                        }
                    ],
                    "volumes": volumes,
                },
            },
        },
    }


# -- YAML ----------------------------------------------------------------------

_PLAIN = re.compile(r"[A-Za-z_/][A-Za-z0-9_./-]*")
_RESERVED = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and _PLAIN.fullmatch(value) and value.lower() not in _RESERVED:
        return value
    return _quoted(str(value))


def _quoted(text: str) -> str:
    """A YAML double-quoted scalar: every character that is not printable escaped
    (YAML 1.1 folds line breaks such as U+2028 inside quotes, and knows \\U for
    characters beyond the BMP, where JSON would write a surrogate pair)."""
    out = []
    for char in text:
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif char.isprintable():
            out.append(char)
        elif ord(char) <= 0xFFFF:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(f"\\U{ord(char):08x}")
    return '"' + "".join(out) + '"'


def _blockable(text: str) -> bool:
    """True for multi-line text a literal block keeps exactly (a config file);
    anything else is written quoted."""
    lines = text.rstrip("\n").split("\n")
    return (
        len(lines) > 1
        and not text.endswith("\n\n")
        and lines[0][:1] not in (" ", "")
        and all(char.isprintable() for line in lines for char in line)
    )


def _block(key: str, text: str, indent: int) -> list[str]:
    chomp = "" if text.endswith("\n") else "-"
    lines = [f"{' ' * indent}{key}: |{chomp}"]
    lines += [f"{' ' * (indent + 2)}{line}" if line else "" for line in text.rstrip("\n").split("\n")]
    return lines


def _lines(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            key = _scalar(key)
            if isinstance(item, str) and _blockable(item):
                lines += _block(key, item, indent)
            elif isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{key}:")
                lines += _lines(item, indent + 2)
            elif isinstance(item, (dict, list)):
                lines.append(f"{pad}{key}: {'{}' if isinstance(item, dict) else '[]'}")
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}")
        return lines
    for item in value:
        if isinstance(item, (dict, list)) and item:
            inner = _lines(item, indent + 2)
            lines.append(f"{pad}- {inner[0].lstrip()}")
            lines += inner[1:]
        else:
            lines.append(f"{pad}- {_scalar(item)}")
    return lines


def render_yaml(documents: Sequence[dict[str, Any]], header: str) -> str:
    out = [f"# {line}" if line else "#" for line in header.splitlines()]
    for document in documents:
        out.append("---")
        out += _lines(document, 0)
    return "\n".join(out) + "\n"


def header(options: Options, ports: PortRange, command: str, tls: bool) -> str:
    slices = ", ".join(
        f"{options.name}-{i} {Slice(i + 1, options.replicas).of(ports)}" for i in range(options.replicas)
    )
    return f"""\
Generated by: {command}
Regenerate it rather than edit the port lists by hand.

{options.replicas} replicas of ftpfix; passive slices: {slices}.
Each pod advertises <pod>.{options.domain} (FTPFIX_PUBLIC_ADDRESS); point that name at the
external address of the pod's own Service (external-dns does it from the annotation).
Control connections may go to any pod (e.g. round-robin DNS over the per-pod names).""" + (
        f"\nTLS: kubectl create secret tls {options.name}-tls --cert=fullchain.pem --key=privkey.pem" if tls else ""
    )
