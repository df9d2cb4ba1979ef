"""crimpl: a reproducible AWS EC2 server per project; run shell scripts on it and bring results back.

The public API::

    import crimpl
    config = crimpl.AWSEC2_Config(KeyFile="~/.ssh/id_ed25519")
    config.save("mine")
    server = crimpl.AWSEC2.new(nprocs=4)
    job = server.submit_script(["python3 run.py"], files=["run.py"])
    job.wait(); job.check_output("results/", "results/")
    server.terminate()

Nothing here imports pulumi or creates an AWS client at import time.
"""

from ._version import __version__
from .config import AWSEC2_Config, saved_config_names
from .cost import CostReport, ServerCost, cost_report
from .errors import (
    AWSError,
    ConfigError,
    ConnectionLostError,
    CrimplError,
    ExitStatus,
    HostKeyMismatchError,
    InstanceNotFoundError,
    InstanceStateError,
    JobError,
    JobUnreachableError,
    PulumiNotInstalledError,
    ScriptFailedError,
    SSHError,
    SSHNotReadyError,
    StackError,
    TransferError,
)
from .jobs import Job, JobStatus
from .log import install_default_handler
from .server import AWSEC2, InstanceInfo, Local, list_instances, terminate_all
from .slurm import RemoteSlurmServer
from .sshhost import RemoteThreadServer, list_servers, load_server

install_default_handler()

__all__ = [
    "AWSEC2", "AWSEC2_Config", "AWSError", "ConfigError", "ConnectionLostError", "CostReport", "CrimplError",
    "ExitStatus", "HostKeyMismatchError",
    "InstanceInfo", "InstanceNotFoundError", "InstanceStateError", "Job", "JobError", "JobStatus",
    "JobUnreachableError",
    "Local", "PulumiNotInstalledError", "RemoteSlurmServer", "RemoteThreadServer", "SSHError",
    "SSHNotReadyError", "ScriptFailedError",
    "StackError", "TransferError", "ServerCost", "__version__", "cost_report", "list_instances",
    "list_servers", "load_server", "saved_config_names",
    "terminate_all",
]
