"""One job over every node: submit, resubmit, its state from the supervisor's record, kill, logs, outputs."""

from __future__ import annotations

import os
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import JobError, TransferError
from ..jobs import Job, JobStatus, protocol
from ..jobs.api import _check_files, _script_sources
from ..jobs.protocol import ON_COMPLETE, STATUS, LOG, WRAPPER, check_job_name, job_dir, run
from ..transfer.streams import TransferReport
from .nodessh import fan_out, prepare_nodes
from .scripts import (CLUSTER_SCRIPT, NODES_FILE, ONE_NODE_OPTIONS, RANK_FILE, RANK_SCRIPT, RANK_STATES,
                      RECORD_DIR, render_cluster_script, render_rank_script)

@dataclass
class RankStatus:
    """How one rank of a cluster job ended (or that it runs).

    :param rank: the node's rank.
    :param state: one of :data:`RANK_STATES`.
    :param exit_code: its script's exit code, when it has one.
    """

    rank: int
    state: str
    exit_code: int | None = None


@dataclass
class ClusterJobStatus(JobStatus):
    """A :class:`~crimpl.jobs.JobStatus` of a job over several nodes, with every rank's end.

    :param ranks: one :class:`RankStatus` per rank that ended, in rank order.
    """

    ranks: list = field(default_factory=list)


@dataclass
class FanOutReport(TransferReport):
    """The upload of a cluster job: what this machine sent (to rank 0), and what rank 0 sent on.

    The fields of :class:`~crimpl.transfer.TransferReport` count the client's link only.

    :param fanout_bytes: ``{rank: bytes}`` rank 0 sent to each other node (tar stream size).
    """

    fanout_bytes: dict = field(default_factory=dict)


# -- submit, resubmit -----------------------------------------------------------------------


def _nodes_and_ips(server):
    nodes = server.nodes
    ips = [node.private_ip for node in nodes]
    missing = [str(node.rank) for node, ip in zip(nodes, ips) if not ip]
    if missing:
        raise JobError(f"node(s) {', '.join(missing)} of {server} have no private IP yet: "
                       "wait until every node runs (`crimpl status`), then submit again")
    return nodes, ips


def submit_script(server, script, files=None, *, job_name: str | None = None, on_complete: str | None = None,
                  allow_concurrent: bool = False, quiet: bool = False,
                  nprocs_per_node: int | None = None, **one_node_options) -> Job:
    """Send ``script`` and ``files`` to rank 0, copy them on to every node, start the job on all.

    See :meth:`crimpl.jobs.JobsMixin.submit_script` for the parameters they share.

    :param server: rank 0 of a server with several nodes.
    :param nprocs_per_node: ``CRIMPL_NPROCS_PER_NODE`` and the hostfile's slots
        (default: the node's processors, ``nproc``).
    :param one_node_options: the options of a server of one node (:data:`ONE_NODE_OPTIONS`):
        refused when set.
    :returns: the :class:`~crimpl.jobs.Job`; its ``upload_report`` is a :class:`FanOutReport`.
    :raises JobError: as a one-node submit does, or if a node cannot be reached from rank 0.
    """
    from .. import transfer

    if on_complete not in ON_COMPLETE:
        raise JobError(f"on_complete must be 'stop', 'terminate' or None, got {on_complete!r}")
    if job_name is not None:
        check_job_name(job_name)
    unknown = sorted(set(one_node_options) - set(ONE_NODE_OPTIONS))
    if unknown:
        raise TypeError(f"submit_script() got an unexpected keyword argument {unknown[0]!r}")
    asked = [name for name in ONE_NODE_OPTIONS if name != "_attempt" and one_node_options.get(name)]
    if asked:
        raise JobError(f"{', '.join(asked)} {'is' if len(asked) == 1 else 'are'} for servers of one node: "
                       "on several nodes, each job runs once on every node (submit again to retry)")
    if nprocs_per_node is not None and (isinstance(nprocs_per_node, bool) or not isinstance(nprocs_per_node, int)
                                        or nprocs_per_node < 1):
        raise JobError(f"nprocs_per_node must be a whole number, 1 or more, got {nprocs_per_node!r}")
    root = server.job_root
    with tempfile.TemporaryDirectory(prefix="crimpl-submit-") as workdir:
        entry, script_path = _script_sources(script, workdir)
        inputs = _check_files(files, entry)
        name = job_name or protocol.new_job_name(entry)
        texts = {
            # No on_complete for a rank's own wrapper: the supervisor shuts the nodes down, once all ended.
            WRAPPER: protocol.render_wrapper(name, RANK_SCRIPT, None, server.shutdown_command),
            RANK_SCRIPT: render_rank_script(entry, nprocs_per_node),
            CLUSTER_SCRIPT: render_cluster_script(root, name, on_complete, server.shutdown_command),
            RANK_FILE: "0\n",
        }
        with server.session(start=True) as conn:
            nodes, ips = _nodes_and_ips(server)
            texts[NODES_FILE] = "".join(f"{ip}\n" for ip in ips)
            crimpl_files = []
            for file_name, text in texts.items():
                crimpl_files.append(Path(workdir) / file_name)
                crimpl_files[-1].write_text(text, encoding="utf-8")
            server._check_free(conn, name, allow_concurrent)
            prepare_nodes(server, conn, nodes, ips)
            if on_complete:
                for node in nodes:
                    node._prepare_on_complete(on_complete)
            try:
                sent = transfer.upload(conn, [script_path, *crimpl_files, *inputs], job_dir(root, name),
                                       quiet=quiet, store=server.store_dir, store_cap=server.store_cap)
            except TransferError as exc:
                raise TransferError(f"{exc} (job {name} was not started: submit again with "
                                    f"job_name={name!r} to complete it)") from exc
            report = FanOutReport(**vars(sent))
            report.fanout_bytes = fan_out(conn, root, name, ips)
            server._start(conn, name, again=False, allow_concurrent=allow_concurrent)
    sources = ([script_path] if entry != protocol.COMMANDS_SCRIPT else []) + inputs
    job = Job(server, name, sources=sources)
    job.upload_report = report
    return job


def resubmit(server, job, files=None, *, allow_concurrent: bool = False, quiet: bool = False) -> Job:
    """Run a cluster job again in place on every node; see :meth:`crimpl.jobs.JobsMixin.resubmit`.

    Changed ``files`` go to rank 0, which copies the job's files on to the other nodes again.
    """
    from .. import transfer

    if not isinstance(job, Job):
        job = Job(server, job)
    if files is not None:
        files = _check_files(files, None)
    with server.session(start=True) as conn:
        status = server._read_statuses(conn, [job.job_name]).get(job.job_name)
        if status is None:
            raise JobError(f"no job {job.job_name} on {server}: `jobs` lists the jobs there")
        if status.state == "running":
            raise JobError(f"job {job.job_name} is still running: kill it before resubmitting")
        nodes, ips = _nodes_and_ips(server)
        prepare_nodes(server, conn, nodes, ips)
        report = FanOutReport()
        if files:
            sent = transfer.upload(conn, files, job.job_dir, quiet=quiet, store=server.store_dir,
                                   store_cap=server.store_cap)
            report = FanOutReport(**vars(sent))
        report.fanout_bytes = fan_out(conn, server.job_root, job.job_name, ips)
        server._start(conn, job.job_name, again=True, allow_concurrent=allow_concurrent)
    job.last_status = None
    job.upload_report = report
    return job


# -- status, kill, log ------------------------------------------------------------------------

_LISTING_SCRIPT = r"""
for d in {dirs}; do
  d=${{d%/}}
  [ -f "$d/{cluster_script}" ] || continue
  r=$(crimpl_record "$d/{record_dir}")
  alive=dead
  case $r in *'"running"'*) crimpl_job_pid "$d/{record_dir}" > /dev/null && alive=alive;; esac
  if [ -e "$d/{record_dir}/killed" ]; then k=killed; else k=-; fi
  ranks=$(head -c 65536 "$d/{record_dir}/ranks" 2> /dev/null | tr '\n' ';')
  printf '=cluster\t%s\t%s\t%s\t%s\t%s\n' "${{d##*/}}" "$alive" "$k" "$ranks" "$r"
done
"""


def read_statuses(conn, root: str, statuses: dict) -> dict:
    """Return ``statuses`` (``{job_name: JobStatus}`` as the protocol reads them on rank 0) with
    each cluster job's replaced by its supervisor's (:class:`ClusterJobStatus`)."""
    if not statuses:
        return statuses
    dirs = " ".join(shlex.quote(job_dir(root, n)) for n in statuses)
    result = run(conn, protocol.SHELL_FUNCTIONS + _LISTING_SCRIPT.format(
        dirs=dirs, cluster_script=CLUSTER_SCRIPT, record_dir=RECORD_DIR))
    for line in result.stdout.splitlines():
        parts = line.split("\t", 5)
        if len(parts) != 6 or parts[0] != "=cluster" or parts[1] not in statuses:
            continue
        _, name, alive, killed, ranks, record = parts
        statuses[name] = cluster_status(statuses[name], record, alive == "alive", killed == "killed",
                                        parse_ranks(ranks))
    return statuses


def parse_ranks(text: str) -> list:
    """Return the :class:`RankStatus` list of a ``ranks`` file (lines joined by ``;``)."""
    ranks = []
    for item in text.replace(";", "\n").splitlines():
        words = item.split()
        if len(words) >= 2 and words[0].isdigit() and words[1] in RANK_STATES:
            code = int(words[2]) if len(words) > 2 and words[2].isdigit() else None
            ranks.append(RankStatus(int(words[0]), words[1], code))
    return ranks


def cluster_status(rank0: JobStatus, record: str, alive: bool, killed: bool, ranks: list) -> ClusterJobStatus:
    """The status of a cluster job from its supervisor's record, rank 0's status and the ranks' ends."""
    fields = protocol.parse_record(record, alive, killed)
    if fields["state"] == "not-submitted":
        # The supervisor has not recorded itself yet: rank 0 waits for it before its script starts.
        if rank0.state in ("running", "not-submitted", "unknown"):
            return ClusterJobStatus(rank0.state, started=rank0.started, detail=rank0.detail)
        return ClusterJobStatus("failed", exit_code=rank0.exit_code, started=rank0.started, ended=rank0.ended,
                                detail="the job's supervisor never started on rank 0")
    if fields["state"] == "failed" and "detail" in fields:
        fields["detail"] = ("its supervisor on rank 0 ended without recording an end "
                            "(was rank 0 restarted?); `crimpl kill` ends the ranks left")
    status = ClusterJobStatus(**fields, ranks=ranks)
    if not status.detail and status.state != "running":
        status.detail = describe_ranks(ranks)
    return status


def describe_ranks(ranks: list) -> str:
    """One line on how the ranks ended: ``rank 1 exit 3; ranks 0, 2 killed (exit 143, 143)``."""
    if not ranks:
        return ""
    if all(r.state == "complete" for r in ranks):
        return f"all {len(ranks)} ranks complete"
    parts = []
    for r in ranks:
        if r.state == "failed":
            parts.append(f"rank {r.rank} exit {r.exit_code if r.exit_code is not None else 'unknown'}")
        elif r.state == "lost":
            parts.append(f"rank {r.rank} lost (its node stopped answering)")
        elif r.state == "not-started":
            parts.append(f"rank {r.rank} did not start")
    for state in ("killed", "complete"):
        group = [r for r in ranks if r.state == state]
        if group:
            which = ", ".join(str(r.rank) for r in group)
            codes = ", ".join("-" if r.exit_code is None else str(r.exit_code) for r in group)
            label = "rank" if len(group) == 1 else "ranks"
            parts.append(f"{label} {which} {state}" + (f" (exit {codes})" if state == "killed" else ""))
    return "; ".join(parts)


def kill(conn, root: str, name: str) -> bool | None:
    """End every rank of cluster job ``name``.

    :returns: True if it was running, False if not; None if ``name`` is not a cluster job
        (a job of one node: :func:`protocol.kill` ends it).
    """
    script = (f"cd {shlex.quote(job_dir(root, name))} || exit 3\n"
              f"if [ -f {CLUSTER_SCRIPT} ]; then exec sh {CLUSTER_SCRIPT} kill; fi\necho one-node")
    result = protocol._checked(run(conn, script), f"killing job {name}")
    if result.stdout.strip() == "one-node":
        return None
    return result.stdout.strip().endswith("killed")


# Follows rank 0's log while the cluster job's supervisor runs (the other ranks may run on
# after rank 0 ended).
_FOLLOW_SCRIPT = r"""
cd {job_dir} || exit 3
# Rank 0 starts its script once the supervisor recorded itself: wait for that record.
i=0
while [ -f {cluster_script} ] && [ ! -s {record_dir}/{status} ] && crimpl_running . && [ $i -lt 200 ]; do
  sleep 0.05; i=$((i+1))
done
# A job of one node (submitted before the server had several) is followed while its wrapper runs.
if pid=$(crimpl_job_pid {record_dir}) || pid=$(crimpl_job_pid .); then
  [ -e {log} ] || : > {log}
  exec tail -c +{start} -s 0.5 -F --pid="$pid" {log}
fi
[ -e {log} ] || exit 0
exec tail -c +{start} {log}
"""


def stream_log(conn, root: str, name: str, offset: int = 0):
    """Yield cluster job ``name``'s rank 0 log from byte ``offset`` until every rank ended
    (see :func:`protocol.stream_log`)."""
    script = protocol.SHELL_FUNCTIONS + _FOLLOW_SCRIPT.format(
        job_dir=shlex.quote(job_dir(root, name)), cluster_script=CLUSTER_SCRIPT, record_dir=RECORD_DIR,
        status=STATUS, log=LOG, start=offset + 1)
    return protocol.stream_log(conn, root, name, offset=offset, script=script)


# -- one rank's, or every rank's, log and outputs -------------------------------------------------


def _ranks_wanted(server, rank, all_ranks):
    nodes = server.nodes
    if all_ranks:
        return nodes
    rank = 0 if rank is None else rank
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < len(nodes):
        raise JobError(f"rank must be a node of {server}, 0 to {len(nodes) - 1}, got {rank!r}")
    return [nodes[rank]]


def _job_name(server, job):
    if job is None or isinstance(job, str):
        job = server.get_job(job)
    return job.job_name


def rank_logs(server, job=None, *, rank: int | None = None, all_ranks: bool = False) -> str:
    """Return a job's log on node ``rank`` (default 0), or every rank's, each line prefixed ``[rank R] ``.

    :param job: a :class:`~crimpl.jobs.Job` or job name; default the latest job.
    :raises JobError: for a rank the server does not have.
    """
    name = _job_name(server, job)
    texts = []
    for node in _ranks_wanted(server, rank, all_ranks):
        with node.session(start=False) as conn:
            text = protocol.read_log(conn, server.job_root, name)
        if all_ranks:
            text = "".join(f"[rank {node.rank}] {line}" for line in text.splitlines(keepends=True))
            if text and not text.endswith("\n"):
                text += "\n"
        texts.append(text)
    return "".join(texts)


def check_output(server, server_path, local_path=".", *, job=None, quiet: bool = False,
                 rank: int | None = None, all_ranks: bool = False):
    """Copy a job's outputs from node ``rank`` (default 0), or from every node into ``rank-R/`` folders.

    See :meth:`crimpl.jobs.JobsMixin.check_output` for ``server_path`` and ``local_path``.

    :returns: the transfer report (with ``all_ranks``: ``{rank: report}``).
    """
    from .. import transfer

    name = _job_name(server, job)
    reports = {}
    for node in _ranks_wanted(server, rank, all_ranks):
        dest = local_path
        if all_ranks:
            dest = os.path.join(os.fspath(local_path), f"rank-{node.rank}") + os.sep
        with node.session(start=True) as conn:
            reports[node.rank] = transfer.download(conn, job_dir(server.job_root, name), server_path, dest,
                                                   quiet=quiet)
    return reports if all_ranks else next(iter(reports.values()))
