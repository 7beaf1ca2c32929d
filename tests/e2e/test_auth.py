"""Authenticated association: digest on REGISTER, passwords on the client, a real SIP peer."""

from pathlib import Path

import pytest

from lab.scenario import tunnels_up, wait_until
from lab.topology import Lab
from tests.e2e.helpers import add_user, password_file, run_sipp, udp_request

pytestmark = pytest.mark.e2e
SIPP = Path(__file__).parent / "sipp"


def test_right_password_works_and_wrong_one_is_refused(lab: Lab) -> None:
    lab.start_servers(file_size=1 << 20)
    users = lab.workdir / "users.json"
    add_user(lab, users, "mh1", "correct horse")
    stored = users.read_text()
    assert "correct horse" not in stored and oct(users.stat().st_mode)[-3:] == "600"
    anchor = lab.start_anchor("--users", str(users))
    wait_until(anchor.status, 20, "anchor up", (anchor,))
    assert "WITHOUT authentication" not in anchor.log.read_text()

    wrong = lab.start_client(
        "--password-file",
        str(password_file(lab, "wrong", "battery")),
        "--register-timeout",
        "3",
        name="wrong",
    )
    assert wrong.popen is not None
    assert wrong.popen.wait(30) != 0
    errors = [
        line
        for line in wrong.log.read_text().splitlines()
        if line.startswith("upmt-client: error:")
    ]
    assert len(errors) == 1 and "403" in errors[0], wrong.log_tail()
    assert "Traceback" not in wrong.log.read_text()
    assert anchor.status()["counters"]["registrar_auth_failures"] >= 1

    client = lab.start_client("--password-file", str(password_file(lab, "right", "correct horse")))
    wait_until(tunnels_up(client, 2), 30, "tunnels up", (anchor, client))
    assert udp_request(lab, "authenticated") == ["authenticated"]


def test_anchor_without_users_says_so(lab: Lab) -> None:
    anchor = lab.start_anchor()
    wait_until(anchor.status, 20, "anchor up", (anchor,))
    assert "running WITHOUT authentication" in anchor.log.read_text()


@pytest.mark.lab(extra_hosts=1)
def test_sipp_register_without_credentials_gets_a_digest_challenge(lab: Lab) -> None:
    users = lab.workdir / "users.json"
    add_user(lab, users, "sipp-terminal", "sipp-secret")
    anchor = lab.start_anchor("--users", str(users))
    wait_until(anchor.status, 20, "anchor up", (anchor,))
    log = lab.workdir / "sipp.log"
    proc = run_sipp(lab, SIPP / "register_unauthenticated.xml", 5071, log)
    assert proc.returncode == 0, (proc.stdout[-1500:], proc.stderr[-1500:])
    challenge = log.read_text()
    assert "CHALLENGE Digest" in challenge and 'realm="upmt"' in challenge
    # Nobody was associated without credentials.
    assert anchor.status()["terminals"] == []
    assert anchor.status()["counters"]["registrar_challenges"] >= 1
