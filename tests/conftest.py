"""Fixtures: a real EC2 endpoint (moto_server), real sshd servers, an isolated CRIMPL_HOME."""

import getpass
import json
import os
import signal
import sys
import textwrap
import typing

import boto3
import pytest

from sandbox import (SSH_CIDRS, MotoServer, Sshd, SSHRoutes, instance_addresses, instance_host_key,
                     make_client_key, start_pinned_sshd, wait_until)

import crimpl
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


class ClusterNetwork(typing.NamedTuple):
    """A VPC and subnet on moto_server whose instances get loopback private IPs (127.<k>.1.4, ...)."""

    subnet_id: str
    cidr: str  # the subnet's, e.g. 127.101.1.0/24
    vpc_id: str


@pytest.fixture
def cluster_network(ec2):
    """A VPC ``127.<k>.0.0/16`` with a subnet ``127.<k>.1.0/24`` on moto_server: a server launched
    there (``SubnetId``) has nodes whose private IPs are loopback addresses, so a test can run each
    node's sshd on its own private IP. ``k`` is per pytest-xdist worker (gw0 -> 100, gw1 -> 101, ...),
    so two workers, each with its own moto_server, never hand out the same address."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    k = 100 + (int(worker) if worker.isdigit() else 0) % 150
    vpc_id = ec2.create_vpc(CidrBlock=f"127.{k}.0.0/16")["Vpc"]["VpcId"]
    cidr = f"127.{k}.1.0/24"
    subnet_id = ec2.create_subnet(VpcId=vpc_id, CidrBlock=cidr)["Subnet"]["SubnetId"]
    return ClusterNetwork(subnet_id, cidr, vpc_id)


@pytest.fixture
def ec2_config(aws, key_file, login_user, tmp_path):
    """A config whose instances are reached through a test sshd as the local user, jobs under
    ``tmp_path/remote``; saved as the only config, so ``AWSEC2(instance_id)`` and the CLI find it."""
    config = AWSEC2_Config(
        KeyFile=str(key_file), username=login_user, ssh_cidrs=["127.0.0.1/32"],
        remote_dir=str(tmp_path / "remote"), ssh_timeout=20,
        # The private IP survives stop/start in EC2 (and moto); the public one does not.
        use_private_ip=True,
    )
    config.save("test")
    return config


@pytest.fixture
def ec2_sshd(ec2_config, serve_instance):
    """An EC2 instance (moto_server) and the real sshd that serves it."""
    from crimpl import AWSEC2

    server = AWSEC2.new(ec2_config, nprocs=2, server_name="served")
    return server, serve_instance(server.instanceId)


@pytest.fixture
def ec2_server(ec2_sshd):
    """An EC2 instance (moto_server) served by a real sshd (see :func:`ec2_config`)."""
    return ec2_sshd[0]


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


# -- a sandbox instance with its own sshd and home (test_watchdog.py, test_preemption.py) --------


def _recording_shutdown(tmp_path, instance_id, endpoint, status_file):
    """A shutdown command that records the watchdog's status and asks moto to act on the instance."""
    record = tmp_path / "shutdown-record.json"
    script = tmp_path / "fake-shutdown.py"
    script.write_text(textwrap.dedent(f"""
        import json, boto3
        ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url={endpoint!r},
                           aws_access_key_id="testing", aws_secret_access_key="testing")
        behavior = ec2.describe_instance_attribute(
            InstanceId={instance_id!r}, Attribute="instanceInitiatedShutdownBehavior",
        )["InstanceInitiatedShutdownBehavior"]["Value"]
        status = json.loads(open({str(status_file)!r}).read())
        json.dump({{"status_at_call": status, "behavior": behavior}}, open({str(record)!r}, "w"))
        if behavior == "terminate":
            ec2.terminate_instances(InstanceIds=[{instance_id!r}])
        else:
            ec2.stop_instances(InstanceIds=[{instance_id!r}])
    """))
    return f"{sys.executable} {script}", record


class Instance:
    """A sandbox instance: moto's instance, its sshd with its own home, and the watchdog's files."""

    def __init__(self, server, sshd, home, record):
        self.server, self.sshd, self.home, self.record = server, sshd, home, record
        self.folder = home / "crimpl" / "watchdog"

    def status(self):
        try:
            return json.loads((self.folder / "status").read_text())
        except (OSError, ValueError):
            return None

    def state_value(self, name):
        return int((self.folder / "state" / name).read_text())

    def fired(self):
        return json.loads(self.record.read_text()) if self.record.exists() else None

    def looked_past(self, since, seconds, busy=None):
        """Wait until the watchdog looked ``seconds`` after ``since`` (its clock); return that look."""
        def look():
            status = self.status()
            if status and status["checked"] >= since + seconds and (busy is None or status["busy"] == busy):
                return status
            return None
        return wait_until(look, timeout=30, what=f"a look {seconds} s after {since}")

    def watchdog_pid(self):
        try:
            return int((self.folder / "state" / "pid").read_text())
        except (OSError, ValueError):
            return None


@pytest.fixture
def instance(aws, key_file, login_user, ssh_routes, tmp_path):
    """Launch an instance and serve it from an sshd with its own home, as the sandbox does."""
    started = []

    def launch(name="wd", spot=False, **kwargs):
        config = crimpl.AWSEC2_Config(KeyFile=str(key_file), username=login_user, ssh_cidrs=["127.0.0.1/32"],
                                      ssh_timeout=20, use_private_ip=True, spot=spot)
        server = crimpl.AWSEC2.new(config, nprocs=2, server_name=name, **kwargs)
        home = tmp_path / f"home-{name}"
        status = home / "crimpl" / "watchdog" / "status"
        command, record = _recording_shutdown(tmp_path, server.instanceId, aws.url, status)
        server._config = crimpl.AWSEC2_Config(**{**config.to_dict(), "shutdown_command": command})
        server._config.save("test")  # what the crimpl command attaches with
        sshd = Sshd(tmp_path / f"sshd-{name}", instance_host_key(server.instanceId, aws.environ()),
                    key_file.with_suffix(".pub").read_text(), home=home)
        for address in instance_addresses(server.instanceId, aws.environ()):
            ssh_routes.add(address, sshd.port)
        sshd.start()
        inst = Instance(server, sshd, home, record)
        started.append(inst)
        return inst

    yield launch
    for inst in started:
        pid = inst.watchdog_pid()
        # Only the watchdog this test started, by its id (it exits by itself once it fired).
        if pid and inst.folder.exists() and b"watchdog.sh" in _cmdline(pid):
            os.kill(pid, signal.SIGTERM)
        inst.sshd.stop()


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""
