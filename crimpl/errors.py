"""The exceptions crimpl raises.

Every error a user can hit is a :class:`CrimplError`. Its ``str()`` is one line
that says what went wrong and what to do about it; the invoke tasks print that
line and exit non-zero, and nothing inside the library prints errors itself.
"""

import enum


class ExitStatus(enum.IntEnum):
    """The exit codes of the ``crimpl`` command (and of crimpl's invoke tasks).

    A script can tell the kinds of failure apart; the README lists them.
    """

    OK = 0
    #: any other error (a job that cannot be found or submitted, a failed transfer)
    ERROR = 1
    #: configuration: stack file, crimpl config, argument, or a missing Pulumi CLI
    CONFIG = 2
    #: AWS: EC2 unreachable or refusing, no such instance, or it is in the wrong state
    AWS = 3
    #: SSH: the server is unreachable or offered the wrong host key
    SSH = 4
    #: the job ran and did not complete (failed or killed)
    JOB_FAILED = 5
    #: interrupted with Ctrl-C (128 + SIGINT, as a shell reports it)
    INTERRUPTED = 130


class CrimplError(Exception):
    """Base class of every error crimpl raises on purpose."""


class ConfigError(CrimplError):
    """A crimpl config, stack config or argument is missing or invalid."""


class AWSError(CrimplError):
    """EC2 could not be reached or refused a request (credentials, region, API)."""


class InstanceNotFoundError(CrimplError):
    """No crimpl-managed instance matches the given id or name."""

    def __init__(self, message, instance_id=None):
        super().__init__(message)
        self.instance_id = instance_id


class InstanceStateError(CrimplError):
    """The instance is in a state that does not allow the requested action."""

    def __init__(self, message, instance_id=None, state=None):
        super().__init__(message)
        self.instance_id = instance_id
        self.state = state


class SSHError(CrimplError):
    """The instance could not be reached or used over SSH."""


class HostKeyMismatchError(SSHError):
    """The server offered a host key that differs from the one pinned for it."""


class SSHNotReadyError(SSHError):
    """SSH did not accept a connection within the readiness timeout."""


class ConnectionLostError(SSHError):
    """The SSH connection dropped while a command ran on the server."""


class JobError(CrimplError):
    """A job could not be submitted, found or controlled."""


class JobUnreachableError(JobError, SSHError):
    """A job's server stopped, went away or stayed unreachable while crimpl waited on the job.

    :param last_status: the job's last :class:`~crimpl.jobs.JobStatus` crimpl read, or None.
    :param server_state: the server's state (``stopped``, ``terminated`` ...) when known.
    """

    def __init__(self, message, last_status=None, server_state=None):
        super().__init__(message)
        self.last_status = last_status
        self.server_state = server_state


class ScriptFailedError(JobError):
    """A script ran and exited non-zero.

    :param exit_code: the script's exit code.
    :param tail: the last lines of its output.
    """

    def __init__(self, message, exit_code=None, tail=""):
        super().__init__(message)
        self.exit_code = exit_code
        self.tail = tail


class TransferError(CrimplError):
    """Files could not be copied to or from the server."""


class StackError(CrimplError):
    """A Pulumi stack could not be found, read or deployed."""


class PulumiNotInstalledError(StackError):
    """The Pulumi CLI, which the Pulumi provisioner drives, is not installed."""
