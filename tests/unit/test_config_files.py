"""Config files for `run`: every option in TOML, flags win, errors name file and key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tests.unit.test_cli_errors import assert_one_line_error, run

CLIENT = """
anchor = "198.51.100.2"
interface = ["if0", "if1"]
hold_down = 3
busy-probe-interval = 0.2
encryption = "off"
metrics = "127.0.0.1:9101"
web = "127.0.0.1:8470"
"""


def print_config(module: str, *args: str) -> dict[str, object]:
    outcome = run(module, "run", *args, "--print-config")
    assert outcome.code == 0, outcome.stderr
    return tomllib.loads(outcome.stdout)


def test_the_file_sets_defaults_and_flags_win(tmp_path: Path) -> None:
    conf = tmp_path / "upmt-client.toml"
    conf.write_text(CLIENT)
    merged = print_config("upmt_client", "--config", str(conf), "--hold-down", "5")
    # `anchor` repeats now; the file's one value reads as an array of one.
    assert merged["anchor"] == ["198.51.100.2"] and merged["interface"] == ["if0", "if1"]
    assert merged["hold-down"] == 5.0  # the flag
    assert merged["busy-probe-interval"] == 0.2 and merged["encryption"] == "off"  # the file
    assert merged["probe-interval"] == 0.5  # the built-in default
    assert merged["web"] == "127.0.0.1:8470" and merged["metrics"] == "127.0.0.1:9101"
    # What --print-config prints is a config file that reads back to the same.
    again = tmp_path / "again.toml"
    again.write_text(run("upmt_client", "run", "--config", str(conf), "--print-config").stdout)
    assert print_config("upmt_client", "--config", str(again)) == print_config(
        "upmt_client", "--config", str(conf)
    )


def test_the_anchors_file_too(tmp_path: Path) -> None:
    conf = tmp_path / "anchor-node.toml"
    conf.write_text(
        'pool = "100.64.0.0/16"\nallow-prefix = ["10.99.0.0/24"]\nclient-to-client = true\n'
    )
    merged = print_config("anchor_node", "--config", str(conf))
    assert merged["pool"] == "100.64.0.0/16" and merged["allow-prefix"] == ["10.99.0.0/24"]
    assert merged["client-to-client"] is True


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("anchr = '198.51.100.2'\n", ["unknown key 'anchr'"]),
        ("hold-down = 'soon'\n", ["hold-down", "soon"]),
        ("dead-after = 0\n", ["dead-after"]),
        ("interface = 'if0'\n", ["interface", "array"]),
        ("encryption = true\n", ["encryption"]),
        ("[anchor]\nx = 1\n", ["anchor", "table"]),
        ("hold_down = 1\nhold-down = 2\n", ["twice"]),
        ("anchor = \n", ["not valid TOML"]),
    ],
)
def test_a_bad_file_is_one_line_naming_the_file_and_the_key(
    tmp_path: Path, text: str, fragments: list[str]
) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text(text)
    outcome = run("upmt_client", "run", "--config", str(conf), "--anchor", "198.51.100.2")
    assert_one_line_error(outcome, "upmt-client", str(conf), *fragments)


def test_a_missing_file_named_by_config_is_an_error(tmp_path: Path) -> None:
    outcome = run("anchor_node", "run", "--config", str(tmp_path / "none.toml"))
    assert_one_line_error(outcome, "anchor-node", "none.toml")
