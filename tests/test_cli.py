"""The command line's contract: one module per command, usage errors as one line with status 2, bugs with their
traceback, and nothing written by a run that is only resolved (``--dry-run``) or refused."""

from __future__ import annotations

import pytest

from inceptionnext import cli
from inceptionnext.cli import main
from inceptionnext.errors import UserError


def test_every_command_is_registered_once():
    parser = cli.get_args_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(
        [
            "list",
            "complexity",
            "train",
            "validate",
            "predict",
            "cam",
            "hub",
            "segment",
            "detect",
            "export",
            "benchmark",
            "data",
        ]
    )


def test_user_errors_are_one_line_with_status_2(capsys, monkeypatch):
    def refuse(args):
        raise UserError("no such folder: /nowhere")

    monkeypatch.setattr(cli.list_models, "run", refuse)
    assert main(["list"]) == 2
    err = capsys.readouterr().err
    assert err == "error: no such folder: /nowhere\n"


def test_other_exceptions_keep_their_traceback(monkeypatch):
    """A ValueError from inside the library is a bug, not a usage error: it must not be turned into exit 2."""

    def bug(args):
        raise ValueError("internal invariant broken")

    monkeypatch.setattr(cli.list_models, "run", bug)
    with pytest.raises(ValueError, match="internal invariant"):
        main(["list"])


def test_unknown_model_is_a_usage_error(capsys, tmp_path):
    assert main(["predict", str(tmp_path), "--model", "inceptionnext_tinny"]) == 2
    assert "inceptionnext_tiny" in capsys.readouterr().err  # the closest name is suggested


def test_model_source_is_required(capsys, tmp_path):
    for argv in (["predict", str(tmp_path)], ["export", "--output", str(tmp_path)], ["hub", "export", str(tmp_path)]):
        assert main(argv) == 2
        assert "--checkpoint PATH and/or --model NAME" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_recipe_and_config_together_are_refused(capsys, tmp_path):
    assert main(["train", "--recipe", "digits", "--config", str(tmp_path / "x.yaml"), "--dry-run"]) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["train"], ["segment", "train"]])
def test_dry_run_with_resume_writes_nothing(tmp_path, capsys, command):
    """``--resume`` used to copy the file over OUTPUT/last.pth before --dry-run returned: a wrong file then broke
    every later run in that folder. A dry run resolves the config and touches no file."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pth").write_bytes(b"the user's checkpoint")
    wrong = tmp_path / "wrong.pth"
    wrong.write_bytes(b"not a checkpoint")
    assert main([*command, "--output", str(out), "--resume", str(wrong), "--dry-run"]) == 0
    assert "output:" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["last.pth"]
    assert (out / "last.pth").read_bytes() == b"the user's checkpoint"
