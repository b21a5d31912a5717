"""Deployment files: docker-compose.yml validates offline, the Dockerfile copies what exists, the Colab
notebook is a clean v4 notebook whose commands parse with the real CLIs, and the systemd unit starts the
coordinator with flags it accepts."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
NOTEBOOK = ROOT / "deploy" / "colab" / "nord_join.ipynb"
UNIT = ROOT / "deploy" / "bootstrap" / "nord-coordinator.service"

needs_compose = pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="Debian's docker-compose is not installed (apt-get install docker-compose; .ci/run does)",
)


def compose_config(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["docker-compose", "-f", str(path), "config", "-q"], capture_output=True, text=True, timeout=60
    )


@needs_compose
def test_compose_file_validates_offline():
    out = compose_config(COMPOSE)
    assert out.returncode == 0, out.stderr


@needs_compose
@pytest.mark.parametrize(
    "old, new",
    [
        (
            "condition: service_healthy",
            "condition: service_healthy\n      coordinatr:\n        condition: service_started",
        ),
        ('- "8080:8080"', "- {published: 8080, target: eighty}"),
        ("      - coordinator-state:/state", "      - coordinator-stat:/state"),
    ],
    ids=["undefined-service", "bad-port", "undeclared-volume"],
)
def test_compose_validation_rejects_a_broken_copy(tmp_path, old, new):
    text = COMPOSE.read_text()
    assert old in text
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace(old, new, 1))
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")  # the build context must exist
    out = compose_config(broken)
    assert out.returncode != 0, f"docker-compose accepted a broken file:\n{broken.read_text()}"


def test_worker_service_can_be_scaled():
    """`--scale worker=N` fails if the worker pins a container name or a host port."""
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert set(services) == {"coordinator", "worker"}
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker
    assert "nord-node join" in " ".join(worker["command"])
    coordinator = services["coordinator"]
    published = {str(p).split(":")[0] for p in coordinator["ports"]}
    assert published == {"8080", "31337"}
    assert any(v.endswith(":/state") for v in coordinator["volumes"])


def test_dockerfile_copies_only_files_that_exist_and_installs_cpu_torch_first():
    text = DOCKERFILE.read_text()
    copies = re.findall(r"^COPY\s+(.+?)\s+\S+$", text, flags=re.M)
    assert copies
    for sources in copies:
        for src in sources.split():
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    torch_at = text.index('"torch==${TORCH_VERSION}"')
    assert text.index("pip install .") > torch_at
    assert "download.pytorch.org/whl/cpu" in text


# ------------------------------------------------------------------------------------------- notebook


def notebook() -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOK, as_version=nbformat.NO_CONVERT)
    nbformat.validate(nb)
    return nb


def code_lines(nb: nbformat.NotebookNode) -> list[str]:
    return [line for c in nb.cells if c.cell_type == "code" for line in c.source.splitlines()]


def form_values(nb: nbformat.NotebookNode) -> dict:
    """Run the settings cell (pure Python assignments with `#@param` forms) and return its variables."""
    cell = next(c for c in nb.cells if c.cell_type == "code" and "#@param" in c.source)
    namespace: dict = {}
    exec(cell.source, namespace)  # noqa: S102 - our own notebook's settings cell
    return namespace


def test_notebook_is_valid_v4_without_outputs():
    nb = notebook()
    assert nb.nbformat == 4
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "commit the notebook without outputs"


def test_notebook_warns_about_the_free_tier_and_names_alternatives():
    text = " ".join(c.source for c in notebook().cells if c.cell_type == "markdown")
    assert "free tier" in text and "distributed computing" in text
    for alternative in ("compute units", "Kaggle", "own GPU", "cloud VM"):
        assert alternative in text


def test_notebook_has_form_fields_for_the_bootstrap_address_and_run():
    values = form_values(notebook())
    for name in ("INITIAL_PEERS", "RUN_ID", "AUTHORITY", "STATE_DIR"):
        assert isinstance(values[name], str) and values[name]


def test_notebook_keeps_the_runtime_torch_and_protobuf():
    lines = code_lines(notebook())
    installs = [ln for ln in lines if "pip install" in ln]
    assert installs
    for line in installs:
        assert not re.search(r"\btorch\b", line.split("-c", 1)[0]), "never reinstall the notebook's torch"
    constraints = "\n".join(lines)
    assert "'torch==' + torch.__version__" in constraints and "protobuf<6" in constraints


def notebook_join_argv() -> list[str]:
    nb = notebook()
    values = form_values(nb)
    (line,) = [ln for ln in code_lines(nb) if ln.startswith("!nord-node join")]
    return shlex.split(line[1:].format(**values))


def test_notebook_join_command_parses_with_the_real_worker_cli():
    from node.__main__ import build_parser

    argv = notebook_join_argv()
    args = build_parser().parse_args(argv[1:])
    assert args.client_mode
    values = form_values(notebook())
    assert args.run == values["RUN_ID"] and args.authority == values["AUTHORITY"]


# -------------------------------------------------------------------------------------------- systemd


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(UNIT)
    return parser


def test_systemd_unit_starts_the_coordinator_with_flags_it_accepts():
    from coordinator.__main__ import build_parser

    service = unit()["Service"]
    argv = shlex.split(service["ExecStart"])
    assert Path(argv[0]).name == "nord-coordinator"
    build_parser().parse_args(argv[1:])
    assert service["KillMode"] == "mixed"  # SIGTERM to the coordinator, SIGKILL to a leftover p2pd
    assert "network-online.target" in unit()["Unit"]["After"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    """systemd-analyze exits 0 even for unknown settings, so any output at all counts as a failure."""
    installed = shutil.which("nord-coordinator")
    assert installed, "nord-coordinator is not on PATH (pip install -e .)"
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace("/opt/nord/venv/bin/nord-coordinator", installed))
    out = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
    bad = tmp_path / "bad" / UNIT.name
    bad.parent.mkdir()
    bad.write_text(copy.read_text().replace("KillMode=mixed", "KillMode=sometimes"))
    out = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True, text=True, timeout=60)
    assert "kill mode" in out.stderr.lower()


# --------------------------------------------------------------------------------------------- backup


def test_backup_script_copies_a_live_sqlite_database_and_rotates(tmp_path):
    import sqlite3

    src = tmp_path / "nord"
    (src / "state" / "checkpoints").mkdir(parents=True)
    (src / "data").mkdir()
    (src / "run.json").write_text("{}")
    (src / "state" / "identity.key").write_bytes(b"secret")
    (src / "data" / "train.bin").write_bytes(b"cache")
    db = sqlite3.connect(src / "state" / "history.sqlite")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE rounds (round INTEGER)")
    db.execute("INSERT INTO rounds VALUES (7)")
    db.commit()  # left open: the committed row sits in the WAL file, not yet in history.sqlite

    script = ROOT / "deploy" / "bootstrap" / "backup.sh"
    archives = []
    for _ in range(3):
        out = subprocess.run(
            ["bash", str(script), str(src), str(tmp_path / "backups"), "2"], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        archives.append(Path(out.stdout.strip()))
        time.sleep(1.1)  # archive names have one-second resolution
    db.close()
    assert sorted((tmp_path / "backups").glob("nord-*.tar.gz")) == sorted(archives[1:])

    restored = tmp_path / "restored"
    restored.mkdir()
    subprocess.run(["tar", "-xzf", str(archives[-1]), "-C", str(restored)], check=True)
    assert (restored / "state" / "identity.key").read_bytes() == b"secret"
    assert not (restored / "data").exists()
    copy = sqlite3.connect(restored / "state" / "history.sqlite")
    assert copy.execute("SELECT round FROM rounds").fetchall() == [(7,)]
    copy.close()


def test_backup_script_refuses_a_directory_without_run_json(tmp_path):
    script = ROOT / "deploy" / "bootstrap" / "backup.sh"
    out = subprocess.run(
        ["bash", str(script), str(tmp_path), str(tmp_path / "b")], capture_output=True, text=True
    )
    assert out.returncode == 2 and "run.json" in out.stderr


def compose_commands() -> dict[str, str]:
    """Each service's shell command with the compose/shell variables filled in as the container would."""
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    values = {
        "NORD_RUN": "demo",
        "NORD_MODEL": "tiny",
        "PEER": "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
    }
    out = {}
    for name, service in services.items():
        script = service["command"][-1].replace("$${NORD_ANNOUNCE:+--announce-maddrs $$NORD_ANNOUNCE}", "")
        for key, value in values.items():
            script = script.replace(f'"$${key}"', value).replace(f"$${key}", value)
        out[name] = script
    return out


def test_compose_commands_parse_with_the_real_clis():
    from coordinator.__main__ import build_parser as coordinator_parser
    from node.__main__ import build_parser as node_parser

    commands = compose_commands()
    init, serve = (
        shlex.split(part.strip().removeprefix("||").removeprefix("exec").strip())
        for part in commands["coordinator"].split("test -f /state/run.json", 1)[1].split(";")
    )
    coordinator_parser().parse_args(init[1:])
    assert coordinator_parser().parse_args(serve[1:]).http == "0.0.0.0:8080"
    join = shlex.split(commands["worker"].split("exec ", 1)[1])
    args = node_parser().parse_args(join[1:])
    assert args.client_mode and args.initial_peers[0].startswith("/dns4/coordinator/tcp/31337/p2p/")
    assert args.authority  # pinned from the coordinator's summary at the first join
