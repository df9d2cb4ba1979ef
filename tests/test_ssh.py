"""SSH to instances: pinned host keys, readiness retries, ssh config routing, the interactive command."""

import subprocess
import threading

import pytest

import crimpl
from crimpl import hostkeys
from crimpl.errors import HostKeyMismatchError, SSHNotReadyError
from crimpl.hostkeys import generate_host_key


@pytest.fixture
def config(aws, key_file, login_user, tmp_path):
    config = crimpl.AWSEC2_Config(KeyFile=str(key_file), username=login_user,
                                  ssh_cidrs=["127.0.0.1/32"], remote_dir=str(tmp_path / "remote"),
                                  ssh_timeout=20)
    config.save("test")
    return config


@pytest.fixture
def server(config):
    return crimpl.AWSEC2.new(config, nprocs=2, server_name="ssh-test")


def _run_echo(server):
    with server.session(start=False) as conn:
        return conn.run("echo connected", hide=True, in_stream=False).stdout.strip()


def test_first_connection_is_verified_with_the_key_from_the_user_data(server, serve_instance):
    serve_instance(server.instanceId)
    pinned = hostkeys.pinned_key(server.instanceId)
    assert pinned is not None and pinned.get_name() == "ssh-ed25519"
    assert _run_echo(server) == "connected"


def test_a_host_key_that_does_not_match_is_refused_and_nothing_is_sent(server, serve_instance, tmp_path):
    impostor_key, _ = generate_host_key()
    serve_instance(server.instanceId, host_private_pem=impostor_key)
    with pytest.raises(HostKeyMismatchError, match="does not match the pinned key"):
        server.submit_script(["echo should never run"])
    assert not (tmp_path / "remote").exists()


def test_keys_are_pinned_per_instance_not_per_address(config, serve_instance, ssh_routes):
    first = crimpl.AWSEC2.new(config, nprocs=2, server_name="first")
    second = crimpl.AWSEC2.new(config, nprocs=2, server_name="second")
    sshd = serve_instance(first.instanceId)
    # The second instance's addresses lead to the first one's sshd: a reachable
    # server, but not with the key pinned for the second instance.
    for address in (second.public_ip, second.private_ip):
        ssh_routes.add(address, sshd.port)
    assert _run_echo(first) == "connected"
    with pytest.raises(HostKeyMismatchError):
        _run_echo(second)


def test_a_fresh_machine_verifies_the_instance_through_its_tags(server, serve_instance, tmp_path,
                                                                monkeypatch, key_file, login_user):
    serve_instance(server.instanceId)
    # Another machine: empty CRIMPL_HOME, no pinned keys, only the account and the key file.
    monkeypatch.setenv("CRIMPL_HOME", str(tmp_path / "other-machine"))
    config = crimpl.AWSEC2_Config(KeyFile=str(key_file), username=login_user, ssh_timeout=20)
    again = crimpl.AWSEC2(server_name="ssh-test", config=config)
    assert hostkeys.pinned_key(server.instanceId) is None
    assert _run_echo(again) == "connected"
    assert hostkeys.pinned_key(server.instanceId) is not None


def test_ssh_that_comes_up_late_is_retried_until_ready(server, serve_instance):
    sshd = serve_instance(server.instanceId, start=False)
    # The server boots while crimpl is already trying to connect.
    timer = threading.Timer(1.5, lambda: sshd.start(wait=False))
    timer.start()
    try:
        assert _run_echo(server) == "connected"
    finally:
        timer.join()


def test_ssh_that_never_comes_up_fails_within_the_bound_with_the_last_error(config, serve_instance):
    bounded = crimpl.AWSEC2_Config(**{**config.to_dict(), "ssh_timeout": 2})
    server = crimpl.AWSEC2.new(bounded, nprocs=2, server_name="never-up")
    serve_instance(server.instanceId, start=False)
    with pytest.raises(SSHNotReadyError, match=r"not ready after \d+ s .*last error"):
        _run_echo(server)


def test_accept_new_pins_the_first_key_seen_when_none_is_pinned(config, serve_instance, tmp_path):
    accept = crimpl.AWSEC2_Config(**{**config.to_dict(), "host_key_policy": "accept-new"})
    server = crimpl.AWSEC2.new(accept, nprocs=2, server_name="no-cloud-init")
    private, public = generate_host_key()
    serve_instance(server.instanceId, host_private_pem=private)
    hostkeys.unpin(server.instanceId)
    # Pretend the image had no cloud-init: no key is pinned and the tag is not used.
    conn = crimpl.ssh.connection(server.private_ip, accept.username, accept.KeyFile, server.instanceId,
                                 expected_key=None, accept_new=True)
    try:
        crimpl.ssh.open_when_ready(conn, timeout=10)
    finally:
        conn.close()
    assert hostkeys.pinned_key(server.instanceId).get_base64() == public.split()[1]


def test_without_a_pinned_key_the_default_policy_refuses(server, serve_instance):
    serve_instance(server.instanceId)
    hostkeys.unpin(server.instanceId)
    conn = crimpl.ssh.connection(server.private_ip, server.config.username, server.config.KeyFile,
                                 server.instanceId, expected_key=None, accept_new=False)
    with pytest.raises(HostKeyMismatchError, match="no host key is pinned"):
        crimpl.ssh.open_when_ready(conn, timeout=5)


def test_the_interactive_command_verifies_the_same_pinned_key_with_openssh(server, serve_instance):
    serve_instance(server.instanceId)
    argv = server.ssh_command()
    assert "StrictHostKeyChecking=yes" in argv
    assert f"HostKeyAlias={server.instanceId}" in argv
    result = subprocess.run(argv + ["-o", "BatchMode=yes", "echo via-openssh"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "via-openssh"


def test_the_interactive_command_refuses_a_wrong_key(server, serve_instance):
    impostor_key, _ = generate_host_key()
    serve_instance(server.instanceId, host_private_pem=impostor_key)
    result = subprocess.run(server.ssh_command() + ["-o", "BatchMode=yes", "echo no"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "no" not in result.stdout.split()
    assert "HOST IDENTIFICATION HAS CHANGED" in result.stderr or "Host key verification failed" in result.stderr
