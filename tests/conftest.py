"""Fixtures: a real EC2 endpoint (moto_server), real sshd servers, an isolated CRIMPL_HOME."""

import getpass

import boto3
import pytest

from sandbox import (SSH_CIDRS, MotoServer, Sshd, SSHRoutes, instance_addresses, instance_host_key,
                     make_client_key)

from crimpl.config import AWSEC2_Config


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    """moto_server in its own process on a free loopback port, for the whole session."""
    server = MotoServer(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def crimpl_home(tmp_path, monkeypatch):
    """Every test gets its own empty $CRIMPL_HOME and no stray AWS or SSH settings."""
    home = tmp_path / "crimpl-home"
    monkeypatch.setenv("CRIMPL_HOME", str(home))
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_EC2", "CRIMPL_SSH_CONFIG", "CRIMPL_STACK",
                 "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    # Never read the developer's real AWS files.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return home


@pytest.fixture
def aws(moto_server, monkeypatch):
    """Point boto3 at moto_server with dummy credentials; moto's state is reset first."""
    moto_server.reset()
    for name, value in moto_server.environ().items():
        monkeypatch.setenv(name, value)
    return moto_server


@pytest.fixture
def ec2(aws):
    """A plain boto3 client on moto_server, to check what crimpl did."""
    return boto3.client("ec2")


@pytest.fixture
def config(key_file):
    """An :class:`AWSEC2_Config` with the test key and SSH open to :data:`SSH_CIDRS` only."""
    return AWSEC2_Config(KeyFile=str(key_file), ssh_cidrs=SSH_CIDRS)


@pytest.fixture
def key_file(tmp_path):
    """An ed25519 login key (mode 0600) with its .pub beside it."""
    return make_client_key(tmp_path)


@pytest.fixture
def ssh_routes(tmp_path, monkeypatch):
    """An OpenSSH config (named by CRIMPL_SSH_CONFIG) that routes instance addresses to loopback."""
    routes = SSHRoutes(tmp_path / "ssh_config")
    monkeypatch.setenv("CRIMPL_SSH_CONFIG", str(routes.path))
    return routes


@pytest.fixture
def serve_instance(aws, key_file, ssh_routes, tmp_path):
    """Start an sshd for an instance, as cloud-init would: with the host key from its user data.

    Call it with an instance id; it returns the running :class:`Sshd`. Pass
    ``start=False`` to route the instance to an sshd that is not up yet.
    """
    started = []

    def serve(instance_id, start=True, host_private_pem=None):
        pem = host_private_pem or instance_host_key(instance_id, aws.environ())
        sshd = Sshd(tmp_path / f"sshd-{instance_id}-{len(started)}", pem,
                    key_file.with_suffix(".pub").read_text())
        for address in instance_addresses(instance_id, aws.environ()):
            ssh_routes.add(address, sshd.port, user=None)
        started.append(sshd)
        if start:
            sshd.start()
        return sshd

    yield serve
    for sshd in started:
        sshd.stop()


@pytest.fixture
def login_user():
    """The local user the test sshd lets in (the instance's login user in tests)."""
    return getpass.getuser()
