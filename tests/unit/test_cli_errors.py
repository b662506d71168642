"""The engine CLI answers bad input with an actionable message and an exit code, never a traceback."""

from __future__ import annotations

from engine.cli import main

PEER = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWJo4fk1tL7qhjTgMVDv9yhq8FNWv1YaENtYmjKpzsqbr2"


def test_generate_with_a_missing_model_folder(tmp_path, capsys):
    code = main(["generate", str(tmp_path / "nope"), "--prompt", "hi", "--initial-peers", PEER])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_unknown_command_exits_with_usage(capsys):
    try:
        main(["frobnicate"])
    except SystemExit as exit_:
        assert exit_.code == 2
    assert "invalid choice" in capsys.readouterr().err
