"""Pulumi stacks: read ``Pulumi.<stack>.yaml``, and drive crimpl's program with the Automation API.

Reading a stack (:func:`find_stacks`, :func:`select_stack`, :func:`read_stack`,
:func:`spec_for_stack`) needs PyYAML only. Deploying one (:func:`up`,
:func:`preview`, :func:`destroy`, :func:`refresh`, :func:`outputs`) needs the
Pulumi CLI, and imports ``pulumi.automation`` inside the call: ``import crimpl``
and every day-2 path stay free of Pulumi.

The program is crimpl's own (``infra/``, installed as ``crimpl.infra``); the
stack files live in the project folder. A ``Pulumi.yaml`` there is used as it
is (crimpl's checkout has one); without one, crimpl writes a temporary one that
points at its program and removes it afterwards.

Where Pulumi keeps the state, in one place:

1. ``PULUMI_BACKEND_URL`` when set;
2. else the backend the Pulumi CLI is logged in to (``pulumi login``, ``PULUMI_ACCESS_TOKEN``);
3. else a local file backend in ``$CRIMPL_HOME/pulumi``.

The stack's one secret, ``crimpl:hostKey``, is encrypted by the Pulumi Cloud, by
the stack's ``secretsprovider``, or else with ``PULUMI_CONFIG_PASSPHRASE`` /
``PULUMI_CONFIG_PASSPHRASE_FILE``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import InstanceSpec, build_spec, config_from_stack, stack_server_name
from .errors import ConfigError, PulumiNotInstalledError, StackError
from .home import crimpl_home
from .stackkeys import coerce

DEFAULT_PROJECT = "crimpl"
#: The template stack file; never a stack itself.
EXAMPLE_STACK = "example"
_STACK_SUFFIXES = (".yaml", ".yml")
_PROJECT_FILES = ("Pulumi.yaml", "Pulumi.yml", "Pulumi.json")
_GENERIC_ERRORS = ("update failed", "preview failed", "destroy failed", "refresh failed",
                   "program failed with an unhandled exception:")


# ---------------------------------------------------------------------------
# Reading stack files


@dataclass(frozen=True)
class StackSettings:
    """One stack as its ``Pulumi.<stack>.yaml`` describes it.

    ``values`` maps ``crimpl:`` keys (without the namespace) to typed values,
    plus ``region`` from ``aws:region``; encrypted (``secure:``) values are not
    in it, only their keys in ``secure_keys``.
    """

    name: str
    project: str
    path: Path
    values: dict[str, Any] = field(hash=False)
    secure_keys: frozenset[str] = frozenset()
    secrets_provider: str | None = None

    @property
    def server_name(self) -> str:
        """The server's name: ``crimpl:serverName``, else ``<project>-<stack>``."""
        return self.values.get("serverName") or stack_server_name(self.project, self.name)

    @property
    def project_dir(self) -> Path:
        """The folder holding the stack file: Pulumi's work dir."""
        return self.path.parent


def find_stacks(project_dir: str | os.PathLike = ".") -> list[str]:
    """Return the names of the stacks in ``project_dir`` (``Pulumi.<name>.yaml``), sorted.

    ``Pulumi.example.yaml`` is the template, not a stack.
    """
    names = set()
    for suffix in _STACK_SUFFIXES:
        for path in Path(project_dir).glob(f"Pulumi.*{suffix}"):
            name = path.name[len("Pulumi."):-len(suffix)]
            if name and name != EXAMPLE_STACK:
                names.add(name)
    return sorted(names)


def select_stack(name: str | None = None, project_dir: str | os.PathLike = ".") -> str:
    """Return the stack to use: ``name``, else ``$CRIMPL_STACK``, else the only stack file.

    :raises StackError: if there is no stack file, if there are several and none
        is chosen, or if the chosen one has no file; the message lists the stacks.
    """
    stacks = find_stacks(project_dir)
    where = Path(project_dir).resolve()
    name = name or os.environ.get("CRIMPL_STACK") or None
    if name is None:
        if len(stacks) == 1:
            return stacks[0]
        if not stacks:
            raise StackError(
                f"no stack file (Pulumi.<stack>.yaml) in {where}: "
                "run `crimpl init` (it writes Pulumi.dev.yaml with your region and SSH key)"
            )
        raise StackError(
            f"several stacks in {where} ({', '.join(stacks)}): choose one by name or with CRIMPL_STACK=NAME"
        )
    if name not in stacks:
        raise StackError(
            f"no stack {name!r} in {where} (no Pulumi.{name}.yaml); "
            f"stacks: {', '.join(stacks) if stacks else 'none'}"
        )
    return name


def read_stack(name: str, project_dir: str | os.PathLike = ".") -> StackSettings:
    """Read and validate ``Pulumi.<name>.yaml`` in ``project_dir``.

    :returns: a :class:`StackSettings`.
    :raises StackError: if there is no such stack file.
    :raises ConfigError: naming the key and the file for an unknown ``crimpl:``
        key, a value of the wrong type, or a host key stored in plain text.
    """
    project_dir = Path(project_dir)
    path = _stack_file(project_dir, name)
    source = str(path)
    data = _load_yaml(path)
    config = data.get("config") or {}
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: 'config' must be a mapping of keys such as crimpl:keyFile")
    values, secure = {}, set()
    for full_key, value in config.items():
        namespace, _, key = str(full_key).partition(":")
        if isinstance(value, dict) and "secure" in value:
            if namespace == "crimpl":
                secure.add(key)
            continue
        if full_key == "aws:region":
            values["region"] = value
        elif namespace == "crimpl":
            values[key] = coerce(key, value, source)
    if "hostKey" in values:
        raise ConfigError(
            f"{source}: crimpl:hostKey is stored in plain text: remove it (crimpl up generates "
            "a secret one) or set it with pulumi config set --secret crimpl:hostKey"
        )
    config_from_stack(values, source=source)
    return StackSettings(
        name=name,
        project=_project_name(project_dir),
        path=path,
        values=values,
        secure_keys=frozenset(secure),
        secrets_provider=data.get("secretsprovider"),
    )


def spec_for_stack(settings: StackSettings, host_key: tuple[str, str] | None = None,
                   ssh_cidrs: list[str] | None = None) -> InstanceSpec:
    """Return the :class:`~crimpl.config.InstanceSpec` of a stack (what the boto3 path launches).

    :param host_key: ``(private_pem, public_line)``; a new key is generated when None.
    :param ssh_cidrs: CIDRs allowed to SSH, overriding ``crimpl:sshCidrs``.
    """
    config, nprocs, _ = config_from_stack(settings.values, source=str(settings.path))
    return build_spec(config, nprocs=nprocs, server_name=settings.server_name,
                      host_key=host_key, ssh_cidrs=ssh_cidrs)


def _stack_file(project_dir, name):
    for suffix in _STACK_SUFFIXES:
        path = project_dir / f"Pulumi.{name}{suffix}"
        if path.is_file():
            return path
    select_stack(name, project_dir)  # raises, listing the stacks there
    raise StackError(f"no stack file Pulumi.{name}.yaml in {project_dir.resolve()}")


def _load_yaml(path):
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path} cannot be read as YAML: {exc}".splitlines()[0]) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a YAML mapping with a 'config:' section")
    return data


def _project_name(project_dir):
    path = project_dir / "Pulumi.yaml"
    if not path.is_file():
        return DEFAULT_PROJECT
    name = _load_yaml(path).get("name")
    return str(name) if name else DEFAULT_PROJECT


# ---------------------------------------------------------------------------
# The Pulumi CLI, backend and workspace


def pulumi_cli() -> str:
    """Return the path of the Pulumi CLI (on ``PATH``, or where its installer puts it).

    :raises PulumiNotInstalledError: if it is not installed.
    """
    found = shutil.which("pulumi")
    if found:
        return found
    installed = _pulumi_home() / "bin" / "pulumi"
    if installed.is_file() and os.access(installed, os.X_OK):
        return str(installed)
    raise PulumiNotInstalledError(
        "the Pulumi CLI is not installed: install it from https://www.pulumi.com/docs/install/ "
        "(curl -fsSL https://get.pulumi.com | sh), or use --provisioner boto3"
    )


def backend_url() -> str:
    """Return the Pulumi backend URL crimpl uses (lookup order in the module docstring)."""
    url = os.environ.get("PULUMI_BACKEND_URL")
    if url:
        return url
    if os.environ.get("PULUMI_ACCESS_TOKEN"):
        return "https://api.pulumi.com"
    credentials = _pulumi_home() / "credentials.json"
    try:
        current = json.loads(credentials.read_text(encoding="utf-8")).get("current")
    except (OSError, ValueError, AttributeError):
        current = None
    if current:
        return current
    return (crimpl_home() / "pulumi").as_uri()


def infra_dir() -> Path:
    """Return the folder of crimpl's Pulumi program (``crimpl.infra``)."""
    try:
        from importlib.resources import files

        return Path(str(files("crimpl.infra")))
    except ModuleNotFoundError:
        # A source checkout that is not pip-installed: infra/ sits beside crimpl/.
        return _checkout_root() / "infra"


def workspace_options(settings: StackSettings) -> Any:
    """Return the ``LocalWorkspaceOptions`` for a stack: work dir, program, backend, environment.

    :raises PulumiNotInstalledError: if the Pulumi CLI is missing.
    :raises StackError: if the backend needs a passphrase and none is given.
    """
    cli = pulumi_cli()  # before importing pulumi.automation: no CLI, no point
    url = backend_url()
    _check_passphrase(settings, url)
    from pulumi import automation as auto

    if url == (crimpl_home() / "pulumi").as_uri():
        Path(crimpl_home() / "pulumi").mkdir(mode=0o700, exist_ok=True)
    env = {
        "PULUMI_BACKEND_URL": url,
        "PULUMI_SKIP_UPDATE_CHECK": "true",
        # Run the program in this interpreter, which has crimpl and pulumi-aws.
        "PULUMI_PYTHON_CMD": os.environ.get("PULUMI_PYTHON_CMD") or sys.executable,
    }
    program = infra_dir()
    if program == _checkout_root() / "infra":
        # Not pip-installed: let the program import crimpl from the checkout.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_checkout_root()), os.environ.get("PYTHONPATH")) if p
        )
    project_settings = None
    if not any((settings.project_dir / name).exists() for name in _PROJECT_FILES):
        project_settings = auto.ProjectSettings(name=settings.project, runtime="python", main=str(program))
    command = None
    if shutil.which("pulumi") is None:  # found where the installer puts it, not on PATH
        command = auto.PulumiCommand(root=str(Path(cli).parent.parent))
    return auto.LocalWorkspaceOptions(
        work_dir=str(settings.project_dir.resolve()),
        env_vars=env,
        project_settings=project_settings,
        pulumi_command=command,
    )


def _pulumi_home():
    return Path(os.environ.get("PULUMI_HOME") or "~/.pulumi").expanduser()


def _checkout_root():
    return Path(__file__).resolve().parent.parent


def _check_passphrase(settings, url):
    if url.startswith(("https://", "http://")):
        return  # the Pulumi Cloud encrypts secrets itself
    provider = settings.secrets_provider
    if provider and not provider.startswith("passphrase"):
        return  # awskms://, gcpkms://, ... set in the stack file
    if "PULUMI_CONFIG_PASSPHRASE" in os.environ:  # an empty passphrase is allowed
        return
    passphrase_file = os.environ.get("PULUMI_CONFIG_PASSPHRASE_FILE")
    if passphrase_file:
        if Path(passphrase_file).expanduser().is_file():
            return
        raise StackError(
            f"PULUMI_CONFIG_PASSPHRASE_FILE={passphrase_file} does not exist: "
            "point it at the file holding the passphrase of this stack's secrets"
        )
    raise StackError(
        f"no passphrase for the secrets of stack {settings.name} (backend {url}): "
        "export PULUMI_CONFIG_PASSPHRASE=... or PULUMI_CONFIG_PASSPHRASE_FILE=path, "
        "and keep it: it decrypts crimpl:hostKey"
    )


@contextlib.contextmanager
def _open_stack(settings, *, create):
    """Yield the automation ``Stack``; a temporary ``Pulumi.yaml`` is removed afterwards."""
    opts = workspace_options(settings)
    from pulumi import automation as auto

    temporary_project = settings.project_dir / "Pulumi.yaml" if opts.project_settings else None
    try:
        with _pulumi_errors("open", settings):
            opener = auto.create_or_select_stack if create else auto.select_stack
            stack = opener(settings.name, work_dir=opts.work_dir, opts=opts)
        yield stack
    finally:
        if temporary_project is not None:
            temporary_project.unlink(missing_ok=True)


@contextlib.contextmanager
def _pulumi_errors(operation, settings):
    """Turn Automation API errors into one-line :class:`StackError`\\ s."""
    from pulumi.automation import errors

    name = settings.name
    try:
        yield
    except errors.ConcurrentUpdateError as exc:
        raise StackError(
            f"stack {name} is locked by another update: wait for it to finish, "
            f"or run `pulumi cancel --stack {name}` if none is running"
        ) from exc
    except errors.StackNotFoundError as exc:
        raise StackError(f"stack {name} has not been deployed ({backend_url()}): run crimpl up first") from exc
    except errors.CommandError as exc:
        raise StackError(f"pulumi {operation} of stack {name} failed: {_error_line(str(exc))}") from exc


def _error_line(text):
    """Return the line of Pulumi's output that says what went wrong."""
    # str(CommandError) is "code: N", "stdout: ...", "stderr: ..." with the output inside.
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("code:"):
            continue
        line = line.removeprefix("stdout:").removeprefix("stderr:").strip()
        if line:
            lines.append(line)
    errors = [line.split("error:", 1)[1].strip() for line in lines if "error:" in line]
    specific = [e for e in errors if e and e.lower() not in _GENERIC_ERRORS]
    found = specific or errors or lines[-1:] or ["see the Pulumi output above"]
    return found[0][:400]


# ---------------------------------------------------------------------------
# Operations


def up(settings: StackSettings, *, on_output: Callable[[str], Any] = print,
       yes: bool = True) -> dict[str, Any] | None:
    """Create or update the stack's server and return the stack outputs.

    A stack without ``crimpl:hostKey`` gets a new one, stored as a Pulumi secret.
    Without ``crimpl:sshCidrs`` or ``crimpl:securityGroupId``, SSH is allowed
    from the caller's address (found now) for this run. After the update each
    node's host key (:func:`~crimpl.config.node_host_key`) is pinned for its
    exported instance id, and the pins of nodes the update removed are forgotten.

    :param on_output: called with each line of Pulumi's progress.
    :param yes: apply the changes; False only previews them and returns None.
    :returns: the outputs (``instanceId``, ``publicIp``, ``privateIp`` of rank 0; ``instanceIds``
        and ``privateIps`` of every node, rank 0 first; ``username``, ``serverName``).
    :raises PulumiNotInstalledError: if the Pulumi CLI is missing.
    :raises StackError: if Pulumi fails; the message is Pulumi's error line.
    :raises ConfigError: if the caller's address cannot be found.
    """
    from .config import node_host_key
    from .hostkeys import pin, public_line_of, unpin

    if not yes:
        preview(settings, on_output=on_output)
        return None
    with _open_stack(settings, create=True) as stack:
        host_private = _ensure_host_key(stack, settings)
        with _pulumi_errors("stack output", settings):
            before = _instance_ids(_plain_outputs(stack))
        with _ssh_cidrs_for_run(stack, settings), _pulumi_errors("up", settings):
            result = stack.up(on_output=on_output, show_secrets=False)
    values = {key: output.value for key, output in result.outputs.items()}
    if not values.get("instanceId"):
        raise StackError(f"pulumi up of stack {settings.name} exported no instanceId; run crimpl refresh")
    host_key = (host_private, public_line_of(host_private))
    after = _instance_ids(values)
    for rank, instance_id in enumerate(after):
        pin(instance_id, node_host_key(host_key, rank)[1])
    for instance_id in set(before) - set(after):  # nodes `crimpl:nodes` no longer asks for, or replaced
        unpin(instance_id)
    return values


def _instance_ids(values):
    """The instance id of every node, rank 0 first, from the stack outputs (a stack deployed
    before crimpl had nodes exports ``instanceId`` only)."""
    return values.get("instanceIds") or ([values["instanceId"]] if values.get("instanceId") else [])


def preview(settings: StackSettings, *, on_output: Callable[[str], Any] = print) -> dict[str, int]:
    """Show what :func:`up` would change, changing nothing; return ``{operation: count}``.

    Like :func:`up`, it gives a stack without ``crimpl:hostKey`` a new one.
    """
    with _open_stack(settings, create=True) as stack:
        _ensure_host_key(stack, settings)
        with _ssh_cidrs_for_run(stack, settings), _pulumi_errors("preview", settings):
            result = stack.preview(on_output=on_output)
    return dict(result.change_summary)


def destroy(settings: StackSettings, *, on_output: Callable[[str], Any] = print, yes: bool = True) -> None:
    """Delete the stack's server (every node) and what crimpl created for it; forget the host keys.

    :param yes: destroy; False only previews the deletion.
    :raises StackError: if the stack was never deployed or Pulumi fails.
    """
    from .hostkeys import unpin

    with _open_stack(settings, create=False) as stack:
        with _pulumi_errors("destroy", settings):
            instance_ids = _instance_ids(_plain_outputs(stack))
            stack.destroy(on_output=on_output, show_secrets=False, preview_only=not yes)
    if yes:
        for instance_id in instance_ids:
            unpin(instance_id)


def refresh(settings: StackSettings, *, on_output: Callable[[str], Any] = print, yes: bool = True) -> None:
    """Update Pulumi's state from AWS (an instance stopped or deleted outside Pulumi).

    :param yes: write the refreshed state; False only previews it.
    :raises StackError: if the stack was never deployed or Pulumi fails.
    """
    with _open_stack(settings, create=False) as stack, _pulumi_errors("refresh", settings):
        stack.refresh(on_output=on_output, show_secrets=False, preview_only=not yes)


def outputs(settings: StackSettings) -> dict[str, Any]:
    """Return the stack outputs of the last update as plain values (``{}`` if none).

    :raises StackError: if the stack was never deployed.
    """
    with _open_stack(settings, create=False) as stack, _pulumi_errors("stack output", settings):
        return _plain_outputs(stack)


def _plain_outputs(stack):
    return {key: output.value for key, output in stack.outputs().items()}


def _ensure_host_key(stack, settings):
    """Return the stack's host private key, generating and storing one (secret) if it has none."""
    from pulumi.automation import ConfigValue

    from .hostkeys import generate_host_key

    with _pulumi_errors("config", settings):
        if "hostKey" in settings.secure_keys:
            return stack.get_config("crimpl:hostKey").value
        private, _ = generate_host_key()
        stack.set_config("crimpl:hostKey", ConfigValue(value=private, secret=True))
    return private


@contextlib.contextmanager
def _ssh_cidrs_for_run(stack, settings):
    """Allow SSH from the caller's address for this run, unless the stack says who may."""
    from pulumi.automation import ConfigValue

    from .caller import caller_cidr

    config, _, _ = config_from_stack(settings.values, source=str(settings.path))
    if config.ssh_cidrs or config.SecurityGroupId or "sshCidrs" in settings.secure_keys:
        yield
        return
    cidr = caller_cidr()
    with _pulumi_errors("config", settings):
        stack.set_config("crimpl:sshCidrs[0]", ConfigValue(value=cidr), path=True)
    try:
        yield
    finally:
        # The address is the caller's of this run; the next run finds its own.
        with _pulumi_errors("config", settings):
            stack.remove_config("crimpl:sshCidrs")
