"""The invoke tasks, shared by ``invoke`` in a checkout (via ``tasks.py``) and the ``crimpl`` command.

Each task parses its arguments, calls the crimpl API and prints the result. A
:class:`~crimpl.errors.CrimplError` becomes one line on stderr and the exit code
of its kind (:class:`~crimpl.errors.ExitStatus`), without a traceback; nothing
else in crimpl prints errors.

Which server a task acts on: ``--instance-id``, else ``--server`` (a remote
server saved by that name, else a ``crimpl:name``), else ``--stack`` (``local``
for this machine), else ``$CRIMPL_STACK``, else the only ``Pulumi.<stack>.yaml``
in the current folder.
"""

import functools
import importlib.resources
import inspect
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from invoke import Argument, Collection, Context, Exit, ParserContext, Program, Task, task

from . import __version__
from .errors import (AWSError, ConfigError, CrimplError, ExitStatus, InstanceNotFoundError,
                     InstanceStateError, JobError, ScriptFailedError, SSHError, StackError)

SERVER_HELP = {
    "stack": "stack name (Pulumi.<stack>.yaml), or 'local' for this machine",
    "instance-id": "EC2 instance id, instead of a stack",
    "server": "saved SSH or Slurm server, or EC2 server name (crimpl:name tag), instead of a stack",
}

#: The exit status of each kind of error: the first that matches; any other is ERROR.
EXIT_STATUS = (
    (ScriptFailedError, ExitStatus.JOB_FAILED),
    (SSHError, ExitStatus.SSH),
    (ConfigError, ExitStatus.CONFIG),
    (StackError, ExitStatus.CONFIG),
    (AWSError, ExitStatus.AWS),
    (InstanceNotFoundError, ExitStatus.AWS),
    (InstanceStateError, ExitStatus.AWS),
)


def exit_status(exc: CrimplError) -> ExitStatus:
    """Return the exit status the command ends with when ``exc`` stops a task."""
    return next((status for kind, status in EXIT_STATUS if isinstance(exc, kind)), ExitStatus.ERROR)


def command_name(c: Context) -> str:
    """Return the command the user runs the tasks with: ``crimpl``, or ``invoke`` in a checkout.

    Each collection says it in its configuration (``crimpl.command``).
    """
    return c.config.get("crimpl", {}).get("command", "crimpl")


def as_typed(message: str, command: str) -> str:
    """Say the hints in ``message`` with the command the user runs.

    Hints name crimpl's tasks as `` `crimpl TASK ...` `` wherever they are
    written (the library does not know how it was called); in a checkout that
    command is ``invoke``.
    """
    return message.replace("`crimpl ", f"`{command} ")


def reports_errors(body: Callable) -> Callable:
    """Turn a CrimplError raised by a task into a one-line message and the exit status of its kind."""

    @functools.wraps(body)
    def wrapper(c, *args, **kwargs):
        try:
            return body(c, *args, **kwargs)
        except CrimplError as exc:
            message = as_typed(f"crimpl: error: {exc}", command_name(c))
            raise Exit(message, code=exit_status(exc)) from None
        except KeyboardInterrupt:
            raise Exit("crimpl: interrupted", code=ExitStatus.INTERRUPTED) from None

    return wrapper


class CrimplTask(Task):
    """A task whose option help survives being parsed more than once."""

    def get_arguments(self, ignore_unknown_help: bool | None = None) -> list[Argument]:
        # invoke's Task.get_arguments pops each help string from self.help, so a
        # second parse in the same process (a test, or the crimpl command's own
        # look at the options) would show no help at all.
        help_ = dict(self.help)
        try:
            return super().get_arguments(ignore_unknown_help)
        finally:
            self.help = help_


def crimpl_task(*args, **kwargs):
    """``@task`` that reports crimpl errors as one line and documents the server options."""
    extra_help = kwargs.pop("help", {})

    def decorate(body):
        params = {name.replace("_", "-") for name in inspect.signature(body).parameters}
        help_ = {k: v for k, v in SERVER_HELP.items() if k in params}
        return task(help={**help_, **extra_help}, klass=CrimplTask, **kwargs)(reports_errors(body))

    return decorate(args[0]) if args and callable(args[0]) else decorate


def _stack_settings(stack):
    from . import stack as stacks

    return stacks.read_stack(stacks.select_stack(stack))


def _config_for(settings):
    from .config import config_from_stack

    config, _nprocs, _name = config_from_stack(settings.values, source=str(settings.path))
    return config


def resolve_server(stack=None, instance_id=None, server=None, *, look=False):
    """Return the server a task acts on (see the module docstring for the order).

    :param look: the task looks at jobs (``jobs``, ``logs``, ``status``): a spot server a
        preemption took, with a job submitted there with retries, is relaunched and the job
        sent to it first (:mod:`crimpl.jobs.preemption`), as a look from Python does.
    """
    from .server import AWSEC2, Local

    if instance_id:
        return AWSEC2(instance_id)
    if server:
        from .sshhost import list_servers, load_server

        # A remote server saved under the name wins; an EC2 server's name is looked up in AWS.
        if server in list_servers():
            return load_server(server)
        try:
            return AWSEC2(server_name=server)
        except InstanceNotFoundError:
            relaunched = _relaunched(server, None) if look else None
            if relaunched is None:
                raise
            return relaunched
    if (stack or os.environ.get("CRIMPL_STACK")) == "local":
        return Local()
    settings = _stack_settings(stack)
    try:
        return AWSEC2(server_name=settings.server_name, config=_config_for(settings))
    except InstanceNotFoundError as exc:
        relaunched = _relaunched(settings.server_name, _config_for(settings)) if look else None
        if relaunched is not None:
            return relaunched
        raise InstanceNotFoundError(
            f"stack {settings.name} has no live server ({exc}); run `crimpl up --stack {settings.name}`"
        ) from exc


def _relaunched(server_name, config):
    """The server ``server_name`` on new capacity, its job sent there, if a preemption took its
    instance under a job submitted with retries; else None."""
    from .jobs import Job, preemption

    found = preemption.gone_server(server_name, config)
    if found is None:
        return None
    gone, job_name = found
    outcome = gone._relaunch_after_preemption(Job(gone, job_name))
    if outcome is True:
        return gone  # it stands for the new instance now
    if outcome is not None:
        raise JobError(f"job {job_name} {outcome}, and its server {server_name} is gone: submit it anew")
    return None


def _server_args(stack=None, instance_id=None, server=None):
    """The options that chose the server, as a hint repeats them (empty if none was given)."""
    chosen = {"--instance-id": instance_id, "--server": server, "--stack": stack}
    return "".join(f" {flag} {value}" for flag, value in chosen.items() if value)


# -- provisioning ----------------------------------------------------------------


@crimpl_task(help={"provisioner": "pulumi (default) or boto3"})
def up(c, stack=None, provisioner=None):
    """Create the stack's server; a no-op if it exists (pulumi up)."""
    settings = _stack_settings(stack)
    provisioner = _provisioner(provisioner)
    if provisioner == "pulumi":
        from . import stack as stacks

        stacks.up(settings, on_output=print)
        return
    from . import stack as stacks
    from .server import AWSEC2

    spec = stacks.spec_for_stack(settings)
    server, launched = AWSEC2.up(spec, _config_for(settings))
    verb = "launched" if launched else "already up, unchanged:"
    print(f"{settings.name}: {verb} {server.instanceId} ({server.instance_type}, {server.state}, "
          f"{server.public_ip})")
    nodes = server.nodes
    if len(nodes) > 1:
        for node in nodes:
            print(f"{settings.name}: node {node.rank} {node.instanceId} ({node.state}, {node.private_ip})")


@crimpl_task(help={"provisioner": "pulumi (default) or boto3"})
def preview(c, stack=None, provisioner=None):
    """Show what `up` would change (pulumi preview)."""
    settings = _stack_settings(stack)
    if _provisioner(provisioner) == "pulumi":
        from . import stack as stacks

        stacks.preview(settings, on_output=print)
        return
    from . import stack as stacks
    from .ec2 import client, find_instances, find_nodes, rank_of

    spec = stacks.spec_for_stack(settings)
    found = find_instances(client(spec.region), name=spec.server_name)
    ranks = sorted({rank_of(i) for i in find_nodes(client(spec.region), spec.server_name)})
    missing = [r for r in range(spec.nnodes) if r not in ranks]
    surplus = [r for r in reversed(ranks) if r >= spec.nnodes]
    if len(found) > len({rank_of(i) for i in found}):
        print(f"{settings.name}: {len(found)} instances carry the name {spec.server_name} "
              f"({', '.join(i['InstanceId'] for i in found)}); `destroy` ends all of them")
    elif found and not missing and not surplus:
        print(f"{settings.name}: {', '.join(i['InstanceId'] for i in found)} exist(s); up would change nothing")
    else:
        if missing:
            print(f"{settings.name}: up would launch {spec.instance_type} named {spec.server_name}"
                  + (f" as node(s) {', '.join(map(str, missing))}" if spec.nnodes > 1 else ""))
        if surplus:
            print(f"{settings.name}: up would terminate node(s) {', '.join(map(str, surplus))}")


@crimpl_task(help={"provisioner": "pulumi (default) or boto3", "yes": "do not ask for confirmation"})
def destroy(c, stack=None, provisioner=None, yes=False):
    """Delete the stack's server and everything crimpl created for it."""
    settings = _stack_settings(stack)
    provisioner = _provisioner(provisioner)
    if provisioner == "pulumi":
        from . import stack as stacks

        stacks.pulumi_cli()  # say the CLI is missing before asking anything
    _confirm(yes, f"Destroy the server of stack {settings.name} ({settings.server_name}) and its disk?")
    if provisioner == "pulumi":
        stacks.destroy(settings, on_output=print)
        return
    from .server import destroy_server

    name = settings.server_name
    report = destroy_server(name, region=_config_for(settings).region)
    if not report:
        print(f"{settings.name}: nothing to destroy (no instance, key pair or security group named {name})")
        return
    if len(report.terminated) > 1:
        print(f"{settings.name}: {len(report.terminated)} instances carried the name {name}; "
              f"terminated all of them: {', '.join(report.terminated)}")
    elif report.terminated:
        print(f"{settings.name}: terminated {report.terminated[0]}")
    else:
        print(f"{settings.name}: no instance of {name} was left")
    if report.removed:
        print(f"{settings.name}: removed {', '.join(report.removed)}")
    if report.unpinned:
        print(f"{settings.name}: forgot the host key of {', '.join(report.unpinned)}")


@crimpl_task
def refresh(c, stack=None):
    """Update Pulumi's state from what really exists (pulumi refresh)."""
    from . import stack as stacks

    stacks.refresh(_stack_settings(stack), on_output=print)


def _provisioner(value):
    value = value or os.environ.get("CRIMPL_PROVISIONER") or "pulumi"
    if value not in ("pulumi", "boto3"):
        raise StackError(f"--provisioner must be pulumi or boto3, got {value!r}")
    return value


def _confirm(yes, question):
    if yes:
        return
    try:
        answer = input(f"{question} Type 'yes' to confirm: ")
    except EOFError:
        answer = ""
    if answer.strip().lower() != "yes":
        raise Exit("crimpl: not confirmed; nothing changed (pass --yes to skip the question)",
                   code=ExitStatus.ERROR)


# -- lifecycle -------------------------------------------------------------------


@crimpl_task
def start(c, stack=None, instance_id=None, server=None):
    """Start the server (all its nodes) and wait until it runs."""
    target = resolve_server(stack, instance_id, server).start()
    for node in _acted_on(target):
        print(f"{node.instanceId}: {node.state} at {node.public_ip}")


@crimpl_task
def stop(c, stack=None, instance_id=None, server=None):
    """Stop the server, all nodes (disks kept; compute billing stops)."""
    target = resolve_server(stack, instance_id, server).stop()
    for node in _acted_on(target):
        print(f"{node.instanceId}: {node.state}")


def _acted_on(target):
    """What start/stop/terminate of ``target`` act on: every node of a server for its rank 0, else it."""
    from .server import AWSEC2

    if not isinstance(target, AWSEC2) or target.rank != 0:
        return [target]
    return target.nodes


@crimpl_task(help={"yes": "do not ask for confirmation"})
def terminate(c, stack=None, instance_id=None, server=None, yes=False):
    """Terminate the server, all nodes: instances and disks deleted."""
    from .server import AWSEC2

    target = resolve_server(stack, instance_id, server)
    if not isinstance(target, AWSEC2):
        target.terminate()  # a server crimpl does not manage: refused in one line, before any question
    ids = [node.instanceId for node in _acted_on(target)]
    _confirm(yes, f"Terminate {', '.join(ids)} and delete {'their disks' if len(ids) > 1 else 'its disk'}?")
    target.terminate()
    for instance_id in ids:
        print(f"{instance_id}: terminated")


@crimpl_task
def status(c, stack=None, instance_id=None, server=None):
    """Show the server's name, id, state, type and IP (no SSH needed)."""
    target = resolve_server(stack, instance_id, server, look=True)
    if target.instanceId is None:  # a remote server crimpl does not manage: only its jobs to show
        print(f"{server}: {target.host}, jobs in {target.job_root}; latest job: {target.job_status}")
        return
    if target.instanceId == "local":
        print(f"local: jobs in {target.job_root}; latest job: {target.job_status}")
        return
    from .ec2 import find_instances, rank_of, state_of

    info = target.describe()
    name = target.server_name
    # Every instance that carries the name: more than one per node means a duplicate is billing.
    same_name = find_instances(target.ec2_client, name=name) if name else []
    shown = same_name if target.instanceId in {i["InstanceId"] for i in same_name} else [info, *same_name]
    nodes = len({rank_of(i) for i in shown})
    if len(shown) > nodes:
        print(f"{len(shown)} instances carry the name {name} (there should be one per node; "
              "`crimpl destroy` ends all of them, `crimpl terminate --instance-id ID` one):")
    if nodes > 1:
        print(f"{name}: {nodes} nodes")
    for instance in sorted(shown, key=rank_of):
        node = f"node {rank_of(instance)}  " if nodes > 1 else ""
        private = f"  {instance.get('PrivateIpAddress') or '-'}" if nodes > 1 else ""
        print(f"{name or '-'}  {node}{instance['InstanceId']}  {state_of(instance)}  {instance['InstanceType']}  "
              f"{instance.get('PublicIpAddress') or '-'}{private}")
    from .cost import costs_so_far

    spent = costs_so_far(ec2_client=target.ec2_client).get(target.instanceId)
    if spent:
        print(spent)
    watchdog = target.watchdog_summary()
    if watchdog:
        print(watchdog)


@crimpl_task(help={"days": "how far back to look (default 90)"})
def cost(c, days=90):
    """Estimate what each server has cost (terminated ones too)."""
    from .cost import cost_report

    report = cost_report(days=int(days))
    if not report.servers:
        print(f"no crimpl servers in the last {days} days")
    for row in report.servers:
        compute = "?" if row.compute_usd is None else f"${row.compute_usd:.2f}"
        storage = "?" if row.storage_usd is None else f"${row.storage_usd:.2f}"
        print(f"{row.name or '-'}  {row.instance_id}  {row.state}  {row.instance_type}{' spot' if row.spot else ''}  "
              f"{row.running_hours:.1f} h {compute} + {row.volume_gib or '?'} GiB x {row.volume_months:.2f} months "
              f"{storage} = ${row.total_usd:.2f}  (from {row.how})")
    print(f"total ${report.total_usd:.2f}: an estimate, not a bill (prices of {report.prices_as_of}, "
          f"{report.prices_region} on-demand; spot from EC2's price history)")
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)


@crimpl_task(help={"refresh": "download AWS's public price file for EC2 and use its prices",
                   "region": "the region whose prices --refresh downloads (default us-east-1)"})
def prices(c, refresh=False, region=None):
    """Show the price table's date; --refresh downloads AWS's."""
    from . import pricing

    table = pricing.refresh(region or pricing.PRICES_REGION) if refresh else pricing.price_table()
    print(f"prices of {table.as_of}, {table.region} on-demand, {len(table.usd_per_hour)} instance types, "
          f"gp3 ${table.gp3_usd_per_gib_month:g}/GiB-month (from {table.source})")


@crimpl_task(help={"duration": "idle time before the server stops (30m, 2h) or off",
                   "down": "terminate the server instead of stopping it"})
def autostop(c, duration, down=False, stack=None, instance_id=None, server=None):
    """Stop the server once idle for DURATION (--down: terminate; off)."""
    target = resolve_server(stack, instance_id, server)
    if target.instanceId in (None, "local"):
        raise ConfigError("autostop needs an EC2 server: it shuts the server down from inside")
    with target.connected():  # one SSH connection to install the watchdog and read it back
        how = target.set_autostop(duration, down=down)
        print(f"{target.instanceId}: {target.watchdog_summary() or 'autostop ' + duration}")
    if how == "detached":
        print(f"{target.instanceId}: launched before crimpl installed the watchdog: it runs until the next "
              "reboot; `crimpl autostop` again after a start", file=sys.stderr)


@crimpl_task(name="list")
def list_(c):
    """List EC2 servers with estimated cost, and saved remote servers."""
    from .server import list_instances
    from .sshhost import list_servers, load_server

    names = list_servers()
    if names:
        print(f"{'SAVED SERVER':24} {'KIND':6} HOST:DIRECTORY")
    for name in names:
        try:
            saved = load_server(name)
        except ConfigError as exc:
            print(f"{name:24} unreadable: {exc}")
            continue
        print(f"{name:24} {saved.kind:6} {saved.host}:{saved.directory}")
    rows = list_instances()
    if not rows:
        print("no crimpl servers (nothing is billing)")
        return
    from .cost import costs_so_far

    so_far = costs_so_far()
    # A node of a server of several is shown as NAME/RANK.
    clusters = {r.name for r in rows if r.rank > 0}
    print(f"{'ID':21} {'NAME[/NODE]':24} {'STATE':10} {'TYPE':12} {'IP':16} {'PRIVATE IP':16} {'LAUNCHED':20} "
          "COST SO FAR")
    for r in rows:
        cost = so_far[r.instance_id].so_far if r.instance_id in so_far else "?"
        name = f"{r.name}/{r.rank}" if r.name in clusters else r.name
        print(f"{r.instance_id:21} {name:24} {r.state:10} {r.instance_type:12} "
              f"{r.public_ip or '-':16} {r.private_ip or '-':16} {r.launch_time:%Y-%m-%d %H:%M:%S}  {cost}")
    nodes = [(r.name, r.rank) for r in rows if r.name]
    for name, rank in sorted({n for n in nodes if nodes.count(n) > 1}):
        ids = [r.instance_id for r in rows if (r.name, r.rank) == (name, rank)]
        which = f"node {rank} of " if name in clusters else ""
        print(f"warning: {len(ids)} instances carry {which}the name {name} ({', '.join(ids)}); there should be one: "
              "`crimpl destroy` ends all of them, `crimpl terminate --instance-id ID` one")


# -- jobs ------------------------------------------------------------------------


@crimpl_task(iterable=["files"], help={
    "script": "the shell script to run",
    "files": "file or directory to send beside the script (repeat -f)",
    "on-complete": "stop or terminate the server when the script ends",
    "name": "job name (default: time and script name)",
    "allow-concurrent": "start even if another job is running",
    "quiet": "no progress bars",
    "retry-on-preemption": "start the job again up to N times when a spot preemption ends it",
    "fallback-on-demand": "when a preempted spot server is gone, retry on on-demand capacity (not spot)",
    "array": "run the script once per index, in Slurm's syntax: 0-99, 1,3,5-7, 0-99%10 (at most 10 at a time)",
    "max-parallel": "at most N tasks of the array at a time (default: the %N of --array, else the CPU count)",
    "nprocs": "Slurm only: tasks of the job (sbatch --ntasks)",
    "walltime": "Slurm only: time limit of the job (sbatch --time), e.g. 2:00:00",
})
def submit(c, script, files=None, on_complete=None, name=None, allow_concurrent=False, quiet=False,
           stack=None, instance_id=None, server=None, retry_on_preemption=0, fallback_on_demand=False,
           array=None, max_parallel=None, nprocs=None, walltime=None):
    """Send SCRIPT and its files to the server and start it detached."""
    target = resolve_server(stack, instance_id, server)
    options = {**_scheduler_options(target, _whole(nprocs, "--nprocs"), walltime),
               **({"array": array} if array is not None else {}),
               **({"max_parallel": _whole(max_parallel, "--max-parallel")} if max_parallel is not None else {})}
    job = target.submit_script(script, files=files or None, job_name=name, on_complete=on_complete, quiet=quiet,
                               # Only where asked: a scheduler's kind (Slurm) runs jobs side by side
                               # by default (allow_concurrent=True), and has no spot notice.
                               **({"allow_concurrent": True} if allow_concurrent else {}),
                               **({"retry_on_preemption": retry_on_preemption} if retry_on_preemption else {}),
                               **({"fallback_on_demand": True} if fallback_on_demand else {}), **options)
    # What the server says: the start's own answer, else a look now (a job a scheduler queued is
    # pending, not running; an array says how many tasks it has).
    now = job.start_status or job.status()
    index = f" --index {min(now.tasks)}" if now.tasks else ""
    follow = f"{command_name(c)} logs --job {job.job_name}{index} --follow{_server_args(stack, instance_id, server)}"
    array_of = f" (an array of {len(now.tasks)} tasks)" if now.tasks else ""
    print(f"submitted {job.job_name}{array_of}: {now.state} (`{follow}`)")


def _whole(value, flag):
    """A whole-number option (``--index``, ``--nprocs``, ...) as a number; None when not given."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise JobError(f"{flag} takes a whole number, got {value!r}") from None


def _scheduler_options(target, nprocs, walltime):
    """``--nprocs`` and ``--walltime`` for a Slurm server; an error on a server without a scheduler."""
    from .slurm import RemoteSlurmServer

    options = {k: v for k, v in (("nprocs", nprocs), ("walltime", walltime)) if v is not None}
    if options and not isinstance(target, RemoteSlurmServer):
        flags = " and ".join(f"--{k}" for k in options)
        raise JobError(f"{flags} {'go' if len(options) > 1 else 'goes'} to Slurm's sbatch; {target} has "
                       "no scheduler: a job there has the "
                       "whole server and no time limit (bound it in the script, e.g. `timeout 2h ./run`)")
    return options


@crimpl_task
def jobs(c, stack=None, instance_id=None, server=None):
    """List the server's jobs and their states."""
    statuses = resolve_server(stack, instance_id, server, look=True).job_statuses()
    if not statuses:
        print("no jobs")
    for name, job_status in statuses.items():
        print(f"{name:40} {job_status}  started {job_status.started or '-'}  ended {job_status.ended or '-'}")


@crimpl_task(help={"job": "job name (default: the latest); `crimpl logs NAME` works too",
                   "follow": "stream until the job ends; exit 5 unless it completed",
                   "rank": "on a server of several nodes: this node's log (default: rank 0's)",
                   "all-ranks": "on a server of several nodes: every node's log, lines prefixed [rank R]",
                   "index": "of an array job: the log of this task"})
def logs(c, job=None, follow=False, rank=None, all_ranks=False, stack=None, instance_id=None, server=None,
         index=None):
    """Print a job's output (stdout and stderr)."""
    target = resolve_server(stack, instance_id, server, look=True)
    with target.connected():  # one SSH connection for the lookup, the log and the final state
        found = target.get_job(job)
        if rank is not None or all_ranks:
            if follow:
                raise JobError("--follow follows rank 0's log: leave out --rank and --all-ranks to follow")
            sys.stdout.write(_ranks_of(target).rank_logs(found, rank=_rank(rank), all_ranks=all_ranks))
            return
        index = _whole(index, "--index")
        if not follow:
            sys.stdout.write(found.logs(index=index))
            return
        found.logs(follow=True, stream=sys.stdout, index=index)
        # The follow of one task ends with that task; of a job, the job may still write its end.
        final = found.wait(interval=1.0) if index is None else found.status().tasks[index]
    if final.state != "complete":
        raise Exit(f"crimpl: {found.job_name} {final}", code=ExitStatus.JOB_FAILED)
    print(f"crimpl: {found.job_name} {final}", file=sys.stderr)


@crimpl_task(help={"job": "job name (default: the latest); `crimpl kill NAME` works too",
                   "index": "of an array job: end only this task (one that waits never starts)"})
def kill(c, job=None, stack=None, instance_id=None, server=None, index=None):
    """End a running job and everything it started."""
    target = resolve_server(stack, instance_id, server)
    with target.connected():  # one SSH connection for the lookup, the kill and the state
        found = target.get_job(job)
        index = _whole(index, "--index")
        what = found.job_name if index is None else f"{found.job_name} task {index}"
        if found.kill(index=index):
            print(f"{what}: killed")
        else:
            now = found.status()
            print(f"{what}: not running ({now if index is None else now.tasks[index]})")


@crimpl_task(help={"older-than": "remove jobs that ended at least this many days ago (default 7)",
                   "dry-run": "list what would be removed, remove nothing"})
def clean(c, older_than=7, dry_run=False, stack=None, instance_id=None, server=None):
    """Remove old finished jobs and the stored inputs no job uses."""
    report = resolve_server(stack, instance_id, server).clean(older_than, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for name in report.jobs:
        print(f"{verb} job {name}")
    print(f"{verb} {len(report.jobs)} job(s) and {len(report.objects)} stored input(s), "
          f"{report.bytes / 2**20:.1f} MiB")


@crimpl_task(iterable=["also"], help={
    "path": "file, directory or glob in the job directory (a trailing / means its contents)",
    "also": "one more path (repeat); `crimpl fetch A B C` takes them as words too",
    "dest": "local directory to fetch into, created if missing (default: the current folder)",
    "job": "job name (default: the latest)",
    "quiet": "no progress bars",
    "rank": "on a server of several nodes: fetch from this node (default: rank 0)",
    "all-ranks": "on a server of several nodes: fetch from every node, into DEST/rank-0/, DEST/rank-1/ ...",
})
def fetch(c, path, also=None, dest=".", job=None, quiet=False, rank=None, all_ranks=False, stack=None,
          instance_id=None, server=None):
    """Copy a job's outputs into a local directory, whole files only."""
    folder = dest.rstrip("/") + "/"  # a trailing / makes the destination a directory, always
    target = resolve_server(stack, instance_id, server)
    if rank is not None or all_ranks:
        reports = _ranks_of(target).check_output([path, *(also or [])], folder, job=job, quiet=quiet,
                                                 rank=_rank(rank), all_ranks=all_ranks)
        for node, report in (reports.items() if all_ranks else [(rank, reports)]):
            where = f"{folder}rank-{node}/" if all_ranks else folder
            print(f"fetched {len(report.files)} file(s) of rank {node} into {where}")
        return
    report = target.check_output([path, *(also or [])], folder, job=job, quiet=quiet)
    for replaced in report.replaced:
        print(f"replaced {replaced} (its content differed)", file=sys.stderr)
    print(f"fetched {len(report.files)} file(s) into {folder}")


def _ranks_of(target):
    """``target`` if its jobs can run on several nodes (an EC2 server), else the error to say so."""
    if not hasattr(target, "rank_logs"):
        raise JobError(f"--rank and --all-ranks are for EC2 servers of several nodes, not {target}")
    return target


def _rank(value):
    """The ``--rank`` option as a number (None when not given)."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise JobError(f"--rank takes a node's rank (0, 1, ...), got {value!r}") from None


@crimpl_task
def ssh(c, stack=None, instance_id=None, server=None):
    """Open an interactive shell on the server (host key pinned)."""
    target = resolve_server(stack, instance_id, server)
    if target.instanceId == "local":
        argv = [os.environ.get("SHELL", "/bin/sh")]
    else:
        argv = target.ssh_command()
    code = subprocess.call(argv)
    if code:
        raise Exit(code=code)


# -- a new stack -------------------------------------------------------------------

#: Login keys ``init`` looks for, in this order; the first with its .pub beside it is used.
KEY_FILES = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")


@crimpl_task(help={"stack": "name of the new stack (default: dev); `crimpl init NAME` works too"})
def init(c, stack="dev"):
    """Write Pulumi.<stack>.yaml here, with your AWS region and SSH key."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", stack) or stack in ("example", "local"):
        raise ConfigError(f"{stack!r} cannot name a stack: use letters, digits, -, _ and ., "
                          "not 'example' or 'local'")
    target = Path(f"Pulumi.{stack}.yaml")
    region = _default_region()
    key = next((k for k in KEY_FILES if Path(k + ".pub").expanduser().is_file()), None)
    text = importlib.resources.files(__package__).joinpath("Pulumi.example.yaml").read_text("utf-8")
    text = _set_value(text, "aws:region", region)
    if key:
        text = _set_value(text, "crimpl:keyFile", key)
    try:
        # 0600 like every file crimpl writes: crimpl up adds the (encrypted) host key to it.
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{target} exists: crimpl never overwrites it; edit it, or pick another "
                          f"stack name (`crimpl init --stack NAME`)") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
    except BaseException:
        target.unlink()  # nothing half-written
        raise
    print(f"wrote {target}: region {region}, key {key or 'none found'}")
    if not key:
        print("no SSH key with its .pub in ~/.ssh: create one with "
              "`ssh-keygen -t ed25519 -f ~/.ssh/id_ed25519`", file=sys.stderr)
    print(f"next: `{command_name(c)} up --stack {stack}`")


def _default_region():
    """The region crimpl.ec2 would use (AWS_REGION, else boto3's configured one), else us-east-1."""
    import boto3
    import botocore.exceptions

    try:
        return os.environ.get("AWS_REGION") or boto3.session.Session().region_name or "us-east-1"
    except botocore.exceptions.ProfileNotFound as exc:
        raise AWSError(f"{exc}: fix AWS_PROFILE or run `aws configure --profile NAME`") from exc


def _set_value(text, key, value):
    """Set the value of the template's one line ``  key: value``, keeping its comments."""
    text, count = re.subn(rf"^(\s*{re.escape(key)}:) .*$", lambda m: f"{m.group(1)} {value}", text,
                          count=1, flags=re.MULTILINE)
    if not count:
        raise ConfigError(f"the packaged Pulumi.example.yaml has no {key} line: reinstall crimpl")
    return text


ns = Collection(init, up, preview, destroy, refresh, start, stop, terminate, status, autostop, cost, prices,
                list_, submit, jobs, logs, kill, clean, fetch, ssh)
ns.configure({"crimpl": {"command": "crimpl"}})

#: The option that takes the words after a task's positional arguments, for the
#: ``crimpl`` command: ``crimpl logs NAME`` is ``crimpl logs --job NAME``.
BARE_WORDS = {"init": "stack", "logs": "job", "kill": "job", "fetch": "also"}
#: Options of the ``crimpl`` command itself, shown by ``crimpl --help``.
SHOWN_OPTIONS = ("help", "version", "list", "print-completion-script")


class CrimplProgram(Program):
    """The ``crimpl`` command: crimpl's tasks and options, none of invoke's own.

    invoke's parser requires every positional argument, so an optional one
    (``crimpl logs [JOB]``, ``crimpl init [STACK]``) or several paths
    (``crimpl fetch PATH ...``) are handed to their option (:data:`BARE_WORDS`)
    before invoke parses.
    """

    def core_args(self) -> list[Argument]:
        """crimpl's options; invoke's run/sudo/config options mean nothing here and are left out."""
        # Program reads these itself while parsing; they are accepted but not shown.
        internal = [a for a in super().core_args()
                    if a.name in ("complete", "debug", "write-pyc", "list-format", "list-depth")]
        return [
            Argument(names=("help", "h"), optional=True,
                     help="show this help, or a task's options (crimpl --help TASK)"),
            Argument(names=("version", "V"), kind=bool, default=False, help="show crimpl's version"),
            Argument(names=("list", "l"), optional=True, help="list the tasks"),
            Argument(names=("print-completion-script",), default="",
                     help="print the tab-completion script for bash, zsh or fish"),
            *internal,
        ]

    def update_config(self, merge: bool = True) -> None:
        """Merge the configuration; crimpl offers none of the run/sudo/timeout options invoke would apply."""
        if merge:
            self.config.merge()

    def parse_tasks(self) -> None:
        """Parse the tasks after giving bare words to their options (see the class docstring)."""
        self.core.unparsed = self._name_bare_words(self.core.unparsed)
        super().parse_tasks()

    def _name_bare_words(self, argv):
        """Return ``argv`` with each bare word a task does not take positionally given to its
        :data:`BARE_WORDS` option (``logs NAME`` -> ``logs --job NAME``); a task name starts a task."""
        contexts = {}
        for context in self.collection.to_contexts():
            contexts.update(dict.fromkeys([context.name, *context.aliases], context))
        core_flags = self.initial_context.flags
        named, context, positionals, wants_value = [], None, 0, False
        for index, token in enumerate(argv):
            if token == "--":
                return named + argv[index:]
            if wants_value:
                named.append(token)
                wants_value = False
            elif token.startswith("-") and context is not None:
                named.append(token)
                wants_value = _wants_value(token, context.flags, core_flags)
            elif context is not None and positionals:
                named.append(token)
                positionals -= 1
            elif token in contexts:
                context = contexts[token]
                positionals = len(context.positional_args)
                named.append(token)
            elif context is not None and context.name in BARE_WORDS:
                named += [f"--{BARE_WORDS[context.name]}", token]
            else:
                named.append(token)
        return named

    def print_help(self) -> None:
        """Usage, crimpl's own options and the tasks, each with one line."""
        print(f"Usage: {self.binary} [--help [TASK]] [--version] TASK [OPTIONS]")
        print("")
        print("Options:")
        print("")
        shown = [a for a in self.core_args() if a.name in SHOWN_OPTIONS]
        self.print_columns(ParserContext(args=shown).help_tuples())
        self.list_tasks()

    def print_task_help(self, name: str) -> None:
        """A task's usage (with its bare words), its docstring and its options."""
        context = self.parser.contexts[name]
        words = [a.name.upper() for a in context.positional_args]
        if context.name in BARE_WORDS:
            words.append(f"[{BARE_WORDS[context.name].upper()} ...]" if context.name == "fetch"
                         else f"[{BARE_WORDS[context.name].upper()}]")
        print(f"Usage: {self.binary} {context.name} {' '.join(words + ['[OPTIONS]'])}")
        print("")
        for line in (inspect.getdoc(self.collection[context.name]) or "").splitlines():
            print(self.leading_indent + line if line.strip() else "")
        print("")
        print("Options:")
        tuples = context.help_tuples()
        if tuples:
            self.print_columns(tuples)
        else:
            print(self.leading_indent + "none")


def _takes_value(name, flag_sets):
    for flags in flag_sets:
        if name in flags:  # a Lexicon: `in` and [] know the aliases (-d for --dest), .get does not
            return flags[name].takes_value and not flags[name].optional
    return False


def _wants_value(token, *flag_sets):
    """Whether the option ``token`` (``--dest``, ``-d``, ``-qd``) takes the next word as its value."""
    if "=" in token:
        return False
    if token.startswith("--") or len(token) == 2:
        return _takes_value(token, flag_sets)
    # -dVALUE carries its value; -qd is a block of flags whose last may take one.
    return not _takes_value(token[:2], flag_sets) and _takes_value("-" + token[-1], flag_sets)


def program() -> CrimplProgram:
    """The ``crimpl`` command as an invoke Program (tests run it in-process)."""
    return CrimplProgram(namespace=ns, version=__version__, name="crimpl", binary="crimpl")


def main() -> None:
    """Entry point of the ``crimpl`` console script."""
    program().run()
