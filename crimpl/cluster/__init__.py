r"""One job over the N nodes of an EC2 server: ranks, inputs fanned out from rank 0, one state.

A server of several nodes (``crimpl:nodes``) runs each job on every node, as
rank ``0`` to ``N-1`` (the nodes' ``crimpl:node-rank`` tags). crimpl does not
schedule anything: it starts the same script on each node, in that node's job
directory, with the variables the usual engines read (``torchrun``, ``mpirun``,
``ray start``):

``CRIMPL_NODE_RANK``        this node's rank, ``0`` to ``N-1``;
``CRIMPL_NUM_NODES``        ``N``;
``CRIMPL_NODE_IPS``         the private IPs of the nodes, one per line, rank 0 first;
``CRIMPL_MASTER_ADDR``      rank 0's private IP;
``CRIMPL_NPROCS_PER_NODE``  processors per node (``nproc`` on the node, or ``nprocs_per_node``);
``CRIMPL_HOSTFILE``         an MPI hostfile, ``<ip> slots=<nprocs per node>`` per node;
``CRIMPL_NODE_SSH_CONFIG``  (rank 0 only) the OpenSSH config that reaches the other nodes;
                            ``OMPI_MCA_plm_rsh_args`` names it, so ``mpirun`` uses it.

**Inputs cross the user's link once.** A submit uploads the job to rank 0 (with
the store, as on one node), then rank 0 copies the job's files to the other
nodes over the private network: ``tar | ssh <node> tar -x``, run on rank 0.
That SSH uses a key crimpl makes for the server (ed25519): its private half is
only on rank 0 (``<remote_dir>/cluster/id_ed25519``, 0600), never written on
this machine; its public half is added to each node's ``authorized_keys`` by
crimpl over that node's own verified connection. Rank 0 verifies the nodes'
host keys against ``<remote_dir>/cluster/known_hosts``, which crimpl writes
from the keys it pinned itself (``StrictHostKeyChecking yes``).

**N ranks are one job.** Each rank runs under crimpl's usual wrapper
(:mod:`crimpl.jobs.protocol`: its own ``crimpl-status`` and ``crimpl-log`` on
its node). Rank 0 also starts a supervisor, ``crimpl-cluster.sh supervise``, in
its own session; it starts the other ranks, watches them (one SSH per rank,
which returns when the rank ends) and records the job's state in
``crimpl-cluster/crimpl-status`` (the wrapper's record format) and each rank's
end in ``crimpl-cluster/ranks`` (``<rank> <state> <exit code or ->``). The job is
``complete`` when every rank exited 0. When one rank fails (or its node stops
answering: ``lost``), the supervisor kills the others and records ``failed``
with the first failed rank's exit code. ``kill`` ends every rank. With
``on_complete``, the supervisor shuts every node down once the job ended
(the others first, rank 0 last); the ranks' own wrappers never do.
"""

from .api import (ClusterJobStatus, FanOutReport, RankStatus, check_output, kill, rank_logs, read_statuses,
                   resubmit, stream_log, submit_script)
from .nodessh import fan_out

__all__ = ["ClusterJobStatus", "FanOutReport", "RankStatus", "check_output", "fan_out", "kill",
           "rank_logs", "read_statuses", "resubmit", "stream_log", "submit_script"]
