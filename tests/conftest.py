"""Fixtures: a real EC2 endpoint (moto_server), real sshd servers, an isolated CRIMPL_HOME."""

import getpass

import boto3
import pytest

from sandbox import (SSH_CIDRS, MotoServer, Sshd, SSHRoutes, instance_addresses, instance_host_key,
                     make_client_key, start_pinned_sshd)

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


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """One sshd on a loopback port for a test module, with a pinned ed25519 host key."""
    server = start_pinned_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture
def connect(sshd):
    """Return a factory of fresh, unopened fabric Connections to ``sshd`` that verify its host key."""
    from crimpl import hostkeys, ssh

    opened = []

    def make():
        conn = ssh.connection("127.0.0.1", getpass.getuser(), sshd.client_key, "test-sshd",
                              expected_key=hostkeys.key_from_line(sshd.host_public), port=sshd.port)
        opened.append(conn)
        return conn

    yield make
    for conn in opened:
        conn.close()


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


class SSHHost:
    """An SSH host as a user has one: an sshd on loopback, an OpenSSH config that names it
    ``workstation`` (HostName, Port, User, IdentityFile, UserKnownHostsFile) and a known_hosts
    file that holds its key. Nothing here touches the real ``~/.ssh``.
    """

    alias = "workstation"

    def __init__(self, tmp_path, key_file, env=None):
        from crimpl.hostkeys import generate_host_key

        self.dir = tmp_path / "ssh-host"
        self.key_file = key_file
        self.host_private, self.host_public = generate_host_key()
        self.home = self.dir / "home"
        self.sshd = Sshd(self.dir / "sshd", self.host_private, key_file.with_suffix(".pub").read_text(),
                         home=self.home, env=env)
        self.known_hosts = self.dir / "known_hosts"
        self.config = self.dir / "ssh_config"
        self.user = getpass.getuser()
        self.write_config()
        self.trust(self.host_public)

    @property
    def key_name(self):
        """The name OpenSSH files the host's key under in known_hosts."""
        return f"[127.0.0.1]:{self.sshd.port}"

    def trust(self, public_line):
        """Make ``public_line`` the only key known_hosts holds for the host ("": no known_hosts)."""
        if public_line:
            self.known_hosts.write_text(f"{self.key_name} {public_line}\n")
        else:
            self.known_hosts.unlink(missing_ok=True)

    def write_config(self, extra=""):
        closed = SSHRoutes(self.dir / "unused_routes").closed_port
        self.config.write_text(
            f"Host {self.alias}\n  HostName 127.0.0.1\n  Port {self.sshd.port}\n  User {self.user}\n"
            f"{extra}"
            f"Host *\n  HostName 127.0.0.1\n  Port {closed}\n"
            f"  IdentityFile {self.key_file}\n  UserKnownHostsFile {self.known_hosts}\n"
        )


@pytest.fixture
def ssh_host(tmp_path, key_file, monkeypatch):
    """A started :class:`SSHHost`; ``CRIMPL_SSH_CONFIG`` names its OpenSSH config and ``HOME`` is
    a temporary folder, so the user's real ``~/.ssh`` is never read or written."""
    host = SSHHost(tmp_path, key_file)
    monkeypatch.setenv("CRIMPL_SSH_CONFIG", str(host.config))
    monkeypatch.setenv("HOME", str(tmp_path / "user-home"))
    host.sshd.start()
    yield host
    host.sshd.stop()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real one-node Slurm (tests/slurm_cluster.py) for the whole session; it fails, never
    skips, when Slurm is not installed."""
    from slurm_cluster import SlurmCluster

    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


@pytest.fixture
def slurm_host(slurm_cluster, tmp_path, key_file, monkeypatch):
    """The cluster's login node: an :class:`SSHHost` whose sessions see the cluster's ``SLURM_CONF``."""
    host = SSHHost(tmp_path, key_file, env=slurm_cluster.env)
    monkeypatch.setenv("CRIMPL_SSH_CONFIG", str(host.config))
    monkeypatch.setenv("HOME", str(tmp_path / "user-home"))
    host.sshd.start()
    yield host
    host.sshd.stop()
