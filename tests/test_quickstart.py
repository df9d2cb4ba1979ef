"""README's quickstart, end to end through the `invoke` command, against the local sandbox.

The sandbox (tests/sandbox.py) is moto_server plus an sshd for each running
crimpl instance, started with the host key from its user data, as cloud-init
would. Each command runs as a subprocess, as a user types it.
"""

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import boto3
import pytest

from sandbox import Sandbox

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def sandbox(tmp_path):
    box = Sandbox(tmp_path / "sandbox").start()
    done = threading.Event()

    def keep_in_step():
        while not done.wait(box.interval):
            box.sync()

    thread = threading.Thread(target=keep_in_step, daemon=True)
    thread.start()
    yield box
    done.set()
    thread.join(10)
    box.stop()


@pytest.fixture
def project(tmp_path, sandbox):
    """A user's project folder: the demo job and a stack file for the sandbox."""
    folder = tmp_path / "project"
    shutil.copytree(REPO / "examples" / "demo", folder)
    (folder / "Pulumi.dev.yaml").write_text(sandbox.stack_yaml(), encoding="utf-8")
    return folder


def _invoke(project, sandbox, *args, check=True):
    env = {**os.environ, **sandbox.env, "CRIMPL_HOME": str(project.parent / "crimpl-home")}
    result = subprocess.run(
        [sys.executable, "-m", "invoke", "--search-root", str(REPO), *args],
        cwd=project, env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
    )
    assert "Traceback" not in result.stderr, result.stderr
    if check:
        assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result


def _crimpl_instances(sandbox):
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=sandbox.moto.url,
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    found = ec2.describe_instances(Filters=[{"Name": "tag:crimpl:managed", "Values": ["true"]}])
    return [i for r in found["Reservations"] for i in r["Instances"]]


def test_the_quickstart_runs_end_to_end_with_the_boto3_provisioner(project, sandbox):
    first = _invoke(project, sandbox, "up", "--provisioner", "boto3")
    assert "launched" in first.stdout
    again = _invoke(project, sandbox, "up", "--provisioner", "boto3")
    assert "unchanged" in again.stdout
    assert len(_crimpl_instances(sandbox)) == 1
    instance_id = _crimpl_instances(sandbox)[0]["InstanceId"]
    assert instance_id in _invoke(project, sandbox, "status").stdout

    submitted = _invoke(project, sandbox, "submit", "run.sh", "-f", "data")
    assert "submitted" in submitted.stdout
    logs = _invoke(project, sandbox, "logs", "--follow")
    assert "words in 3 files" in logs.stdout
    assert "complete" in logs.stderr
    assert "complete" in _invoke(project, sandbox, "jobs").stdout
    _invoke(project, sandbox, "fetch", "results", "--dest", "out/")
    assert "words in 3 files" in (project / "out" / "results" / "summary.txt").read_text()

    _invoke(project, sandbox, "stop")
    assert " stopped " in _invoke(project, sandbox, "status").stdout
    _invoke(project, sandbox, "start")
    assert " running " in _invoke(project, sandbox, "status").stdout
    # The job and its files survived the stop/start, and the new address is used.
    assert "words in 3 files" in _invoke(project, sandbox, "logs").stdout

    _invoke(project, sandbox, "destroy", "--provisioner", "boto3", "--yes")
    assert [i["State"]["Name"] for i in _crimpl_instances(sandbox)] == ["terminated"]
    after = _invoke(project, sandbox, "status", check=False)
    assert after.returncode == 1
    assert after.stderr.startswith("crimpl: error: stack dev has no live server")
    assert "no crimpl servers" in _invoke(project, sandbox, "list").stdout


def test_destroy_asks_first_and_changes_nothing_without_a_yes(project, sandbox):
    _invoke(project, sandbox, "up", "--provisioner", "boto3")
    refused = _invoke(project, sandbox, "destroy", "--provisioner", "boto3", check=False)
    assert refused.returncode == 1
    assert "not confirmed" in refused.stderr
    assert [i["State"]["Name"] for i in _crimpl_instances(sandbox)] == ["running"]


def test_the_pulumi_provisioner_without_the_cli_says_how_to_install_it(project, sandbox):
    env_path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                               if not (Path(p) / "pulumi").exists())
    for task in ("up", "preview", "destroy", "refresh"):
        result = subprocess.run(
            [sys.executable, "-m", "invoke", "--search-root", str(REPO), *task.split()],
            cwd=project, env={**os.environ, **sandbox.env, "PATH": env_path},
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        assert "Pulumi CLI is not installed" in result.stderr
        assert "--provisioner boto3" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_the_local_stack_runs_the_same_job_with_no_account(project, tmp_path):
    env = {**os.environ, "CRIMPL_HOME": str(tmp_path / "home")}
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "invoke", "--search-root", str(REPO), *a, "--stack", "local"],
        cwd=project, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert run("submit", "run.sh", "-f", "data").returncode == 0
    assert "words in 3 files" in run("logs", "--follow").stdout
    assert run("fetch", "results/summary.txt", "--dest", "summary.txt").returncode == 0
    assert "words in 3 files" in (project / "summary.txt").read_text()
    (project / "fail.sh").write_text("echo going down\nexit 5\n")
    assert run("submit", "fail.sh").returncode == 0
    followed = run("logs", "--follow")
    assert followed.returncode == 1
    assert "going down" in followed.stdout
    assert followed.stderr.strip().endswith("failed (exit code 5)")
    refused = run("stop")
    assert refused.returncode == 1
    assert refused.stderr.strip() == "crimpl: error: the local target is this machine: crimpl never stops it"


def test_readme_first_command_runs_the_demo_job_end_to_end(tmp_path):
    dest = tmp_path / "demo-results"
    result = subprocess.run(
        [sys.executable, "-m", "invoke", "demo", "--dest", str(dest)],
        cwd=REPO, env={**os.environ, "CRIMPL_HOME": str(tmp_path / "home")},
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert "complete" in result.stdout
    assert (dest / "results" / "summary.txt").read_text() == "72 words in 3 files\n"
