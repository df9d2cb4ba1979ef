"""The invoke tasks, shared by ``invoke`` in a checkout (via ``tasks.py``) and the ``crimpl`` command.

Each task parses its arguments, calls the crimpl API and prints the result. A
:class:`~crimpl.errors.CrimplError` becomes one line on stderr and exit code 1,
without a traceback; nothing else in crimpl prints errors.

Which server a task acts on: ``--instance-id``, else ``--server`` (a
``crimpl:name``), else ``--stack`` (``local`` for this machine), else
``$CRIMPL_STACK``, else the only ``Pulumi.<stack>.yaml`` in the current folder.
"""

import functools
import inspect
import os
import subprocess
import sys

from invoke import Collection, Exit, Program, task

from . import __version__
from .errors import CrimplError, InstanceNotFoundError, StackError

SERVER_HELP = {
    "stack": "stack name (Pulumi.<stack>.yaml), or 'local' for this machine",
    "instance-id": "EC2 instance id, instead of a stack",
    "server": "server name (crimpl:name tag), instead of a stack",
}


def reports_errors(body):
    """Turn a CrimplError raised by a task into a one-line message and exit code 1."""

    @functools.wraps(body)
    def wrapper(*args, **kwargs):
        try:
            return body(*args, **kwargs)
        except CrimplError as exc:
            raise Exit(f"crimpl: error: {exc}", code=1) from None
        except KeyboardInterrupt:
            raise Exit("crimpl: interrupted", code=130) from None

    return wrapper


def crimpl_task(*args, **kwargs):
    """``@task`` that reports crimpl errors as one line and documents the server options."""
    extra_help = kwargs.pop("help", {})

    def decorate(body):
        params = {name.replace("_", "-") for name in inspect.signature(body).parameters}
        help_ = {k: v for k, v in SERVER_HELP.items() if k in params}
        return task(help={**help_, **extra_help}, **kwargs)(reports_errors(body))

    return decorate(args[0]) if args and callable(args[0]) else decorate


def _stack_settings(stack):
    from . import stack as stacks

    return stacks.read_stack(stacks.select_stack(stack))


def _config_for(settings):
    from .config import config_from_stack

    config, _nprocs, _name = config_from_stack(settings.values, source=str(settings.path))
    return config


def resolve_server(stack=None, instance_id=None, server=None):
    """Return the server a task acts on (see the module docstring for the order)."""
    from .server import AWSEC2, Local

    if instance_id:
        return AWSEC2(instance_id)
    if server:
        return AWSEC2(server_name=server)
    if (stack or os.environ.get("CRIMPL_STACK")) == "local":
        return Local()
    settings = _stack_settings(stack)
    try:
        return AWSEC2(server_name=settings.server_name, config=_config_for(settings))
    except InstanceNotFoundError as exc:
        raise InstanceNotFoundError(
            f"stack {settings.name} has no live server ({exc}); run `invoke up --stack {settings.name}`"
        ) from exc


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


@crimpl_task(help={"provisioner": "pulumi (default) or boto3"})
def preview(c, stack=None, provisioner=None):
    """Show what `up` would change (pulumi preview)."""
    settings = _stack_settings(stack)
    if _provisioner(provisioner) == "pulumi":
        from . import stack as stacks

        stacks.preview(settings, on_output=print)
        return
    from . import stack as stacks
    from .ec2 import client, find_instances

    spec = stacks.spec_for_stack(settings)
    found = find_instances(client(spec.region), name=spec.server_name)
    if found:
        print(f"{settings.name}: {found[-1]['InstanceId']} exists; up would change nothing")
    else:
        print(f"{settings.name}: up would launch {spec.instance_type} named {spec.server_name}")


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
    from .server import AWSEC2

    try:
        server = AWSEC2(server_name=settings.server_name, config=_config_for(settings))
    except InstanceNotFoundError:
        print(f"{settings.name}: no live server; nothing to destroy")
        return
    server.terminate()
    print(f"{settings.name}: terminated {server.instanceId} and removed what crimpl created for it")


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
        raise Exit("crimpl: not confirmed; nothing changed (pass --yes to skip the question)", code=1)


# -- lifecycle -------------------------------------------------------------------


@crimpl_task
def start(c, stack=None, instance_id=None, server=None):
    """Start the server and wait until it runs."""
    target = resolve_server(stack, instance_id, server).start()
    print(f"{target.instanceId}: {target.state} at {target.public_ip}")


@crimpl_task
def stop(c, stack=None, instance_id=None, server=None):
    """Stop the server (its disk is kept; compute billing stops)."""
    target = resolve_server(stack, instance_id, server).stop()
    print(f"{target.instanceId}: {target.state}")


@crimpl_task(help={"yes": "do not ask for confirmation"})
def terminate(c, stack=None, instance_id=None, server=None, yes=False):
    """Terminate the server: it and its disk are deleted."""
    target = resolve_server(stack, instance_id, server)
    _confirm(yes, f"Terminate {target.instanceId} and delete its disk?")
    target.terminate()
    print(f"{target.instanceId}: terminated")


@crimpl_task
def status(c, stack=None, instance_id=None, server=None):
    """Show the server's name, id, state, type and IP (no SSH needed)."""
    target = resolve_server(stack, instance_id, server)
    if target.instanceId == "local":
        print(f"local: jobs in {target.job_root}; latest job: {target.job_status}")
        return
    info = target.describe()
    state = info["State"]["Name"]
    print(f"{target.server_name or '-'}  {target.instanceId}  {state}  {info['InstanceType']}  "
          f"{info.get('PublicIpAddress') or '-'}")


@crimpl_task(name="list")
def list_(c):
    """List crimpl servers not yet terminated, with estimated cost."""
    from .server import list_instances

    rows = list_instances()
    if not rows:
        print("no crimpl servers (nothing is billing)")
        return
    print(f"{'ID':21} {'NAME':24} {'STATE':10} {'TYPE':12} {'IP':16} {'LAUNCHED':20} EST. COST")
    for r in rows:
        cost = "?" if r.estimated_cost_usd is None else f"${r.estimated_cost_usd:.2f}"
        print(f"{r.instance_id:21} {r.name:24} {r.state:10} {r.instance_type:12} "
              f"{r.public_ip or '-':16} {r.launch_time:%Y-%m-%d %H:%M:%S}  {cost}")


# -- jobs ------------------------------------------------------------------------


@crimpl_task(iterable=["files"], help={
    "files": "file or directory to send beside the script (repeat -f)",
    "on-complete": "stop or terminate the server when the script ends",
    "name": "job name (default: time and script name)",
    "allow-concurrent": "start even if another job is running",
    "quiet": "no progress bars",
})
def submit(c, script, files=None, on_complete=None, name=None, allow_concurrent=False, quiet=False,
           stack=None, instance_id=None, server=None):
    """Send SCRIPT and its files to the server and start it detached."""
    target = resolve_server(stack, instance_id, server)
    job = target.submit_script(script, files=files or None, job_name=name, on_complete=on_complete,
                               allow_concurrent=allow_concurrent, quiet=quiet)
    print(f"submitted {job.job_name}: running (`invoke logs {job.job_name} --follow`)")


@crimpl_task
def jobs(c, stack=None, instance_id=None, server=None):
    """List the server's jobs and their states."""
    statuses = resolve_server(stack, instance_id, server).job_statuses()
    if not statuses:
        print("no jobs")
    for name, job_status in statuses.items():
        print(f"{name:40} {job_status}  started {job_status.started or '-'}  ended {job_status.ended or '-'}")


@crimpl_task(help={"job": "job name (default: the latest)",
                   "follow": "stream until the job ends; exit 1 unless it completed"})
def logs(c, job=None, follow=False, stack=None, instance_id=None, server=None):
    """Print a job's output (stdout and stderr)."""
    found = resolve_server(stack, instance_id, server).get_job(job)
    if not follow:
        sys.stdout.write(found.logs())
        return
    found.logs(follow=True, stream=sys.stdout)
    final = found.wait(interval=1.0)
    if final.state != "complete":
        raise Exit(f"crimpl: {found.job_name} {final}", code=1)
    print(f"crimpl: {found.job_name} {final}", file=sys.stderr)


@crimpl_task(help={"job": "job name (default: the latest)"})
def kill(c, job=None, stack=None, instance_id=None, server=None):
    """End a running job and everything it started."""
    found = resolve_server(stack, instance_id, server).get_job(job)
    if found.kill():
        print(f"{found.job_name}: killed")
    else:
        print(f"{found.job_name}: not running ({found.status()})")


@crimpl_task(help={
    "path": "path(s) in the job directory: files, directories or globs; separate several with commas",
    "dest": "local destination (default: the current folder)",
    "job": "job name (default: the latest)",
    "quiet": "no progress bars",
})
def fetch(c, path, dest=".", job=None, quiet=False, stack=None, instance_id=None, server=None):
    """Copy a job's outputs here, whole files only."""
    paths = [p.strip() for p in path.split(",") if p.strip()]
    report = resolve_server(stack, instance_id, server).check_output(paths, dest, job=job, quiet=quiet)
    for replaced in report.replaced:
        print(f"replaced {replaced} (its content differed)", file=sys.stderr)
    print(f"fetched {len(report.files)} file(s) into {dest}")


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


ns = Collection(up, preview, destroy, refresh, start, stop, terminate, status, list_, submit, jobs,
                logs, kill, fetch, ssh)


def main():
    """Entry point of the ``crimpl`` console script."""
    program = Program(namespace=ns, version=__version__, name="crimpl", binary="crimpl")
    program.run()
