"""Any SSH host as a crimpl server: a real sshd on loopback, reached through an OpenSSH config.

The job behaviours themselves run against this kind in tests/test_jobs.py; here are
what is its own: the OpenSSH config, the user's known_hosts, saving by name and the
lifecycle it refuses.
"""

import json
import re
import stat

import pytest

import crimpl
from crimpl.errors import ConfigError, HostKeyMismatchError, JobError, TransferError
from crimpl.hostkeys import generate_host_key


def test_a_job_on_an_ssh_host_runs_and_its_outputs_come_back(ssh_host, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "n.txt").write_text("4\n5\n")
    server = crimpl.RemoteThreadServer(ssh_host.alias)
    job = server.submit_script(["mkdir -p results", "awk '{s+=$1} END {print s}' data/n.txt > results/sum.txt",
                                "echo on $(hostname)"], files=[tmp_path / "data"], quiet=True)
    status = job.wait(timeout=30, interval=0.1)
    assert status.state == "complete" and status.exit_code == 0
    # "~/crimpl" is under the login home, created on first use.
    assert (ssh_host.home / "crimpl" / "jobs" / job.job_name / "crimpl-status").is_file()
    job.check_output("results/", str(tmp_path / "out") + "/", quiet=True)
    assert (tmp_path / "out" / "sum.txt").read_text() == "9\n"
    assert [j.job_name for j in server.jobs] == [job.job_name]


def test_user_at_host_and_port_works_without_an_alias(ssh_host):
    server = crimpl.RemoteThreadServer(f"{ssh_host.user}@127.0.0.1:{ssh_host.sshd.port}", directory="~/other")
    assert server.run_script(["echo plain address"], stream=None, quiet=True) == 0
    assert (ssh_host.home / "other" / "jobs").is_dir()


def test_a_folder_that_cannot_be_made_is_a_one_line_error_and_no_job(ssh_host):
    server = crimpl.RemoteThreadServer(ssh_host.alias, directory="/proc/crimpl")
    with pytest.raises(TransferError) as refused:
        server.submit_script(["echo never"], quiet=True)
    message = str(refused.value)
    assert "\n" not in message and "/proc/crimpl" in message, message
    assert "submit again" in message


def test_an_unknown_host_key_is_refused_saying_how_to_add_it(ssh_host):
    ssh_host.trust("")
    server = crimpl.RemoteThreadServer(ssh_host.alias)
    with pytest.raises(HostKeyMismatchError) as info:
        server.submit_script(["echo never"])
    message = str(info.value)
    assert "\n" not in message
    assert f"ssh-keyscan -p {ssh_host.sshd.port} 127.0.0.1 >> {ssh_host.known_hosts}" in message
    assert f"`ssh {ssh_host.alias}` once" in message
    assert not (ssh_host.home / "crimpl").exists()  # nothing was sent
    assert not ssh_host.known_hosts.exists()  # never added silently


def test_a_changed_host_key_is_refused_even_with_accept_new(ssh_host):
    _other_private, other_public = generate_host_key()
    ssh_host.trust(other_public)
    for policy in ("strict", "accept-new"):
        server = crimpl.RemoteThreadServer(ssh_host.alias, host_key_policy=policy)
        with pytest.raises(HostKeyMismatchError, match="offers host key SHA256:.*but known_hosts holds"):
            server.job_statuses()
    assert ssh_host.known_hosts.read_text() == f"{ssh_host.key_name} {other_public}\n"
    assert not (ssh_host.home / "crimpl").exists()


def test_accept_new_adds_an_unknown_key_which_then_holds(ssh_host):
    ssh_host.trust("")
    server = crimpl.RemoteThreadServer(ssh_host.alias, host_key_policy="accept-new")
    assert server.job_statuses() == {}
    line = ssh_host.known_hosts.read_text()
    assert line.split() == [ssh_host.key_name, *ssh_host.host_public.split()[:2]]
    assert stat.S_IMODE(ssh_host.known_hosts.stat().st_mode) == 0o600
    # From now on the added key is what a strict server checks, and a new key is refused.
    assert crimpl.RemoteThreadServer(ssh_host.alias).job_statuses() == {}
    ssh_host.sshd.stop()
    ssh_host.sshd.host_key.write_text(generate_host_key()[0])
    ssh_host.sshd.start()
    with pytest.raises(HostKeyMismatchError, match="ssh-keygen -R"):
        server.job_statuses()


def test_a_bastion_from_proxyjump_is_checked_against_known_hosts_too(ssh_host, tmp_path, key_file):
    from sandbox import Sshd

    bastion_private, bastion_public = generate_host_key()
    bastion = Sshd(tmp_path / "bastion", bastion_private, key_file.with_suffix(".pub").read_text()).start()
    try:
        ssh_host.write_config(extra=f"Host inside\n  HostName 127.0.0.1\n  Port {ssh_host.sshd.port}\n"
                                    f"  User {ssh_host.user}\n  ProxyJump bastion\n"
                                    f"Host bastion\n  HostName 127.0.0.1\n  Port {bastion.port}\n"
                                    f"  User {ssh_host.user}\n")
        server = crimpl.RemoteThreadServer("inside")
        with pytest.raises(HostKeyMismatchError, match=f"127.0.0.1\\]:{bastion.port}"):
            server.job_statuses()
        ssh_host.known_hosts.write_text(ssh_host.known_hosts.read_text()
                                        + f"[127.0.0.1]:{bastion.port} {bastion_public}\n")
        assert server.run_script(["echo through the bastion"], quiet=True) == 0
    finally:
        bastion.stop()


def test_lifecycle_actions_are_refused_in_one_line(ssh_host):
    server = crimpl.RemoteThreadServer(ssh_host.alias)
    for action in ("start", "stop", "terminate"):
        with pytest.raises(ConfigError, match=f"crimpl cannot {action} it"):
            getattr(server, action)()
    with pytest.raises(JobError, match="on_complete needs an EC2 server"):
        server.submit_script(["true"], on_complete="stop")


@pytest.mark.parametrize("kwargs, words", [
    ({"host": ""}, "host must be"),
    ({"host": "two words"}, "host must be"),
    ({"host": "h", "host_key_policy": "no"}, "host_key_policy must be"),
    ({"host": "h", "directory": "~other/x"}, "directory must be"),
])
def test_bad_settings_are_refused_in_one_line(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        crimpl.RemoteThreadServer(**kwargs)


# -- saved by name ------------------------------------------------------------------


def test_a_saved_server_is_loaded_again_by_name_without_secrets(ssh_host, crimpl_home):
    server = crimpl.RemoteThreadServer(ssh_host.alias, directory="~/saved", host_key_policy="accept-new")
    path = server.save("work")
    assert path == crimpl_home / "servers" / "work.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"kind": "ssh", "host": ssh_host.alias, "directory": "~/saved",
                                            "ssh_config": None, "host_key_policy": "accept-new"}
    assert crimpl.list_servers() == ["work"]
    loaded = crimpl.load_server("work")
    assert type(loaded) is crimpl.RemoteThreadServer
    assert loaded.to_dict() == server.to_dict()
    assert loaded.run_script(["true"], quiet=True) == 0
    assert (ssh_host.home / "saved" / "jobs").is_dir()


def test_saving_over_a_name_needs_overwrite(crimpl_home):
    crimpl.RemoteThreadServer("one").save("hpc")
    with pytest.raises(ConfigError, match="overwrite=True"):
        crimpl.RemoteThreadServer("two").save("hpc")
    crimpl.RemoteThreadServer("two").save("hpc", overwrite=True)
    assert crimpl.load_server("hpc").host == "two"


def test_loading_a_missing_or_broken_server_is_one_line(crimpl_home):
    crimpl.RemoteThreadServer("one").save("kept")
    with pytest.raises(ConfigError, match="no saved server named gone; saved: kept"):
        crimpl.load_server("gone")
    (crimpl_home / "servers" / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="save the server again"):
        crimpl.load_server("broken")
    with pytest.raises(ConfigError, match="not valid"):
        crimpl.load_server("../escape")


# -- the crimpl command on a saved server --------------------------------------------


def test_the_job_tasks_work_on_a_saved_ssh_host(ssh_host, tmp_path):
    from cli_helper import run_cli

    crimpl.RemoteThreadServer(ssh_host.alias).save("box")
    script = tmp_path / "run.sh"
    script.write_text("mkdir -p out\necho hello > out/greeting.txt\necho done\n")
    result = run_cli("submit", script, "--name", "first", "--server", "box", "--quiet", cwd=tmp_path)
    assert result.code == 0, result
    assert "crimpl logs --job first --follow --server box" in result.stdout
    followed = run_cli("logs", "first", "--follow", "--server", "box", cwd=tmp_path)
    assert followed.code == 0 and "done" in followed.stdout, followed
    listed = run_cli("jobs", "--server", "box", cwd=tmp_path)
    assert re.match(r"first\s+complete", listed.stdout), listed
    fetched = run_cli("fetch", "out/", "--dest", "got", "--server", "box", "--quiet", cwd=tmp_path)
    assert fetched.code == 0, fetched
    assert (tmp_path / "got" / "greeting.txt").read_text() == "hello\n"
    status = run_cli("status", "--server", "box", cwd=tmp_path)
    assert status.stdout.startswith(f"box: {ssh_host.alias}, jobs in crimpl; latest job: complete"), status
    gate = tmp_path / "gate"
    long = tmp_path / "long.sh"
    long.write_text(f"while [ ! -e {gate} ]; do sleep 0.1; done\n")
    assert run_cli("submit", long, "--name", "long", "--server", "box", "--quiet", cwd=tmp_path).code == 0
    killed = run_cli("kill", "long", "--server", "box", cwd=tmp_path)
    assert killed.stdout.strip() == "long: killed", killed


@pytest.mark.parametrize("task", ["start", "stop", "terminate"])
def test_lifecycle_tasks_on_a_saved_ssh_host_are_one_line_errors(task, tmp_path):
    from cli_helper import run_cli
    from test_cli import assert_one_line_error

    crimpl.RemoteThreadServer("somewhere").save("box")
    args = [task, "--server", "box", *(["--yes"] if task == "terminate" else [])]
    line = assert_one_line_error(run_cli(*args, cwd=tmp_path), code=crimpl.ExitStatus.CONFIG)
    assert f"crimpl cannot {task} it" in line


def test_list_shows_saved_remote_servers_beside_ec2_ones(aws, tmp_path):
    from cli_helper import run_cli

    crimpl.RemoteThreadServer("me@login.example.org", directory="/scratch/me").save("cluster")
    result = run_cli("list", cwd=tmp_path)
    assert result.code == 0, result
    lines = result.stdout.splitlines()
    assert re.match(r"cluster\s+ssh\s+me@login.example.org:/scratch/me$", lines[1])
    assert "no crimpl servers" in lines[2]
