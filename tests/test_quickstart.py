"""README's quickstart, end to end through the `invoke` command, against the local sandbox.

The sandbox (tests/sandbox.py) is moto_server plus an sshd for each running
crimpl instance, started with the host key from its user data, as cloud-init
would. Each command runs as a subprocess, as a user types it.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import boto3
import pytest

import crimpl
from crimpl.errors import ExitStatus
from sandbox import Sandbox, process_alive, wait_until

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
    assert after.returncode == ExitStatus.AWS
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
        assert result.returncode == 2  # ExitStatus.CONFIG
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
    assert run("fetch", "results/summary.txt", "--dest", ".").returncode == 0
    assert "words in 3 files" in (project / "summary.txt").read_text()
    (project / "fail.sh").write_text("echo going down\nexit 5\n")
    assert run("submit", "fail.sh").returncode == 0
    followed = run("logs", "--follow")
    assert followed.returncode == 5  # ExitStatus.JOB_FAILED
    assert "going down" in followed.stdout
    assert followed.stderr.strip().endswith("failed (exit code 5)")
    refused = run("stop")
    assert refused.returncode == 2  # ExitStatus.CONFIG: as for an SSH host, a server crimpl does not manage
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


# --------------------------------------------------------------------------- the sandbox as a user runs it


def _readme_block(containing):
    """The README's sh block that contains ``containing``, as written."""
    blocks = re.findall(r"```sh\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    return next(b for b in blocks if containing in b)


def _sandbox_servers(folder):
    """The pids of moto_server and sshd processes that belong to the sandbox in ``folder``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or not process_alive(proc.name):
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        mine = cwd.startswith(str(folder)) or str(folder) in cmdline
        if mine and ("moto_launcher" in cmdline or cmdline.startswith(("sshd", "/usr/sbin/sshd"))):
            found.append(int(proc.name))
    return found


@pytest.fixture
def user_shell(tmp_path):
    """Run README shell blocks as a user would, in a project folder, with this sandbox folder.

    Only the sandbox folder differs from the README (``--folder``, so a developer's
    own sandbox is left alone), and ``invoke`` finds this checkout's tasks.
    """
    folder = tmp_path / "box"
    project = tmp_path / "project"
    shutil.copytree(REPO / "examples" / "demo", project / "examples" / "demo")
    env = {**os.environ, "CRIMPL_HOME": str(tmp_path / "crimpl-home")}
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "CRIMPL_SSH_CONFIG"):
        env.pop(name, None)

    def run(block, timeout=300):
        script = (block.replace("/tmp/crimpl-sandbox", str(folder))
                  .replace("invoke sandbox --background", f"invoke sandbox --background --folder {folder}")
                  .replace("invoke sandbox --stop", f"invoke sandbox --stop --folder {folder}"))
        script = f'invoke() {{ "{sys.executable}" -m invoke --search-root "{REPO}" "$@"; }}\n' + script
        return subprocess.run(["bash", "-c", script], cwd=project, env=env, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    run.folder = folder
    run.project = project
    yield run
    subprocess.run([sys.executable, str(REPO / "tests" / "sandbox.py"), "--dir", str(folder), "--stop"],
                   capture_output=True, timeout=60)


def test_the_readme_sandbox_block_works_twice_in_a_row_and_stops_cleanly(user_shell):
    block = _readme_block("invoke sandbox --background")
    for attempt in (1, 2):
        result = user_shell(block)
        out = result.stdout + result.stderr
        assert result.returncode == 0, out
        assert "Traceback" not in out
        assert "sandbox ready" in out and "launched" in out and "72 words in 3 files" in out, out
        # The stop command it prints stops this sandbox, not the default folder's.
        assert f"invoke sandbox --stop --folder {user_shell.folder.resolve()}`" in out, out
        assert "terminated" in out and "sandbox stopped" in out, out
        assert (user_shell.project / "results" / "summary.txt").read_text() == "72 words in 3 files\n"
        (user_shell.project / "results").rename(user_shell.project / f"results-{attempt}")
        assert not (user_shell.folder / "env.sh").exists()
        wait_until(lambda: not _sandbox_servers(user_shell.folder), timeout=30,
                   what="every moto_server and sshd of the sandbox gone")


def test_the_sandbox_without_moto_fails_at_once_in_one_line(user_shell, tmp_path):
    # An environment where moto is not installed: the import fails as it would.
    shadow = tmp_path / "no-moto" / "moto"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'moto'\")\n")
    result = subprocess.run(
        [sys.executable, "-m", "invoke", "--search-root", str(REPO), "sandbox", "--background",
         "--folder", str(user_shell.folder)],
        cwd=user_shell.project, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(shadow.parent)})
    assert result.returncode != 0
    assert result.stderr.strip() == "crimpl: error: the sandbox needs moto: pip install -e '.[sandbox]'"
    assert not (user_shell.folder / "env.sh").exists()
    assert not _sandbox_servers(user_shell.folder)


def test_a_killed_sandbox_takes_its_servers_with_it(user_shell):
    # The README's block up to its first crimpl command: start, source env.sh, pick the stack.
    setup = _readme_block("invoke sandbox --background").splitlines()[:3]
    started = user_shell("\n".join(setup) + "\ninvoke up\n")
    assert started.returncode == 0, started.stderr
    wait_until(lambda: len(_sandbox_servers(user_shell.folder)) >= 2, timeout=30,
               what="moto_server and the instance's sshd")
    pid = int((user_shell.folder / "sandbox.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not _sandbox_servers(user_shell.folder), timeout=30,
               what="every moto_server and sshd of the killed sandbox gone")


# --------------------------------------------------------------------------- the Python API on the sandbox


@pytest.fixture
def sandbox_api(sandbox, monkeypatch):
    """The README's Python example pointed at the sandbox, as env.sh does."""
    for name, value in sandbox.env.items():
        monkeypatch.setenv(name, value)
    config = crimpl.AWSEC2_Config(KeyFile=str(sandbox.key), username=sandbox.user, region="us-east-1",
                                  ssh_timeout=30)
    config.save("mine")
    return config


def test_a_script_submitted_right_after_new_runs(sandbox_api, sandbox):
    for _ in range(2):
        server = crimpl.AWSEC2.new(nprocs=2)
        try:
            job = server.submit_script(["echo hello from $(hostname)"])
            assert job.wait(timeout=30, interval=0.2).state == "complete"
        finally:
            server.terminate()
    assert {i["State"]["Name"] for i in _crimpl_instances(sandbox)} == {"terminated"}


def test_each_sandbox_instance_has_its_own_home(sandbox_api, sandbox):
    first = crimpl.AWSEC2.new(nprocs=2, server_name="first")
    second = crimpl.AWSEC2.new(nprocs=2, server_name="second")
    job = first.submit_script(["pwd > where.txt"])
    assert job.wait(timeout=30, interval=0.2).state == "complete"
    assert [j.job_name for j in first.jobs] == [job.job_name]
    assert second.jobs == []
    assert second.job_status == "not-submitted"
    homes = {iid: sandbox.sshds[iid].home for iid in (first.instanceId, second.instanceId)}
    assert (homes[first.instanceId] / "crimpl" / "jobs" / job.job_name / "where.txt").exists()
    assert not (homes[second.instanceId] / "crimpl").exists()
