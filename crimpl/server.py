"""Server objects: an EC2 instance (:class:`AWSEC2`) and this machine (:class:`Local`).

They are thin: they hold identity (an instance id, a config) and hand the work
to :mod:`crimpl.ec2` (control plane), :mod:`crimpl.ssh` and :mod:`crimpl.jobs`
(data plane). Nothing is connected in a constructor; every property that
describes the instance is read live from EC2.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from . import cluster, cost, ec2, hostkeys, pricing, ssh, watchdog
from .config import AWSEC2_Config, InstanceSpec, build_spec, resolve_config, saved_config_names
from .errors import ConfigError, CrimplError, InstanceNotFoundError, InstanceStateError, JobError, SSHError
from .home import crimpl_home
from .stackkeys import parse_duration
from .jobs import JobsMixin, preemption
from .jobs.api import shares_connection
from .log import say, warn


class AWSEC2(JobsMixin):
    """A crimpl-managed EC2 instance.

    Attach to an existing instance by id (``AWSEC2("i-...")``) or by server name
    (``AWSEC2(server_name="...")``, which gives its node of rank 0); launch a new one with :meth:`new`.

    A server may have several nodes (``nnodes``): instances of one name, tagged
    with their rank ``0`` to ``N-1``. The object of rank 0 stands for the whole
    server: its :meth:`start`, :meth:`stop` and :meth:`terminate` act on every
    node. The objects in :attr:`nodes` stand for one node each and act on that one only.

    :param instanceId: the EC2 instance id.
    :param server_name: the ``crimpl:name`` tag to look the instance up by.
    :param config: an :class:`AWSEC2_Config` or saved config name for SSH
        (key, user, ssh config); default: the only saved config.
    :param ec2_client: a boto3 EC2 client to use (default: one from boto3's
        standard configuration, created on first use).
    """

    def __init__(self, instanceId: str | None = None, *, server_name: str | None = None,  # noqa: N803
                 config: AWSEC2_Config | str | None = None, ec2_client: Any = None) -> None:
        if (instanceId is None) == (server_name is None):
            raise ConfigError("give exactly one of instanceId or server_name")
        self._config = config
        self._ec2 = ec2_client
        self._node_only = False
        # Looked up now: an id that does not exist fails here, with a clear message. The name is
        # kept (a server's name never changes), so finding its nodes later is one EC2 call.
        instance = (ec2.describe(self.ec2_client, instanceId) if instanceId is not None
                    else _find_by_name(self.ec2_client, server_name))
        self.instanceId = instance["InstanceId"]
        self._name = ec2.tags_of(instance).get(ec2.NAME_TAG)

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
        if self.__dict__.get("_name") is None:
            self._name = self.tags.get(ec2.NAME_TAG)
        return self._name

    @property
    def rank(self) -> int:
        """This node's rank, ``0`` to ``nnodes - 1`` (its ``crimpl:node-rank`` tag; 0 without one)."""
        return ec2.rank_of(self._describe())

    @property
    def nodes(self) -> list[AWSEC2]:
        """One object per live node of this server, sorted by rank; each acts on its node only."""
        name = self.server_name
        found = ec2.find_nodes(self.ec2_client, name) if name else []
        if not found:  # a server on its way out (or with no name tag): just this instance
            return [self._node_object(self._describe())]
        return [self._node_object(instance) for instance in found]

    @property
    def nnodes(self) -> int:
        """How many live nodes the server has."""
        return len(self.nodes)

    def _node_object(self, instance):
        node = type(self).__new__(type(self))
        node._config, node._ec2, node._node_only = self._config, self.ec2_client, True
        node.instanceId = instance["InstanceId"]
        node._name = ec2.tags_of(instance).get(ec2.NAME_TAG)
        return node

    def _lifecycle_nodes(self):
        """The nodes start/stop/terminate act on: every node for rank 0's object, else this one."""
        instance = self._describe()
        if self._node_only or ec2.rank_of(instance) != 0:
            return [self]
        name = ec2.tags_of(instance).get(ec2.NAME_TAG)
        others = [i for i in ec2.find_nodes(self.ec2_client, name) if ec2.rank_of(i) != 0] if name else []
        return [self, *(self._node_object(i) for i in others)]

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
    def new(cls, config: AWSEC2_Config | str | None = None, nprocs: int | None = None,
            server_name: str | None = None, *, instance_type: str | None = None, wait: bool = True,
            timeout: float = ec2.DEFAULT_TIMEOUT, ssh_cidrs: list[str] | None = None,
            autostop: str | None = None, max_lifetime: str | None = None, autostop_down: bool | None = None,
            nnodes: int | None = None, placement: str | None = None, ec2_client: Any = None) -> AWSEC2:
        """Launch a new server and return it (its node of rank 0).

        :param config: an :class:`AWSEC2_Config`, a saved config name, or None
            for the only saved config.
        :param nprocs: processors wanted; the cheapest type with that many vCPUs
            is chosen unless the config or ``instance_type`` names one.
        :param server_name: unique name (default: generated); a live instance
            with the same name is an error, not a second instance.
        :param ssh_cidrs: networks allowed to SSH when crimpl creates the
            security group (default: the config's, else this machine's address /32).
        :param wait: wait until the instance is running.
        :param autostop: stop the server once it has been idle this long (``"30m"``);
            default: the config's ``autostop`` (unset: never).
        :param max_lifetime: stop it this long after launch however busy it is (``"12h"``);
            default: the config's ``max_lifetime``.
        :param autostop_down: the two above terminate instead of stopping.
        :param nnodes: how many nodes (instances of ranks ``0`` to ``nnodes - 1``); default: the config's (1).
        :param placement: ``"cluster"``: the nodes go in a cluster placement group; default: the config's.
        """
        config = resolve_config(config)
        overrides = {name: value for name, value in (
            ("autostop", autostop), ("max_lifetime", max_lifetime), ("autostop_down", autostop_down),
            ("nnodes", nnodes), ("placement", placement),
        ) if value is not None}
        if overrides:
            config = AWSEC2_Config(**{**config.to_dict(), **overrides})
        spec = build_spec(config, nprocs=nprocs, server_name=server_name,
                          instance_type=instance_type, ssh_cidrs=ssh_cidrs)
        client = ec2_client or ec2.client(config.region)
        existing = ec2.find_instances(client, name=spec.server_name, states=ec2.LIVE_STATES)
        if not existing:
            server, launched = cls._launch(spec, config, client, wait=wait, timeout=timeout)
            if launched:
                return server
            existing = [server.describe()]  # another call launched it at the same moment
        raise InstanceStateError(
            f"a server named {spec.server_name} already exists ({existing[0]['InstanceId']}, "
            f"{ec2.state_of(existing[0])}): attach with crimpl.AWSEC2(server_name="
            f"{spec.server_name!r}) or choose another name",
            existing[0]["InstanceId"], ec2.state_of(existing[0]),
        )

    @classmethod
    def up(cls, spec: InstanceSpec, config: AWSEC2_Config, *, ec2_client: Any = None, wait: bool = True,
           timeout: float = ec2.DEFAULT_TIMEOUT) -> tuple[AWSEC2, bool]:
        """Make sure the server of ``spec`` exists with ``spec.nnodes`` nodes: return ``(server, launched)``.

        Idempotent: when every node of the spec is live, rank 0 is returned
        unchanged (``launched`` False) and nothing is created. A missing node is
        launched (``launched`` True); a node of rank ``spec.nnodes`` or more is
        terminated, highest rank first; both are said. Two calls at the same
        moment (two ``crimpl up``) leave one instance per rank: EC2 launches once
        per client token, and on an endpoint that ignores tokens the re-check
        after launch (:func:`crimpl.ec2.settle`) terminates the extra one.
        """
        client = ec2_client or ec2.client(spec.region or config.region)
        nodes = {ec2.rank_of(i): i for i in ec2.find_nodes(client, spec.server_name)}
        surplus = sorted((rank for rank in nodes if rank >= spec.nnodes), reverse=True)
        if surplus:
            cls._remove_nodes(spec, client, [nodes.pop(rank) for rank in surplus], timeout)
        missing = [rank for rank in range(spec.nnodes) if rank not in nodes]
        if not missing:
            return cls(nodes[0]["InstanceId"], config=config, ec2_client=client), False
        if nodes:
            say(f"{spec.server_name}: {len(nodes)} of {spec.nnodes} nodes are up: launching node(s) "
                f"{', '.join(map(str, missing))}")
        server, launched = cls._launch(spec, config, client, wait=wait, timeout=timeout, ranks=missing)
        if 0 in nodes:
            server = cls(nodes[0]["InstanceId"], config=config, ec2_client=client)
        return server, launched

    @staticmethod
    def _remove_nodes(spec, client, instances, timeout):
        """Terminate the nodes ``instances`` (highest rank first), wait, and forget their host keys."""
        ids = [i["InstanceId"] for i in instances]
        say(f"{spec.server_name}: {spec.nnodes} node(s) wanted: terminating "
            + ", ".join(f"node {ec2.rank_of(i)} ({i['InstanceId']})" for i in instances))
        for instance_id in ids:
            ec2.terminate(client, instance_id)
            cost.record(instance_id, "terminated")
        for instance_id in ids:
            ec2.wait_for_state(client, instance_id, "terminated", timeout=timeout)
            hostkeys.unpin(instance_id)

    @classmethod
    def _launch(cls, spec, config, client, wait, timeout, ranks=None):
        """Launch nodes ``ranks`` of ``spec`` (default: all); return ``(server, launched)`` as :meth:`up`
        does, for the first of ``ranks``."""
        ranks = list(range(spec.nnodes) if ranks is None else ranks)
        cidrs = spec.ssh_cidrs
        if not cidrs and not spec.security_group_id:
            from .caller import caller_cidr

            cidrs = (caller_cidr(),)
        what = f"{len(ranks)} x {spec.instance_type}" if spec.nnodes > 1 else spec.instance_type
        say(f"launching {what} as {spec.server_name}")
        results = ec2.launch_nodes(client, spec, cidrs, ranks)
        for rank, (instance, launched) in zip(ranks, results):
            if launched:
                # Pin the host key before anything can connect: the first connection is already verified.
                hostkeys.pin(instance["InstanceId"], spec.node(rank).host_public_key)
                cost.record(instance["InstanceId"], "launched", name=spec.server_name,
                            instance_type=spec.instance_type, volume_gib=spec.volume_size, spot=spec.spot)
        if wait:
            results = [cls._settled(spec, client, rank, instance, launched, timeout)
                       for rank, (instance, launched) in zip(ranks, results)]
        instance, launched = results[0]
        return cls(instance["InstanceId"], config=config, ec2_client=client), launched

    @staticmethod
    def _settled(spec, client, rank, instance, launched, timeout):
        """Wait until node ``rank`` runs; return ``(instance, launched)`` of the one that stayed."""
        try:
            ec2.wait_for_state(client, instance["InstanceId"], "running", timeout=timeout)
        except InstanceStateError as exc:
            if exc.state != "terminated":
                raise
        # Settle again: a launch in the same second as ours may have been invisible to the first look.
        kept, _ = ec2.settle(client, spec.server_name, rank=rank)
        if kept is None:
            raise InstanceStateError(f"node {rank} of {spec.server_name} was terminated while it started: "
                                     "run up again", instance["InstanceId"], "terminated")
        if kept["InstanceId"] != instance["InstanceId"]:
            ec2.wait_for_state(client, kept["InstanceId"], ("running", "stopped"), timeout=timeout)
            return kept, False
        return instance, launched

    def start(self, wait: bool = True, timeout: float = ec2.DEFAULT_TIMEOUT) -> AWSEC2:
        """Start the instance (waiting until it runs unless ``wait=False``); rank 0's object starts every node.

        :raises InstanceStateError: if it is terminated.
        """
        nodes = self._lifecycle_nodes()
        for node in nodes:
            node._start_one(timeout)
        if wait:
            for node in nodes:
                ec2.wait_for_state(node.ec2_client, node.instanceId, "running", timeout=timeout)
        return self

    def _start_one(self, timeout):
        state = self.state
        if state in ("terminated", "shutting-down"):
            raise InstanceStateError(
                f"{self} is {state} and cannot be started: launch a new one "
                "(crimpl.AWSEC2.new or `crimpl up`)", self.instanceId, state,
            )
        if state == "stopping":
            ec2.wait_for_state(self.ec2_client, self.instanceId, "stopped", timeout=timeout)
        if state not in ("running", "pending"):
            ec2.start(self.ec2_client, self.instanceId)
            cost.record(self.instanceId, "started")

    def stop(self, wait: bool = True, timeout: float = ec2.DEFAULT_TIMEOUT) -> AWSEC2:
        """Stop the instance (its disk is kept; compute billing stops); rank 0's object stops every node.

        :raises InstanceStateError: if it is terminated.
        """
        nodes = self._lifecycle_nodes()
        for node in nodes:
            node._stop_one()
        if wait:
            for node in nodes:
                ec2.wait_for_state(node.ec2_client, node.instanceId, "stopped", timeout=timeout)
        return self

    def _stop_one(self):
        state = self.state
        if state in ("terminated", "shutting-down"):
            raise InstanceStateError(f"{self} is {state}; there is nothing to stop",
                                     self.instanceId, state)
        if state not in ("stopped", "stopping"):
            ec2.stop(self.ec2_client, self.instanceId)
            cost.record(self.instanceId, "stopped")

    def terminate(self, wait: bool = True, timeout: float = ec2.DEFAULT_TIMEOUT) -> AWSEC2:
        """Terminate the instance and everything crimpl created for it; rank 0's object ends every node.

        With ``wait`` (the default) it also deletes the key pair, security group
        and placement group crimpl created for this server once its last instance
        is gone (AWS allows it only then), and forgets the pinned host keys.
        """
        name = self.server_name
        nodes = self._lifecycle_nodes()
        for node in nodes:
            if node.state != "terminated":
                ec2.terminate(node.ec2_client, node.instanceId)
                cost.record(node.instanceId, "terminated")
        if wait:
            for node in nodes:
                ec2.wait_for_state(node.ec2_client, node.instanceId, "terminated", timeout=timeout)
            # A duplicate or another node of the name may still use the groups: the last one removes them.
            if name and not ec2.find_instances(self.ec2_client, name=name):
                ec2.delete_created_resources(self.ec2_client, name)
            for node in nodes:
                hostkeys.unpin(node.instanceId)
        if name:
            preemption.forget(name)  # terminated on purpose: no job of it is relaunched
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
        # AWS is the source of truth: the public host key(s) travel in the instance's tags.
        return hostkeys.trusted_keys(self.instanceId, ec2.tags_of(instance).get(hostkeys.HOST_KEY_TAG))

    def connection(self, start=False):
        """Return an unopened fabric Connection to the instance, with its host key pinned."""
        return self._connection_to(self._running_instance(start))

    def _connection_to(self, instance):
        """An unopened Connection to ``instance`` (its description), its host key pinned."""
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
            raise InstanceStateError(f"{self} is {state}: start it first (`crimpl start`)",
                                     self.instanceId, state)
        say(f"{self} is {state}: starting it")
        self.start()
        return self._describe()

    @shares_connection
    @contextlib.contextmanager
    def session(self, start=True, timeout=None):
        """Yield one open SSH connection, used for every command and transfer in the block.

        :param start: start the instance first if it is stopped (and say so).
        :param timeout: seconds to wait for SSH (default: the config's ``ssh_timeout``).
        """
        # One DescribeInstances gives the state, the address and the host key's tag; it is
        # asked again only by the retries of an instance that is still booting.
        first = [self._running_instance(start)]
        used = []

        def connect():
            used.append(first.pop() if first else self._running_instance(start))
            return self._connection_to(used[-1])

        name = ec2.tags_of(first[0]).get(ec2.NAME_TAG)
        conn = ssh.open_when_ready(connect, timeout=timeout or self.config.ssh_timeout,
                                   label=f"{name} ({self.instanceId})")
        try:
            hostkeys.rotate(conn, self.instanceId, ec2.tags_of(used[-1]),
                            lambda new: ec2.set_tags(self.ec2_client, self.instanceId, new))
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

    # -- one job over every node (crimpl.cluster) -----------------------------------

    def _runs_clusters(self, fresh: bool = False) -> bool:
        """Do jobs here run on several nodes? True for rank 0's object of a server of several nodes.

        EC2 is asked once per object, and again at each submit: status polls reuse the answer,
        and a server of one node pays no SSH command for it.
        """
        if fresh or "_several_nodes" not in self.__dict__:
            self.__dict__["_several_nodes"] = not self._node_only and self.nnodes > 1
        return self.__dict__["_several_nodes"]

    def submit_script(self, script, files=None, **kwargs):
        """Send ``script`` and ``files`` and start them; see :meth:`crimpl.jobs.JobsMixin.submit_script`.

        On a server of several nodes the job runs on every node (:func:`crimpl.cluster.submit_script`,
        which also takes ``nprocs_per_node``).
        """
        if self._runs_clusters(fresh=True):
            return cluster.submit_script(self, script, files, **kwargs)
        return super().submit_script(script, files, **kwargs)

    def resubmit(self, job, files=None, **kwargs):
        """Run a job again in place; see :meth:`crimpl.jobs.JobsMixin.resubmit` (every node's, on several)."""
        if self._runs_clusters(fresh=True):
            return cluster.resubmit(self, job, files, **kwargs)
        return super().resubmit(job, files, **kwargs)

    def _read_statuses(self, conn, names=None) -> dict:
        statuses = super()._read_statuses(conn, names)
        return cluster.read_statuses(conn, self.job_root, statuses) if self._runs_clusters() else statuses

    def _kill(self, conn, name, *args, **kwargs) -> bool:
        killed = cluster.kill(conn, self.job_root, name) if self._runs_clusters() else None
        return super()._kill(conn, name, *args, **kwargs) if killed is None else killed

    def _stream_log(self, conn, name, offset, *args, **kwargs):
        if self._runs_clusters():
            return cluster.stream_log(conn, self.job_root, name, offset=offset)
        return super()._stream_log(conn, name, offset, *args, **kwargs)

    def rank_logs(self, job=None, *, rank: int | None = None, all_ranks: bool = False) -> str:
        """Return a job's log on node ``rank`` (default 0), or every node's, lines prefixed ``[rank R] ``."""
        return cluster.rank_logs(self, job, rank=rank, all_ranks=all_ranks)

    def check_output(self, server_path, local_path=".", *, job=None, quiet: bool = False,
                     rank: int | None = None, all_ranks: bool = False):
        """Copy a job's outputs to ``local_path``; see :meth:`crimpl.jobs.JobsMixin.check_output`.

        :param rank: the node to copy from (default 0).
        :param all_ranks: copy from every node, into ``rank-0/``, ``rank-1/`` ... under ``local_path``;
            the result is then ``{rank: report}``.
        """
        if rank is None and not all_ranks:
            return super().check_output(server_path, local_path, job=job, quiet=quiet)
        return cluster.check_output(self, server_path, local_path, job=job, quiet=quiet, rank=rank,
                                    all_ranks=all_ranks)

    # -- the watchdog on the instance ---------------------------------------------

    def set_autostop(self, autostop: str | None, down: bool = False, *,
                     tick: float = watchdog.DEFAULT_TICK, imds_url: str = watchdog.DEFAULT_IMDS,
                     spot_tick: float = watchdog.DEFAULT_SPOT_TICK) -> str:
        """Install or update the watchdog over SSH: stop the server once idle ``autostop``.

        The lifetime limit set at launch is kept. See :mod:`crimpl.watchdog` for what
        counts as idle and what runs on the server.

        :param autostop: a duration (``"30m"``), or None / ``"off"`` to switch autostop off.
        :param down: terminate instead of stopping (sets the instance's shutdown behaviour).
        :param tick: seconds between two looks of the watchdog.
        :param imds_url: the metadata service a spot server's watchdog asks for a spot notice.
        :param spot_tick: seconds between two of those questions.
        :returns: ``systemd`` (it restarts after every boot) or ``detached`` (a server
            launched before crimpl installed the watchdog: it runs until the next reboot).
        :raises ConfigError: for a duration that is not one.
        """
        seconds = 0 if autostop in (None, "off") else parse_duration("autostop", autostop)
        ec2.set_shutdown_behavior(self.ec2_client, self.instanceId, "terminate" if down else "stop")
        with self.session() as conn:
            how = watchdog.install(conn, self.job_root, seconds, self.shutdown_command, down=down, tick=tick,
                                   spot=self.spot, imds_url=imds_url, spot_tick=spot_tick)
        ec2.set_tags(self.ec2_client, self.instanceId, {watchdog.AUTOSTOP_TAG: watchdog.tag_value(seconds, down)})
        return how

    @property
    def spot(self) -> bool:
        """Is this a spot instance?"""
        return self._describe().get("InstanceLifecycle") == "spot"

    def _relaunch_after_preemption(self, job) -> bool | None | Any:
        """What a look at ``job`` does when this spot server cannot be reached (:mod:`crimpl.jobs.preemption`).

        A preemption stopped it and ``job`` was submitted here with retries: start it again
        (True if it did; EC2 may refuse, since the Spot service itself restarts an interrupted
        instance once it has capacity: then this says so and returns None). Its instance is
        gone: launch new capacity and submit the job there (True), or return the job's final
        status once its retries are spent. Anything else: None.
        """
        try:
            instance = self._describe()
        except CrimplError:  # EC2 unreachable too: the wait counts a failure
            return None
        state = ec2.state_of(instance)
        if instance.get("InstanceLifecycle") != "spot":
            return None
        if state in ("stopping", "stopped") and job.retry_on_preemption:
            try:
                self.start()
            except CrimplError as exc:
                warn(f"{self} was stopped by a spot interruption and could not be started again ({exc}); "
                     "EC2 restarts it when it has capacity: look at the job again then")
                return None
            return True
        # An instance that shut itself down (on_complete, autostop, its lifetime) was not preempted.
        if state in ("shutting-down", "terminated") and \
                instance.get("StateReason", {}).get("Code") != "Client.InstanceInitiatedShutdown":
            return preemption.relaunch(self, job)
        return None

    def relaunch(self, spot: bool = True, timeout: float = ec2.DEFAULT_TIMEOUT) -> AWSEC2:
        """Launch new capacity for this node, its instance being gone; this object then stands for it.

        Same server name, rank, instance type and config, a new host key (pinned before the
        first connection); the server's other nodes are kept as they are.

        :param spot: a spot instance (default), else on-demand.
        :raises InstanceStateError: if the instance is not gone.
        """
        instance = self._describe()
        state = ec2.state_of(instance)
        if state not in ("shutting-down", "terminated"):
            raise InstanceStateError(f"{self} is {state}, not gone: start it instead of launching another",
                                     self.instanceId, state)
        name, rank = ec2.tags_of(instance).get(ec2.NAME_TAG), ec2.rank_of(instance)
        live = ec2.find_nodes(self.ec2_client, name)
        nnodes = max([rank] + [ec2.rank_of(i) for i in live]) + 1
        config = AWSEC2_Config(**{**self.config.to_dict(), "spot": spot, "nnodes": nnodes})
        spec = build_spec(config, server_name=name, instance_type=instance["InstanceType"])
        type(self).up(spec, config, ec2_client=self.ec2_client, timeout=timeout)
        self.instanceId = next(i["InstanceId"] for i in ec2.find_nodes(self.ec2_client, name)
                               if ec2.rank_of(i) == rank)
        return self

    def watchdog_status(self, timeout: float | None = None) -> watchdog.WatchdogStatus | None:
        """Return what the watchdog on the server last reported (None: it never ran there).

        :param timeout: seconds to wait for SSH (default: the config's ``ssh_timeout``).
        :raises InstanceStateError: if the server is not running.
        """
        with self.session(start=False, timeout=timeout) as conn:
            return watchdog.read_status(conn, self.job_root)

    def watchdog_summary(self, timeout: float = 10.0) -> str | None:
        """Return one line on autostop and the lifetime limit, or None when neither was ever set.

        The settings are in the instance's tags; the time left comes from the watchdog over SSH,
        and is said to be unknown when the server cannot be reached within ``timeout`` seconds.
        """
        instance = self._describe()
        tags = ec2.tags_of(instance)
        if watchdog.AUTOSTOP_TAG not in tags and watchdog.LIFETIME_TAG not in tags:
            return None
        setting = ", ".join(f"{name} {tags[tag]}" for name, tag in (
            ("autostop", watchdog.AUTOSTOP_TAG), ("max lifetime", watchdog.LIFETIME_TAG)) if tag in tags)
        if ec2.state_of(instance) != "running":
            return setting
        try:
            status = self.watchdog_status(timeout=timeout)
        except CrimplError as exc:
            return f"{setting} (time left unknown: {exc})"
        return str(status) if status else f"{setting} (the watchdog has not reported yet)"


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
        raise ConfigError("the local target is this machine: crimpl never stops it")

    def terminate(self, wait=True):
        """Refused: crimpl never terminates this machine."""
        raise ConfigError("the local target is this machine: crimpl never terminates it")


# ---------------------------------------------------------------------------
# Every crimpl instance of the account


@dataclass
class InstanceInfo:
    """One row of :func:`list_instances`."""

    instance_id: str
    name: str
    state: str
    instance_type: str
    launch_time: datetime
    public_ip: str | None
    estimated_cost_usd: float | None
    #: the node's rank in its server (0 for a server of one node).
    rank: int = 0
    private_ip: str | None = None


def list_instances(region: str | None = None, ec2_client: Any = None) -> list[InstanceInfo]:
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
            rank=ec2.rank_of(inst), private_ip=inst.get("PrivateIpAddress"),
        ))
    return rows


def terminate_all(confirm: bool = True, region: str | None = None, ec2_client: Any = None,
                  ask: Callable[[str], str] = input) -> list[str]:
    """Terminate every crimpl-managed instance; return the ids terminated.

    :param confirm: ask before terminating (default); False terminates at once.
    :param ask: the prompt function (``input``). No answer (end of input, as
        with no stdin) is not a yes.
    """
    client = ec2_client or ec2.client(region)
    rows = list_instances(ec2_client=client)
    if not rows:
        return []
    if confirm:
        listing = ", ".join(f"{r.instance_id} ({r.name}, {r.state})" for r in rows)
        try:
            answer = ask(f"Terminate {len(rows)} instance(s): {listing}? Type 'yes' to confirm: ")
        except EOFError:
            say("nothing terminated: no answer (no input to read); pass confirm=False to skip the question")
            return []
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


@dataclass
class DestroyReport:
    """What :func:`destroy_server` did."""

    #: every instance that carried the name and was not yet terminated (all are now).
    terminated: list[str] = field(default_factory=list)
    #: the key pair and security group crimpl had created, e.g. ``"key pair crimpl-x"``.
    removed: list[str] = field(default_factory=list)
    #: the instances whose pinned host key was forgotten.
    unpinned: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.terminated or self.removed or self.unpinned)


def destroy_server(server_name: str, *, region: str | None = None, ec2_client: Any = None,
                   timeout: float = ec2.DEFAULT_TIMEOUT) -> DestroyReport:
    """Terminate every instance named ``server_name`` and delete everything crimpl created for it.

    Everything is found by its tags, not by what a local file or a previous run
    remembers: a retry after a failure part-way, or after the instance was
    terminated outside crimpl, still removes the key pair, the security group
    and the host key pins that are left.
    """
    client = ec2_client or ec2.client(region)
    report = DestroyReport()
    known = ec2.find_instances(client, name=server_name, include_terminated=True)
    alive = [i["InstanceId"] for i in known if ec2.state_of(i) != "terminated"]
    ending = [i["InstanceId"] for i in known if ec2.state_of(i) in ec2.LIVE_STATES]
    if ending:
        ec2.terminate(client, *ending)
        for instance_id in ending:
            cost.record(instance_id, "terminated")
    for instance_id in alive:
        ec2.wait_for_state(client, instance_id, "terminated", timeout=timeout)
    report.terminated = alive
    report.removed = ec2.delete_created_resources(client, server_name)
    preemption.forget(server_name)
    for instance in known:
        if hostkeys.pinned_key(instance["InstanceId"]) is not None:
            hostkeys.unpin(instance["InstanceId"])
            report.unpinned.append(instance["InstanceId"])
    return report


def _find_by_name(client, server_name):
    # The server is its node of rank 0 (the first launched of that rank, see ec2.settle), else its
    # lowest live rank; one on its way out only if none other.
    found = ec2.find_nodes(client, server_name)
    found = found or ec2.find_instances(client, name=server_name)
    if not found:
        names = sorted({ec2.tags_of(i).get(ec2.NAME_TAG, "") for i in ec2.find_instances(client)})
        raise InstanceNotFoundError(
            f"no live crimpl server named {server_name!r}; servers: {', '.join(names) or 'none'}"
        )
    return found[0]

