"""Server objects: an EC2 instance (:class:`AWSEC2`) and this machine (:class:`Local`).

They are thin: they hold identity (an instance id, a config) and hand the work
to :mod:`crimpl.ec2` (control plane), :mod:`crimpl.ssh` and :mod:`crimpl.jobs`
(data plane). Nothing is connected in a constructor; every property that
describes the instance is read live from EC2.
"""

import contextlib
from dataclasses import dataclass
from pathlib import Path

from . import ec2, hostkeys, pricing, ssh
from .config import AWSEC2_Config, build_spec, resolve_config, saved_config_names
from .errors import ConfigError, InstanceNotFoundError, InstanceStateError, JobError, SSHError
from .home import crimpl_home
from .jobs import JobsMixin
from .log import say


class AWSEC2(JobsMixin):
    """A crimpl-managed EC2 instance.

    Attach to an existing instance by id (``AWSEC2("i-...")``) or by server name
    (``AWSEC2(server_name="...")``); launch a new one with :meth:`new`.

    :param instanceId: the EC2 instance id.
    :param server_name: the ``crimpl:name`` tag to look the instance up by.
    :param config: an :class:`AWSEC2_Config` or saved config name for SSH
        (key, user, ssh config); default: the only saved config.
    :param ec2_client: a boto3 EC2 client to use (default: one from boto3's
        standard configuration, created on first use).
    """

    def __init__(self, instanceId=None, *, server_name=None, config=None, ec2_client=None):  # noqa: N803
        if (instanceId is None) == (server_name is None):
            raise ConfigError("give exactly one of instanceId or server_name")
        self._config = config
        self._ec2 = ec2_client
        if instanceId is not None:
            self.instanceId = instanceId
            self._describe()  # fail now, with a clear message, for an id that does not exist
        else:
            self.instanceId = _find_by_name(self.ec2_client, server_name)["InstanceId"]

    def __repr__(self):
        return f"<AWSEC2 {self.instanceId}>"

    def __str__(self):
        return f"server {self.instanceId}"

    # -- identity and configuration -------------------------------------------------

    @property
    def config(self):
        """The :class:`AWSEC2_Config` used for SSH, resolved on first use."""
        if not isinstance(self._config, AWSEC2_Config):
            self._config = resolve_config(self._config)
        return self._config

    @property
    def ec2_client(self):
        """The boto3 EC2 client, created on first use."""
        if self._ec2 is None:
            # With no config to take a region from, boto3's own configuration decides.
            no_config = self._config is None and len(saved_config_names()) != 1
            self._ec2 = ec2.client(None if no_config else self.config.region)
        return self._ec2

    def _describe(self):
        return ec2.describe(self.ec2_client, self.instanceId)

    def describe(self):
        """Return EC2's description of the instance, read now."""
        return self._describe()

    @property
    def tags(self):
        """The instance's tags, read now."""
        return ec2.tags_of(self._describe())

    @property
    def server_name(self):
        """The server's name (its ``crimpl:name`` tag)."""
        return self.tags.get(ec2.NAME_TAG)

    @property
    def state(self):
        """The instance state (``pending``, ``running``, ``stopped``, ``terminated`` ...), read now."""
        return ec2.state_of(self._describe())

    @property
    def public_ip(self):
        """The current public IP (it changes across stop/start), or None."""
        return self._describe().get("PublicIpAddress")

    @property
    def private_ip(self):
        """The private IP, or None."""
        return self._describe().get("PrivateIpAddress")

    @property
    def instance_type(self):
        """The instance type, read now."""
        return self._describe()["InstanceType"]

    @property
    def job_root(self):
        """crimpl's folder on the instance, relative to the login home."""
        return self.config.remote_dir

    @property
    def shutdown_command(self):
        """What a job runs for ``on_complete`` (from the config)."""
        return self.config.shutdown_command

    # -- lifecycle ---------------------------------------------------------------

    @classmethod
    def new(cls, config=None, nprocs=None, server_name=None, *, instance_type=None, wait=True,
            timeout=ec2.DEFAULT_TIMEOUT, ssh_cidrs=None, ec2_client=None):
        """Launch a new instance and return it.

        :param config: an :class:`AWSEC2_Config`, a saved config name, or None
            for the only saved config.
        :param nprocs: processors wanted; the cheapest type with that many vCPUs
            is chosen unless the config or ``instance_type`` names one.
        :param server_name: unique name (default: generated); a live instance
            with the same name is an error, not a second instance.
        :param ssh_cidrs: networks allowed to SSH when crimpl creates the
            security group (default: the config's, else this machine's address /32).
        :param wait: wait until the instance is running.
        """
        config = resolve_config(config)
        spec = build_spec(config, nprocs=nprocs, server_name=server_name,
                          instance_type=instance_type, ssh_cidrs=ssh_cidrs)
        client = ec2_client or ec2.client(config.region)
        existing = ec2.find_instances(client, name=spec.server_name)
        if existing:
            raise InstanceStateError(
                f"a server named {spec.server_name} already exists ({existing[0]['InstanceId']}, "
                f"{ec2.state_of(existing[0])}): attach with crimpl.AWSEC2(server_name="
                f"{spec.server_name!r}) or choose another name",
                existing[0]["InstanceId"], ec2.state_of(existing[0]),
            )
        return cls._launch(spec, config, client, wait=wait, timeout=timeout)

    @classmethod
    def up(cls, spec, config, *, ec2_client=None, wait=True, timeout=ec2.DEFAULT_TIMEOUT):
        """Make sure the server of ``spec`` exists: return ``(server, launched)``.

        Idempotent: when a live instance with the spec's name exists, it is
        returned unchanged (``launched`` False) and nothing is created.
        """
        client = ec2_client or ec2.client(spec.region or config.region)
        existing = ec2.find_instances(client, name=spec.server_name)
        if existing:
            return cls(existing[-1]["InstanceId"], config=config, ec2_client=client), False
        return cls._launch(spec, config, client, wait=wait, timeout=timeout), True

    @classmethod
    def _launch(cls, spec, config, client, wait, timeout):
        cidrs = spec.ssh_cidrs
        if not cidrs and not spec.security_group_id:
            from .caller import caller_cidr

            cidrs = (caller_cidr(),)
        say(f"launching {spec.instance_type} as {spec.server_name}")
        instance = ec2.launch(client, spec, cidrs)
        instance_id = instance["InstanceId"]
        # Pin the host key before anything can connect: the first connection is already verified.
        hostkeys.pin(instance_id, spec.host_public_key)
        server = cls(instance_id, config=config, ec2_client=client)
        if wait:
            ec2.wait_for_state(client, instance_id, "running", timeout=timeout)
        return server

    def start(self, wait=True, timeout=ec2.DEFAULT_TIMEOUT):
        """Start the instance (waiting until it runs unless ``wait=False``).

        :raises InstanceStateError: if it is terminated.
        """
        state = self.state
        if state in ("terminated", "shutting-down"):
            raise InstanceStateError(
                f"{self} is {state} and cannot be started: launch a new one "
                "(crimpl.AWSEC2.new or `invoke up`)", self.instanceId, state,
            )
        if state == "stopping":
            ec2.wait_for_state(self.ec2_client, self.instanceId, "stopped", timeout=timeout)
        if state not in ("running", "pending"):
            ec2.start(self.ec2_client, self.instanceId)
        if wait:
            ec2.wait_for_state(self.ec2_client, self.instanceId, "running", timeout=timeout)
        return self

    def stop(self, wait=True, timeout=ec2.DEFAULT_TIMEOUT):
        """Stop the instance (its disk is kept; compute billing stops).

        :raises InstanceStateError: if it is terminated.
        """
        state = self.state
        if state in ("terminated", "shutting-down"):
            raise InstanceStateError(f"{self} is {state}; there is nothing to stop",
                                     self.instanceId, state)
        if state not in ("stopped", "stopping"):
            ec2.stop(self.ec2_client, self.instanceId)
        if wait:
            ec2.wait_for_state(self.ec2_client, self.instanceId, "stopped", timeout=timeout)
        return self

    def terminate(self, wait=True, timeout=ec2.DEFAULT_TIMEOUT):
        """Terminate the instance and everything crimpl created for it.

        With ``wait`` (the default) it also deletes the key pair and security
        group crimpl created for this server, which AWS allows only once the
        instance is gone, and forgets the pinned host key.
        """
        name = self.server_name
        if self.state != "terminated":
            ec2.terminate(self.ec2_client, self.instanceId)
        if wait:
            ec2.wait_for_state(self.ec2_client, self.instanceId, "terminated", timeout=timeout)
            if name:
                ec2.delete_created_resources(self.ec2_client, name)
            hostkeys.unpin(self.instanceId)
        return self

    # -- SSH ---------------------------------------------------------------------

    def _host(self, instance):
        address = instance.get("PrivateIpAddress" if self.config.use_private_ip else "PublicIpAddress")
        if not address:
            raise SSHError(
                f"{self} has no {'private' if self.config.use_private_ip else 'public'} IP: "
                "launch it in a public subnet, or set use_private_ip=True and route through a bastion"
            )
        return address

    def _expected_host_key(self, instance):
        key = hostkeys.pinned_key(self.instanceId)
        if key is None:
            # AWS is the source of truth: the public host key travels in the instance's tags.
            public = ec2.tags_of(instance).get("crimpl:host-key")
            if public:
                hostkeys.pin(self.instanceId, public)
                key = hostkeys.pinned_key(self.instanceId)
        return key

    def connection(self, start=False):
        """Return an unopened fabric Connection to the instance, with its host key pinned."""
        instance = self._running_instance(start)
        config = self.config
        return ssh.connection(
            self._host(instance), config.username, config.KeyFile, self.instanceId,
            ssh_config=config.ssh_config, expected_key=self._expected_host_key(instance),
            accept_new=config.host_key_policy == "accept-new",
        )

    def _running_instance(self, start):
        instance = self._describe()
        state = ec2.state_of(instance)
        if state == "running":
            return instance
        if state in ("terminated", "shutting-down"):
            raise InstanceStateError(f"{self} is {state}: its jobs and files are gone",
                                     self.instanceId, state)
        if not start:
            raise InstanceStateError(f"{self} is {state}: start it first (`invoke start`)",
                                     self.instanceId, state)
        say(f"{self} is {state}: starting it")
        self.start()
        return self._describe()

    @contextlib.contextmanager
    def session(self, start=True):
        """Yield one open SSH connection, used for every command and transfer in the block.

        :param start: start the instance first if it is stopped (and say so).
        """
        conn = ssh.open_when_ready(self.connection(start=start), timeout=self.config.ssh_timeout)
        try:
            yield conn
        finally:
            conn.close()

    def ssh_command(self):
        """Return the OpenSSH argv for an interactive shell on the instance (host key pinned)."""
        instance = self._running_instance(start=False)
        self._expected_host_key(instance)
        config = self.config
        return ssh.interactive_command(self._host(instance), config.username, config.KeyFile,
                                       self.instanceId, ssh_config=config.ssh_config)

    def _prepare_on_complete(self, on_complete):
        # The wrapper only shuts the machine down; this attribute decides stop or terminate.
        ec2.set_shutdown_behavior(self.ec2_client, self.instanceId, on_complete)


class Local(JobsMixin):
    """This machine as a crimpl server: the same job protocol with no AWS and no SSH.

    Jobs live in ``$CRIMPL_HOME/local/jobs`` (or under ``root``). Use it to try
    a script for free before paying for EC2.
    """

    instanceId = "local"
    state = "running"
    shutdown_command = "false"

    def __init__(self, root=None):
        self.root = Path(root).expanduser().resolve() if root else crimpl_home() / "local"

    def __repr__(self):
        return f"<Local {self.root}>"

    def __str__(self):
        return "the local target"

    @property
    def job_root(self):
        """Absolute folder that holds the local jobs."""
        return str(self.root)

    @contextlib.contextmanager
    def session(self, start=True):
        """Yield an invoke Context, which runs commands on this machine."""
        from invoke import Context

        self.root.mkdir(parents=True, exist_ok=True)
        yield Context()

    def _prepare_on_complete(self, on_complete):
        raise JobError("on_complete needs an EC2 server: the local target never shuts this machine down")

    def start(self, wait=True):
        """The local target is always running: nothing to do."""
        return self

    def stop(self, wait=True):
        """Refused: crimpl never stops this machine."""
        raise InstanceStateError("the local target is this machine: crimpl never stops it")

    def terminate(self, wait=True):
        """Refused: crimpl never terminates this machine."""
        raise InstanceStateError("the local target is this machine: crimpl never terminates it")


# ---------------------------------------------------------------------------
# Every crimpl instance of the account


@dataclass
class InstanceInfo:
    """One row of :func:`list_instances`."""

    instance_id: str
    name: str
    state: str
    instance_type: str
    launch_time: object
    public_ip: str
    estimated_cost_usd: float

    def as_dict(self):
        return {**self.__dict__, "launch_time": self.launch_time.isoformat()}


def list_instances(region=None, ec2_client=None):
    """Return every crimpl-managed instance not yet terminated, oldest first.

    ``estimated_cost_usd`` is the table price times the hours since the last
    start (EC2's LaunchTime), for running instances; 0 for stopped ones (their
    disks still cost a little); None for a type the table does not know.
    """
    client = ec2_client or ec2.client(region)
    rows = []
    for inst in ec2.find_instances(client):
        state = ec2.state_of(inst)
        hours = ec2.hours_since(inst["LaunchTime"]) if state in ("running", "pending") else 0.0
        rows.append(InstanceInfo(
            instance_id=inst["InstanceId"], name=ec2.tags_of(inst).get(ec2.NAME_TAG, ""),
            state=state, instance_type=inst["InstanceType"], launch_time=inst["LaunchTime"],
            public_ip=inst.get("PublicIpAddress"),
            estimated_cost_usd=pricing.estimated_cost(inst["InstanceType"], hours),
        ))
    return rows


def terminate_all(confirm=True, region=None, ec2_client=None, ask=input):
    """Terminate every crimpl-managed instance; return the ids terminated.

    :param confirm: ask before terminating (default); False terminates at once.
    :param ask: the prompt function (``input``).
    """
    client = ec2_client or ec2.client(region)
    rows = list_instances(ec2_client=client)
    if not rows:
        return []
    if confirm:
        listing = ", ".join(f"{r.instance_id} ({r.name}, {r.state})" for r in rows)
        answer = ask(f"Terminate {len(rows)} instance(s): {listing}? Type 'yes' to confirm: ")
        if answer.strip().lower() != "yes":
            say("nothing terminated")
            return []
    servers = [AWSEC2(row.instance_id, ec2_client=client) for row in rows]
    # Ask for every termination first, then wait: they proceed in parallel.
    for server in servers:
        server.terminate(wait=False)
    for server in servers:
        server.terminate(wait=True)
    return [r.instance_id for r in rows]


def _find_by_name(client, server_name):
    found = ec2.find_instances(client, name=server_name)
    if not found:
        names = sorted({ec2.tags_of(i).get(ec2.NAME_TAG, "") for i in ec2.find_instances(client)})
        raise InstanceNotFoundError(
            f"no live crimpl server named {server_name!r}; servers: {', '.join(names) or 'none'}"
        )
    return found[-1]

