"""The invoke tasks, run as the user runs them: the `crimpl` command (and `invoke` in a checkout)
in a subprocess, against moto_server, with a temporary CRIMPL_HOME."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

import crimpl
from crimpl import AWSEC2, AWSEC2_Config

SSH_CIDRS = ["203.0.113.7/32"]
REPO = Path(__file__).resolve().parents[1]
LIFECYCLE_TASKS = ["start", "stop", "terminate", "status", "list"]


def crimpl_command():
    beside_python = Path(sys.executable).with_name("crimpl")
    return str(beside_python) if beside_python.exists() else shutil.which("crimpl")


def run(*args, cwd, env=None, command=None):
    """Run ``crimpl ARGS`` (or ``command``) with this test's environment; stdin is empty."""
    return subprocess.run(command or [crimpl_command(), *args], cwd=cwd, env=env or dict(os.environ),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


def assert_one_line_error(result):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("crimpl: error: ")
    return lines[0]


def task_help(listing):
    """Task name -> its help lines, from ``--list`` output."""
    helps, current = {}, None
    for line in listing.splitlines():
        entry = re.match(r"^  (\S+)\s{2,}(\S.*)$", line)
        if entry:
            current = entry.group(1)
            helps[current] = [entry.group(2)]
        elif current and re.match(r"^\s{4,}\S", line):
            helps[current].append(line.strip())
        else:
            current = None
    return helps


@pytest.fixture
def ec2(aws):
    return boto3.client("ec2")


@pytest.fixture
def config(key_file):
    config = AWSEC2_Config(KeyFile=str(key_file), ssh_cidrs=SSH_CIDRS)
    config.save("default")
    return config


def state_of(ec2, instance_id):
    return ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]["State"]["Name"]


# -- help --------------------------------------------------------------------------------


def test_crimpl_list_shows_one_line_help_for_lifecycle_tasks(tmp_path):
    result = run("--list", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    helps = task_help(result.stdout)
    for name in LIFECYCLE_TASKS:
        assert len(helps.get(name, [])) == 1, (name, result.stdout)


def test_invoke_list_in_checkout_shows_one_line_help_for_lifecycle_tasks():
    result = run(cwd=REPO, command=[sys.executable, "-m", "invoke", "--list"])

    assert result.returncode == 0, result.stderr
    helps = task_help(result.stdout)
    for name in LIFECYCLE_TASKS:
        assert len(helps.get(name, [])) == 1, (name, result.stdout)


def test_crimpl_version_is_the_package_version(tmp_path):
    result = run("--version", cwd=tmp_path)

    assert crimpl.__version__ in result.stdout


# -- list and status -----------------------------------------------------------------------


def test_list_shows_each_live_server_with_state_type_address_and_cost(ec2, config, tmp_path):
    running = AWSEC2.new(config=config, nprocs=2, server_name="runner")
    stopped = AWSEC2.new(config=config, nprocs=4, server_name="sleeper")
    stopped.stop()
    plain = ec2.run_instances(ImageId="ami-0a5c3558529277641", InstanceType="c6a.large",
                              MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]

    result = run("list", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert set(rows) == {running.instanceId, stopped.instanceId}
    assert plain not in result.stdout
    run_row = rows[running.instanceId]
    assert run_row[1:4] == ["runner", "running", running.instance_type]
    assert run_row[4] == running.public_ip
    assert re.fullmatch(r"\$\d+\.\d\d", run_row[-1])
    assert rows[stopped.instanceId][1:3] == ["sleeper", "stopped"]
    assert rows[stopped.instanceId][-1] == "$0.00"


def test_list_without_servers_says_nothing_is_billing(aws, tmp_path):
    result = run("list", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "no crimpl servers" in result.stdout


def test_status_by_instance_id_shows_name_state_type_and_address(aws, config, tmp_path):
    server = AWSEC2.new(config=config, nprocs=2, server_name="watched")

    result = run("status", "--instance-id", server.instanceId, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["watched", server.instanceId, "running", server.instance_type,
                                     server.public_ip]


def test_status_reads_state_changed_outside_crimpl(ec2, config, tmp_path):
    server = AWSEC2.new(config=config, nprocs=2, server_name="watched")
    ec2.stop_instances(InstanceIds=[server.instanceId])

    result = run("status", "--server", "watched", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:3] == ["watched", server.instanceId, "stopped"]


# -- lifecycle ------------------------------------------------------------------------------


def test_stop_and_start_by_server_name(ec2, config, tmp_path):
    server = AWSEC2.new(config=config, nprocs=2, server_name="cycler")

    stopped = run("stop", "--server", "cycler", cwd=tmp_path)

    assert stopped.returncode == 0, stopped.stderr
    assert state_of(ec2, server.instanceId) == "stopped"
    assert f"{server.instanceId}: stopped" in stopped.stdout

    started = run("start", "--server", "cycler", cwd=tmp_path)

    assert started.returncode == 0, started.stderr
    assert state_of(ec2, server.instanceId) == "running"
    assert f"{server.instanceId}: running at {server.public_ip}" in started.stdout


def test_terminate_with_yes_terminates_and_cleans_up(ec2, config, tmp_path):
    server = AWSEC2.new(config=config, nprocs=2, server_name="doomed")

    result = run("terminate", "--instance-id", server.instanceId, "--yes", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert state_of(ec2, server.instanceId) == "terminated"
    assert ec2.describe_key_pairs()["KeyPairs"] == []


def test_terminate_without_yes_and_no_answer_changes_nothing(ec2, config, tmp_path):
    server = AWSEC2.new(config=config, nprocs=2)

    result = run("terminate", "--instance-id", server.instanceId, cwd=tmp_path)

    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "--yes" in result.stderr
    assert state_of(ec2, server.instanceId) == "running"


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["status", "--instance-id", "i-00000000000000000"],
    ["terminate", "--instance-id", "i-00000000000000000", "--yes"],
    ["stop", "--server", "nobody"],
    ["start", "--instance-id", "not-an-id"],
])
def test_unknown_server_is_one_line_error_without_traceback(aws, args, tmp_path):
    result = run(*args, cwd=tmp_path)

    line = assert_one_line_error(result)
    assert ("i-00000000000000000" in line) or ("nobody" in line) or ("not-an-id" in line)


def test_starting_terminated_server_is_one_line_error(ec2, config, tmp_path):
    server = AWSEC2.new(config=config, nprocs=2)
    server.terminate()

    result = run("start", "--instance-id", server.instanceId, cwd=tmp_path)

    assert "terminated" in assert_one_line_error(result)


def test_missing_region_is_one_line_error(aws, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_REGION", "AWS_DEFAULT_REGION")}

    result = run("list", cwd=tmp_path, env=env)

    assert "region" in assert_one_line_error(result)
