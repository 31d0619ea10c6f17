"""The servers the tests and the benchmark start are the README's production command, flag for flag."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from django.conf import settings

from bench.serverprocess import ServerProcess

PLACE_DEPENDENT = {"--host", "--port"}  # where it listens: the README's 0.0.0.0:8000, the tests' a free loopback port


def options(command: list[str]) -> dict[str, str]:
    """The `--flag value` pairs of a uvicorn command line."""
    return {flag: value for flag, value in zip(command, command[1:], strict=False) if flag.startswith("--")}


def readme_command() -> list[str]:
    readme = (Path(settings.BASE_DIR) / "README.md").read_text()
    block = re.search(r"^```sh\n(uvicorn chatsite\.asgi:application .*?)\n```", readme, re.S | re.M)
    assert block, "the README shows its production uvicorn command in a sh block"
    return shlex.split(block.group(1).replace("\\\n", " "))


def test_the_servers_under_test_run_the_readmes_production_command(tmp_path):
    readme = options(readme_command())
    tested = options(ServerProcess("x", "uvicorn", "chatsite.asgi:application", {}, tmp_path / "log").command())
    assert readme["--ws-per-message-deflate"] == "false"  # compression per socket costs more than it saves
    for flag, value in readme.items():
        if flag not in PLACE_DEPENDENT:
            assert tested.get(flag) == value, flag


def assert_runs_the_readmes_command(script: str, command: str) -> None:
    """bin/`script`'s uvicorn command (the regular expression `command`, whose group is its arguments,
    continuation lines included) has the README's flags, but for where it listens."""
    line = re.search(command, (Path(settings.BASE_DIR) / "bin" / script).read_text(), re.S | re.M)
    assert line, f"bin/{script} runs no uvicorn command"
    served = options(shlex.split(line.group(1).replace("\\\n", " ")))
    for flag, value in options(readme_command()).items():
        if flag not in PLACE_DEPENDENT:
            assert served.get(flag) == value, flag


def test_bin_serve_runs_the_readmes_production_command():
    assert_runs_the_readmes_command("serve", r"^exec uvicorn chatsite\.asgi:application (.*?)\n(?!  )")


def test_bin_cluster_app_hosts_run_the_readmes_production_command():
    assert_runs_the_readmes_command("cluster", r"\.venv/bin/uvicorn (chatsite\.asgi:application .*?)\n(?!    )")
