"""SSH to instances: pinned host keys, readiness retries, ssh config routing, the interactive command."""

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import paramiko
import pytest

import crimpl
from crimpl import hostkeys
from crimpl.errors import HostKeyMismatchError, SSHNotReadyError
from crimpl.hostkeys import generate_host_key
from sandbox import Sshd, instance_addresses, moto_client, user_data_host_key, wait_until

REPO = Path(__file__).resolve().parent.parent


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
    with pytest.raises(SSHNotReadyError, match=r"not ready after \d+ s .*last error") as error:
        _run_echo(server)
    # The server is named by its name and id, not by the address its route leads to.
    assert f"SSH to never-up ({server.instanceId}) not ready" in str(error.value)
    assert not str(error.value).startswith(f"SSH to {server.config.username}@")


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


# --------------------------------------------------------------------------- waiting for SSH


def test_waiting_for_ssh_says_so_in_one_line_naming_the_server(server, serve_instance, caplog):
    caplog.set_level("INFO", logger="crimpl")
    sshd = serve_instance(server.instanceId, start=False)
    timer = threading.Timer(1.5, lambda: sshd.start(wait=False))
    timer.start()
    try:
        assert _run_echo(server) == "connected"
    finally:
        timer.join()
    waiting = [r.getMessage() for r in caplog.records if "waiting for SSH" in r.getMessage()]
    assert len(waiting) == 1
    assert waiting[0].startswith(f"waiting for SSH on ssh-test ({server.instanceId}): ")


def test_a_route_that_appears_while_waiting_is_used(server, serve_instance, ssh_routes, key_file):
    # Right after launch the ssh config has no route for the instance yet (the
    # catch-all leads to a closed port); it appears while crimpl is retrying.
    pem = user_data_host_key(moto_client(os.environ["AWS_ENDPOINT_URL"]), server.instanceId)[0]
    sshd = Sshd(Path(ssh_routes.path).parent / "late-route-sshd", pem,
                key_file.with_suffix(".pub").read_text()).start()

    def route():
        for address in instance_addresses(server.instanceId, os.environ):
            ssh_routes.add(address, sshd.port)

    timer = threading.Timer(1.5, route)
    timer.start()
    try:
        assert _run_echo(server) == "connected"
    finally:
        timer.join()
        sshd.stop()


@pytest.fixture
def accept_then_close():
    """A loopback TCP port that accepts every connection and closes it at once (sshd starting)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    done = threading.Event()

    def serve():
        while not done.is_set():
            try:
                sock, _ = listener.accept()
            except OSError:
                continue
            sock.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    done.set()
    thread.join(5)
    listener.close()


def test_a_port_that_accepts_and_closes_shows_no_paramiko_traceback(accept_then_close, key_file):
    # As a user runs crimpl: a fresh process, no logging configured, stderr to the terminal.
    _, public = generate_host_key()
    script = (
        "import sys, crimpl\n"
        "from crimpl import ssh, hostkeys\n"
        f"conn = ssh.connection('127.0.0.1', 'nobody', {str(key_file)!r}, 'i-banner',\n"
        f"                      expected_key=hostkeys.key_from_line({public!r}), port={accept_then_close})\n"
        "try:\n"
        "    ssh.open_when_ready(conn, timeout=2.5, interval=0.5, label='banner-test (i-banner)')\n"
        "except crimpl.errors.SSHNotReadyError as exc:\n"
        "    print(exc, file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, cwd=REPO, stdin=subprocess.DEVNULL)
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert "Exception (client)" not in result.stderr
    # One progress line, then crimpl's own one-line error, which keeps paramiko's reason.
    assert lines[0] == "crimpl: waiting for SSH on banner-test (i-banner): 0 s"
    assert lines[-1].startswith("SSH to banner-test (i-banner) not ready after")
    assert "protocol banner" in lines[-1]
    assert len(lines) == 2


# --------------------------------------------------------------------------- bad known_hosts lines


def test_a_bad_line_in_the_pin_file_is_skipped_with_one_warning(server, serve_instance, caplog):
    serve_instance(server.instanceId)
    path = hostkeys.known_hosts_path()
    good = path.read_text()
    path.write_text("i-0garbage ssh-ed25519 not*base64!\n" + good + "half-a-line\n")
    caplog.set_level("INFO", logger="crimpl")
    assert _run_echo(server) == "connected"
    assert _run_echo(server) == "connected"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"skipped 2 unreadable line(s) of {path} (line 1, 3)")
    assert hostkeys.pinned_keys(server.instanceId)


def test_a_bad_line_in_the_users_known_hosts_does_not_stop_a_bastion(
        server, serve_instance, ssh_routes, key_file, login_user, tmp_path, monkeypatch, caplog):
    target = serve_instance(server.instanceId)
    bastion_private, bastion_public = generate_host_key()
    bastion = Sshd(tmp_path / "bastion", bastion_private, key_file.with_suffix(".pub").read_text()).start()
    try:
        # The instance is reached through a bastion (ProxyJump), verified by the user's known_hosts.
        ssh_routes.path.write_text(
            f"Host bastion\n  HostName 127.0.0.1\n  Port {bastion.port}\n  User {login_user}\n"
            f"  IdentityFile {key_file}\n"
            f"Host {server.public_ip}\n  HostName 127.0.0.1\n  Port {target.port}\n  ProxyJump bastion\n"
        )
        monkeypatch.setenv("HOME", str(tmp_path / "user"))
        known = tmp_path / "user" / ".ssh" / "known_hosts"
        known.parent.mkdir(parents=True)
        known.write_text(f"broken.example ssh-rsa AAAA=notbase64=\n"
                         f"[127.0.0.1]:{bastion.port} {bastion_public}\n")
        caplog.set_level("INFO", logger="crimpl")
        assert _run_echo(server) == "connected"
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert warnings == [f"skipped 1 unreadable line(s) of {known} (line 1): fix or delete them"]
        # The bastion is still verified: without its line, it is refused.
        known.write_text("broken.example ssh-rsa AAAA=notbase64=\n")
        with pytest.raises(HostKeyMismatchError, match=r"bastion .* not in ~/.ssh/known_hosts"):
            _run_echo(server)
    finally:
        bastion.stop()


# --------------------------------------------------------------------------- replacing the user-data key


def _presented_key(sshd):
    """The host key ``sshd`` presents now, read with a bare paramiko handshake."""
    with socket.create_connection(("127.0.0.1", sshd.port), timeout=10) as sock:
        transport = paramiko.Transport(sock)
        try:
            transport.start_client(timeout=10)
            return transport.get_remote_server_key()
        finally:
            transport.close()


def test_the_host_key_from_the_user_data_is_replaced_after_the_first_connection(server, serve_instance):
    sshd = serve_instance(server.instanceId)
    _, user_data_public = user_data_host_key(moto_client(os.environ["AWS_ENDPOINT_URL"]), server.instanceId)
    old = hostkeys.key_from_line(user_data_public)
    assert hostkeys.same_key(_presented_key(sshd), old)
    assert _run_echo(server) == "connected"
    # sshd reloads with its new key: wait until it presents it.
    new = wait_until(lambda: (lambda k: None if hostkeys.same_key(k, old) else k)(_presented_key(sshd)),
                     timeout=20, what="sshd presenting a new key")
    assert [k.get_base64() for k in hostkeys.pinned_keys(server.instanceId)] == [old.get_base64(),
                                                                                  new.get_base64()]
    assert server.tags["crimpl:host-key"] == f"{user_data_public} {hostkeys.public_line(new)}"
    assert "crimpl:host-key-rotated" not in server.tags
    assert not Path(f"{sshd.host_key}.crimpl-new").exists()


def test_after_a_second_connection_only_the_new_key_is_pinned_and_tagged(server, serve_instance):
    sshd = serve_instance(server.instanceId)
    assert _run_echo(server) == "connected"
    assert _run_echo(server) == "connected"
    new = _presented_key(sshd)
    assert [k.get_base64() for k in hostkeys.pinned_keys(server.instanceId)] == [new.get_base64()]
    assert server.tags["crimpl:host-key"] == hostkeys.public_line(new)
    assert server.tags["crimpl:host-key-rotated"] == "true"
    assert _run_echo(server) == "connected"


def test_a_server_with_the_user_data_key_is_refused_once_it_is_replaced(server, serve_instance, tmp_path):
    sshd = serve_instance(server.instanceId)
    user_data_private, user_data_public = user_data_host_key(
        moto_client(os.environ["AWS_ENDPOINT_URL"]), server.instanceId)
    _run_echo(server)
    _run_echo(server)
    # OpenSSH pinning only the user-data key no longer accepts the server.
    known = tmp_path / "user-data-known-hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {user_data_public}\n")
    result = subprocess.run(
        ["ssh", "-p", str(sshd.port), "-i", str(server.config.KeyFile), "-o", "IdentitiesOnly=yes",
         "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
         f"{server.config.username}@127.0.0.1", "echo no"],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode != 0 and "no" not in result.stdout.split()
    # Whoever read the user data can present its key, and crimpl refuses them.
    sshd.stop()
    serve_instance(server.instanceId, host_private_pem=user_data_private)
    with pytest.raises(HostKeyMismatchError):
        _run_echo(server)


def test_a_replacement_whose_reload_fails_still_verifies_and_completes_later(server, serve_instance,
                                                                            caplog):
    sshd = serve_instance(server.instanceId)
    old = _presented_key(sshd)
    # The last step, reloading sshd, fails (its pid file is gone).
    sshd.pid_file.unlink()
    caplog.set_level("INFO", logger="crimpl")
    assert _run_echo(server) == "connected"
    assert any("could not replace the host key" in r.getMessage() for r in caplog.records)
    assert len(hostkeys.pinned_keys(server.instanceId)) == 2
    assert "crimpl:host-key-rotated" not in server.tags
    # Whichever key the server now presents is verified, and the next connection finishes the job.
    assert _run_echo(server) == "connected"
    new = _presented_key(sshd)
    assert not hostkeys.same_key(new, old)
    assert server.tags["crimpl:host-key-rotated"] == "true"
    assert [k.get_base64() for k in hostkeys.pinned_keys(server.instanceId)] == [new.get_base64()]


def test_the_connection_negotiates_aes128_gcm_with_openssh(server, serve_instance):
    serve_instance(server.instanceId)
    with server.session() as conn:
        transport = conn.client.get_transport()
        assert (transport.local_cipher, transport.remote_cipher) == (crimpl.ssh.PREFERRED_CIPHER,) * 2
