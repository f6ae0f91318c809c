"""The README is tested: every TOML block of README.md and docs/*.md parses (the `agent.toml` example
also loads as an agent config), and every `toolchain ...` / `edge-agent ...` command line shown in the
README's bash blocks exists: `--help` of its command path (the words before the first option) exits 0.

A TOML block that is a fragment on purpose starts with a `# fragment` line and is only listed, not
parsed; there is none today."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from runtime_agent.cli import main as edge_agent
from runtime_agent.config import load_agent_config
from toolchain.cli import app as toolchain

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
PROGRAMS = ("toolchain", "edge-agent")


def blocks(language: str, documents: list[Path] = DOCUMENTS) -> list[tuple[str, str]]:
    """(where, body) of every fenced block of `language`; `where` is FILE:LINE."""
    found = []
    for document in documents:
        text = document.read_text()
        for match in FENCE.finditer(text):
            if match.group(1) == language:
                where = f"{document.relative_to(REPO)}:{text.count(chr(10), 0, match.start()) + 1}"
                found.append((where, match.group(2)))
    return found


def command_paths(body: str) -> list[list[str]]:
    """Each `toolchain`/`edge-agent` invocation in a shell block, cut before its first option, `[`, or `...`."""
    paths = []
    for line in body.replace("\\\n", " ").splitlines():
        for segment in re.split(r"&&|\|\||;|\|", line):
            words = shlex.split(segment, comments=True)
            if not words or Path(words[0]).name not in PROGRAMS:
                continue
            path = [Path(words[0]).name]
            for word in words[1:]:
                if word.startswith(("-", "[", "...")):
                    break
                path.append(word)
            paths.append(path)
    return paths


TOML_BLOCKS = blocks("toml")
COMMANDS = sorted({" ".join(path) for _, body in blocks("bash", [REPO / "README.md"]) for path in command_paths(body)})


def test_the_readme_shows_commands_and_toml() -> None:
    assert len(TOML_BLOCKS) >= 5 and len(COMMANDS) >= 15, (len(TOML_BLOCKS), COMMANDS)
    assert {"toolchain fleet rollback", "toolchain fleet config", "edge-agent run"} <= set(COMMANDS)


@pytest.mark.parametrize("where, body", TOML_BLOCKS, ids=[where for where, _ in TOML_BLOCKS])
def test_toml_block_parses(where: str, body: str) -> None:
    if body.startswith("# fragment"):
        return
    try:
        tomllib.loads(body)
    except tomllib.TOMLDecodeError as exc:
        pytest.fail(f"{where}: not TOML: {exc}")


def test_the_agent_toml_example_is_a_valid_agent_config(tmp_path: Path) -> None:
    [body] = [body for _, body in TOML_BLOCKS if body.startswith("# DIR/agent.toml")]
    (tmp_path / "agent.toml").write_text(body)
    (tmp_path / "mqtt.password").write_text("secret\n")
    (tmp_path / "ca.pem").write_text("")
    (tmp_path / "client.pem").write_text("")
    config = load_agent_config(tmp_path)
    assert (config.device_id, config.serve_port, config.window_s, config.queue_max_messages) == ("cam-17", 8080, 10, 10000)


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_exits_0(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    program, *path = command.split()
    if program == "edge-agent":
        with pytest.raises(SystemExit) as done:
            edge_agent([*path, "--help"])
        assert done.value.code == 0, capsys.readouterr().err
        return
    result = CliRunner().invoke(toolchain, [*path, "--help"])
    assert result.exit_code == 0, f"`{command} --help` exited {result.exit_code}: {result.output}"
