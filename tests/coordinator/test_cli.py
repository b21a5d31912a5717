"""`nord-coordinator` flags: bad input is one line, exit code 2, and nothing written."""

from __future__ import annotations

from coordinator.__main__ import main


def test_init_rejects_a_bad_run_id_before_preparing_data(tmp_path, capsys):
    out = tmp_path / "run.json"
    assert main(["init", "--run", "Bad Id", "--data-dir", str(tmp_path / "data"), "--out", str(out)]) == 2
    assert "run id 'Bad Id' is invalid" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "data").exists()


def test_init_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "run.json"
    out.write_text("{}")
    assert main(["init", "--run", "r", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_text() == "{}"


def test_serve_checks_flags_before_writing_state(tmp_path, capsys):
    state = tmp_path / "state"
    run = tmp_path / "missing.json"
    assert main(["serve", "--run-config", str(run), "--state-dir", str(state), "--http", "0.0.0.0:8000"]) == 2
    assert "run config not found" in capsys.readouterr().err
    assert main(["serve", "--run-config", str(run), "--state-dir", str(state), "--http", "nope"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    allow = tmp_path / "allow.txt"
    allow.write_text("# private run\n" + "ab" * 32 + "\nnot-a-key\n")
    assert (
        main(["serve", "--run-config", str(run), "--state-dir", str(state), "--allowlist", str(allow)]) == 2
    )
    assert "allow.txt:3" in capsys.readouterr().err
    assert not state.exists()
