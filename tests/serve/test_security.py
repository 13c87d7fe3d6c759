"""Security defaults: loopback bind, API key auth (and the key never in a response or a log), Ray token auth and a
cluster file that exposes nothing publicly, and weights that load only from safetensors or
``torch.load(weights_only=True)``."""

from __future__ import annotations

import ast
import itertools
import json
import re
import secrets
import socket
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray
import requests
import torch
import yaml
from helpers.serve import deployed, expect_error, sse_events

from pipeline.config import ConfigError, PipelineConfig, ServeSection
from pipeline.export.format import ExportError, load_export

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


# ---------------------------------------------------------------------------------------------- bind address


def _non_loopback_ips() -> list[str]:
    return [
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    ]


def test_endpoint_binds_loopback_unless_configured(tmp_path: Path, serve_port: int, exports: dict[str, str]) -> None:
    from pipeline.serve.deploy import base_url, http_options

    default = PipelineConfig()
    assert ServeSection().host == "127.0.0.1" and http_options(default)["host"] == "127.0.0.1"
    assert base_url(default) == "http://127.0.0.1:8000"
    exposed = PipelineConfig.model_validate({"serve": {"host": "0.0.0.0", "port": 9000}})
    assert http_options(exposed)["host"] == "0.0.0.0" and http_options(exposed)["port"] == 9000

    # The session's Serve proxy (tests/conftest.py starts it like deploy() does, default host) listens on
    # loopback only: nothing answers on this machine's other addresses.
    with deployed(tmp_path, serve_port, exports["a"]) as url:
        assert requests.get(f"{url}/health", timeout=10).status_code == 200
        listening = {
            c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == serve_port
        }
        assert listening == {"127.0.0.1"}, listening
        for ip in _non_loopback_ips():
            with socket.socket() as sock, pytest.raises(OSError):
                sock.settimeout(2)
                sock.connect((ip, serve_port))


def test_a_non_loopback_bind_needs_a_key_or_an_explicit_opt_out(
    exports: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.config import API_KEY_ENV
    from pipeline.serve.deploy import build_app

    monkeypatch.delenv(API_KEY_ENV, raising=False)

    def app(**serve: Any) -> Any:
        return build_app(PipelineConfig.model_validate({"serve": serve}), exports["a"])

    for host in ("0.0.0.0", "::", "10.1.2.3", "gpu-head.internal", "::ffff:10.0.0.1"):
        with pytest.raises(ConfigError) as refused:
            app(host=host)
        message = str(refused.value)
        assert "serve.host" in message and API_KEY_ENV in message and "serve.allow_unauthenticated" in message
        with pytest.raises(ConfigError):
            app(host=host, api_key="")  # an empty key is no key
        assert app(host=host, api_key="sk-x") is not None
        assert app(host=host, allow_unauthenticated=True) is not None
        monkeypatch.setenv(API_KEY_ENV, "sk-from-env")
        assert app(host=host) is not None
        monkeypatch.delenv(API_KEY_ENV)
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert app(host=host) is not None


def test_raygpt_run_refuses_an_exposed_keyless_endpoint_before_any_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.cli import main
    from pipeline.config import API_KEY_ENV

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    run_dir = tmp_path / "run"
    assert main(["run", "--set", f"run.dir={run_dir}", "--set", "serve.host=0.0.0.0"]) == 2
    assert "serve.allow_unauthenticated" in capsys.readouterr().err
    assert not run_dir.exists()  # no stage started


# ---------------------------------------------------------------------------------------------- API key


def _session_logs() -> list[Path]:
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    return [p for p in (session / "logs").rglob("*") if p.is_file()]


def test_api_key_on_every_generating_route_and_never_logged(
    tmp_path: Path, serve_port: int, exports: dict[str, str], capfd: pytest.CaptureFixture[str]
) -> None:
    key = "sk-raygpt-" + secrets.token_hex(16)
    wrong = "sk-wrong-" + secrets.token_hex(16)
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    routes: list[tuple[str, str, dict[str, Any] | None]] = [
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2}),
        ("POST", "/v1/chat/completions", chat),
    ]
    seen: list[str] = []

    def call(method: str, path: str, body: dict[str, Any] | None, auth: str | None) -> requests.Response:
        headers = {"Authorization": auth} if auth is not None else {}
        r = requests.request(method, f"{url}{path}", json=body, headers=headers, timeout=30)
        seen.append(r.text + json.dumps(dict(r.headers)))
        return r

    with deployed(tmp_path, serve_port, exports["a"], api_key=key) as url:
        for method, path, body in routes:
            for auth in (None, f"Bearer {wrong}", f"Basic {key}", "Bearer", f"Bearer {key}x", f"Bearer {key[:-1]}"):
                r = call(method, path, body, auth)
                assert expect_error(r, 401, "invalid_api_key")["type"] == "authentication_error", (path, auth)
                assert r.headers["www-authenticate"] == "Bearer"
            assert call(method, path, body, f"Bearer {key}").status_code == 200, path
            assert call(method, path, body, f"bearer {key}").status_code == 200, path  # the scheme is case-blind
        for stream_path, body in (("/v1/completions", routes[1][2]), ("/v1/chat/completions", chat)):
            expect_error(call("POST", stream_path, {**(body or {}), "stream": True}, None), 401)
            with requests.post(
                f"{url}{stream_path}", json={**(body or {}), "stream": True}, headers={"Authorization": f"Bearer {key}"}
            ) as r:
                assert sse_events(r)
        for open_path in ("/health", "/openapi.json"):  # liveness and the spec stay open (no model access)
            assert call("GET", open_path, None, None).status_code == 200
        time.sleep(2)  # let replicas flush their logs

    assert not [text for text in seen if key in text or wrong in text]  # never echoed back
    leaked = [str(p) for p in _session_logs() if key.encode() in p.read_bytes() or wrong.encode() in p.read_bytes()]
    assert not leaked, leaked
    assert len(_session_logs()) > 5  # the scan really read the Serve and worker logs
    captured = capfd.readouterr()
    assert key not in captured.out + captured.err and wrong not in captured.out + captured.err


def _raw_request(url: str, head: str, body: bytes = b"", wait_s: float = 10.0) -> bytes:
    """Send ``head`` (request line and headers) and ``body``, then read what the server answers within ``wait_s``
    without sending anything more."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        try:
            return sock.recv(65536)
        except TimeoutError:
            return b""


def test_the_api_key_is_checked_before_the_body_is_read(
    tmp_path: Path, serve_port: int, exports: dict[str, str]
) -> None:
    """Unauthenticated callers are refused from the headers alone: they cannot make the ingress read or parse a
    body (a body that never arrives, one over the size limit, one that is not JSON all get the same 401)."""
    key = "sk-raygpt-" + secrets.token_hex(16)
    with deployed(tmp_path, serve_port, exports["a"], api_key=key, max_request_bytes=4096) as url:
        r = requests.post(f"{url}/v1/completions", data=b"{not json", timeout=30)
        expect_error(r, 401, "invalid_api_key")
        r = requests.post(f"{url}/v1/completions", data=b"x" * 10_000, timeout=30)
        expect_error(r, 401, "invalid_api_key")
        r = requests.post(f"{url}/v1/completions", data=iter([b"x" * 1000] * 8), timeout=30)  # chunked
        expect_error(r, 401, "invalid_api_key")
        # Headers promise 3,000 bytes and none follow: the answer comes without waiting for them.
        head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        answer = _raw_request(url, head + "Content-Length: 3000\r\n")
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        answer = _raw_request(url, head + "Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n")
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        # With the key, the same body is read and judged (404 for an unknown route is also after the key).
        auth = {"Authorization": f"Bearer {key}"}
        expect_error(requests.post(f"{url}/v1/completions", data=b"{not json", headers=auth, timeout=30), 400)
        expect_error(requests.post(f"{url}/v1/completions", data=b"x" * 10_000, headers=auth, timeout=30), 413)
        expect_error(requests.get(f"{url}/v2/nothing", timeout=30), 401)
        expect_error(requests.get(f"{url}/v2/nothing", headers=auth, timeout=30), 404)
        assert requests.get(f"{url}/health", timeout=30).status_code == 200


def test_config_show_and_errors_mask_the_key(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.cli import main
    from pipeline.serve.deploy import API_KEY_ENV, curl_example

    key = "sk-raygpt-" + secrets.token_hex(16)
    assert main(["config", "show", "--set", f"serve.api_key={key}"]) == 0
    out = capsys.readouterr().out
    assert key not in out and yaml.safe_load(out)["serve"]["api_key"] == "**********"
    assert main(["config", "show", "--set", f"serve.api_key=[{key}]"]) == 2  # a mistyped key is not echoed
    captured = capsys.readouterr()
    assert "serve.api_key: expected a string" in captured.err and key not in captured.out + captured.err
    config = PipelineConfig.model_validate({"serve": {"api_key": key}})
    assert key not in repr(config) and key not in config.to_yaml()
    monkeypatch.setenv(API_KEY_ENV, key)
    example = curl_example(PipelineConfig())
    assert key not in example and f"${API_KEY_ENV}" in example  # the printed curl command names the variable


# ---------------------------------------------------------------------------------------------- cluster.yaml


def _aws_default_rules(extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The inbound rules Ray's AWS launcher gives the security group it creates, computed by Ray's own functions
    (read from its source: importing the module needs boto3)."""
    import ray.autoscaler._private.aws as aws

    source = (Path(aws.__file__).parent / "config.py").read_text()
    wanted = {
        "_create_default_inbound_rules",
        "_create_default_intracluster_inbound_rules",
        "_create_default_ssh_inbound_rules",
    }
    functions = [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    assert len(functions) == len(wanted), "Ray's AWS security-group defaults moved"
    namespace: dict[str, Any] = {"itertools": itertools}
    exec(compile(ast.Module(body=functions, type_ignores=[]), "ray_aws_config", "exec"), namespace)
    return namespace["_create_default_inbound_rules"]({"sg-cluster"}, extra)


def _ports(rule: dict[str, Any]) -> range:
    low, high = rule.get("FromPort", -1), rule.get("ToPort", -1)
    return range(0, 65536) if rule.get("IpProtocol") == "-1" or low == -1 else range(low, high + 1)


def test_cluster_yaml_exposes_no_dashboard_job_api_or_endpoint() -> None:
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert not re.search(r"--(dashboard-agent-listen-port|ray-client-server-port|dashboard-port)", head)
    for command in (head, " ".join(cluster["worker_start_ray_commands"])):
        assert "RAY_AUTH_MODE=token ray start" in command  # token authentication on every node
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the token reaches every node

    provider = cluster["provider"]
    extra = provider.get("security_group", {}).get("IpPermissions", [])
    public = [
        rule
        for rule in _aws_default_rules(extra)
        if any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", []))
        or any(r.get("CidrIpv6") == "::/0" for r in rule.get("Ipv6Ranges", []))
    ]
    assert [list(_ports(rule)) for rule in public] == [[22]], public  # SSH only, which `ray up` itself needs
    for port in (6379, 8000, 8076, 8265, 10001):  # GCS, Serve, object manager, dashboard/job API, Ray client
        assert not any(port in _ports(rule) for rule in public)
    for name, node in cluster["available_node_types"].items():  # no security group the launcher cannot vet
        assert "SecurityGroupIds" not in node["node_config"], name
        assert "NetworkInterfaces" not in node["node_config"], name
    serve = cluster["metadata"]["pipeline"]["serve"]
    assert "api_key" not in serve  # secrets never sit in the committed file: RAYGPT_API_KEY on the head


def test_not_vacuous_a_public_rule_is_caught() -> None:
    opened = [{"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    rules = _aws_default_rules(opened)
    assert any(8265 in _ports(r) and r.get("IpRanges") == [{"CidrIp": "0.0.0.0/0"}] for r in rules)


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def test_readme_documents_token_auth_for_jobs_and_the_security_defaults() -> None:
    cluster = _section("On a cluster")
    assert "ray get-auth-token --generate" in cluster and "RAY_AUTH_MODE=token" in cluster
    assert "ray job submit" in cluster and "~/.ray/auth_token" in cluster and "RAY_AUTH_TOKEN" in cluster
    security = _section("Security defaults")
    for needle in (
        "127.0.0.1",
        "serve.api_key",
        "RAYGPT_API_KEY",
        "RAY_AUTH_MODE=token",
        "ray job submit",
        "--dashboard-host=127.0.0.1",
        "safetensors",
        "weights_only=True",
        "serve.max_request_bytes",
        "never",
    ):
        assert needle in security, needle


# ---------------------------------------------------------------------------------------------- weights


UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _is_const(node: ast.AST | None, value: bool) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_loads(source: str, filename: str = "<source>") -> list[str]:
    """Calls that may unpickle: torch.load without weights_only=True, pickle/dill/joblib/... loads, numpy.load with
    allow_pickle=True, pandas.read_pickle, and imports of the pickle-like modules' load functions."""
    problems = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            if any("load" in alias.name for alias in node.names):
                problems.append(f"{filename}:{node.lineno}: from {node.module} import load")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        leaf = name.rsplit(".", 1)[-1]
        keywords = {k.arg: k.value for k in node.keywords}
        weights_only = keywords.get("weights_only")
        if leaf == "load" and name.split(".")[0] == "torch" and not _is_const(weights_only, True):
            problems.append(f"{filename}:{node.lineno}: {name} without weights_only=True")
        elif leaf in {"load", "loads", "Unpickler"} and name.split(".")[0] in UNSAFE_MODULES:
            problems.append(f"{filename}:{node.lineno}: {name}")
        elif leaf == "load" and name.split(".")[0] in {"np", "numpy"} and "allow_pickle" in keywords:
            if not _is_const(keywords["allow_pickle"], False):
                problems.append(f"{filename}:{node.lineno}: {name} with allow_pickle")
        elif leaf == "read_pickle":
            problems.append(f"{filename}:{node.lineno}: {name}")
    return problems


def test_no_code_path_unpickles() -> None:
    files = [p for folder in ("pipeline", "jobs", "bench") for p in sorted((REPO / folder).rglob("*.py"))]
    assert len(files) > 20
    problems = [problem for p in files for problem in unsafe_loads(p.read_text(), str(p.relative_to(REPO)))]
    assert not problems, problems
    assert "weights_only=True" in (REPO / "pipeline" / "export" / "hf.py").read_text()  # the one torch.load there is


def test_not_vacuous_the_scanner_flags_unpickling() -> None:
    bad = """
import pickle, joblib, dill, numpy as np, torch, pandas as pd
from pickle import loads
torch.load(path)
torch.load(path, weights_only=False)
torch.load(path, map_location="cpu", weights_only=flag)
pickle.load(f)
pickle.loads(b)
dill.load(f)
joblib.load(path)
np.load(path, allow_pickle=True)
pd.read_pickle(path)
"""
    assert len(unsafe_loads(bad)) == 10
    good = "torch.load(p, weights_only=True)\nnp.load(p)\nnp.load(p, allow_pickle=False)\njson.loads(s)\n"
    assert unsafe_loads(good) == []


class _Payload:
    """Unpickling this runs ``touch <marker>``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, ...]]:
        import os

        return os.system, (f"touch {self.marker}",)


def test_import_hf_refuses_a_pickle_and_takes_plain_tensors(
    tmp_path: Path, exports: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from pipeline.cli import main
    from pipeline.export.hf import export_hf

    hf = export_hf(exports["a"], tmp_path / "hf")
    tensors = load_file(str(hf / "model.safetensors"))
    (hf / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({**tensors, "transformer.wte.weight": _Payload(marker)}, hf / "pytorch_model.bin")
    argv = ["import-hf", str(hf), "--out", str(tmp_path / "imported"), "--set", f"run.dir={tmp_path / 'run'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "pytorch_model.bin is not a plain tensor file" in err, err
    assert not marker.exists() and not (tmp_path / "imported").exists()

    torch.save(tensors, hf / "pytorch_model.bin")  # tensors only: torch.load(weights_only=True) reads it
    assert main(argv) == 0
    imported, _ = load_export(tmp_path / "imported")
    original, _ = load_export(exports["a"])
    assert torch.equal(imported.state_dict()["transformer.wte.weight"], original.state_dict()["transformer.wte.weight"])


def test_an_export_whose_weights_are_a_pickle_fails_cleanly(tmp_path: Path, exports: dict[str, str]) -> None:
    import shutil

    export = tmp_path / "export"
    shutil.copytree(exports["a"], export)
    marker = tmp_path / "pwned"
    torch.save({"transformer.wte.weight": _Payload(marker)}, export / "model.safetensors")
    with pytest.raises(ExportError, match="does not match the sha256"):
        load_export(export)
    document = json.loads((export / "config.json").read_text())
    import hashlib

    document["weights"]["sha256"] = hashlib.sha256((export / "model.safetensors").read_bytes()).hexdigest()
    (export / "config.json").write_text(json.dumps(document))  # an attacker who rewrote config.json too
    with pytest.raises(ExportError, match="cannot read model.safetensors"):
        load_export(export)
    assert not marker.exists()


_RESUME_PROBE = """
import sys, torch
from pipeline.train.deepspeed import weights_only_loads
weights_only_loads()  # what every training worker and the consolidation task do before DeepSpeed reads a checkpoint
try:
    torch.load(sys.argv[1], map_location="cpu", weights_only=False)  # DeepSpeed 0.19's own call
except Exception as exc:
    print("refused", type(exc).__name__)
"""


def test_deepspeed_checkpoint_loads_cannot_unpickle_code(tmp_path: Path) -> None:
    """A tampered ZeRO checkpoint (here: the optimizer-state file replaced by a pickle payload) is refused even
    though DeepSpeed asks for weights_only=False; real checkpoints still load (tests/train/test_train.py resumes)."""
    import subprocess
    import sys

    marker = tmp_path / "pwned"
    evil = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": _Payload(marker)}, evil)
    probe = subprocess.run(
        [sys.executable, "-c", _RESUME_PROBE, str(evil)], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert "refused UnpicklingError" in probe.stdout, probe.stdout + probe.stderr
    assert not marker.exists()
