"""Node-to-node SSH from rank 0, verified, and the fan-out of a job's inputs over it.

The private half of the cluster key is made in memory and sent to rank 0 only; the nodes'
host keys in rank 0's ``known_hosts`` are the ones crimpl pinned itself (see :mod:`crimpl.cluster`).
"""

from __future__ import annotations

import json
import shlex

from .. import hostkeys
from ..errors import JobError
from ..jobs import protocol
from ..jobs.protocol import job_dir, run
from ..transfer.streams import open_stream, opened
from .scripts import RANK_FILE, RECORD_DIR, SSH_DIR

# -- node-to-node SSH -----------------------------------------------------------------------


def _ssh_dir(root: str) -> str:
    return f"{root.rstrip('/')}/{SSH_DIR}"


#: On rank 0, beside the key: the instance ids whose ``authorized_keys`` hold the key, one a line.
AUTHORIZED = "authorized"


def _read_state(conn, root: str) -> tuple[str | None, set, str]:
    """Read rank 0's node-to-node SSH state in one command.

    :returns: the cluster key's public line (None when rank 0 has no key), the
        instance ids it is authorized on, and rank 0's ``known_hosts`` text.
    """
    d = shlex.quote(_ssh_dir(root))
    script = (f"d={d}; [ -s \"$d/id_ed25519\" ] && [ -s \"$d/id_ed25519.pub\" ] || exit 4; "
              "sed 's/^/p /' \"$d/id_ed25519.pub\"; "
              f"sed 's/^/a /' \"$d/{AUTHORIZED}\" 2> /dev/null; sed 's/^/k /' \"$d/known_hosts\" 2> /dev/null; true")
    result = run(conn, script)
    lines = result.stdout.splitlines()
    public = next((line[2:].strip() for line in lines if line.startswith("p ")), "")
    if result.exited != 0 or not hostkeys.keys_from_text(public):
        return None, set(), ""
    authorized = {line[2:].strip() for line in lines if line.startswith("a ")}
    known = "".join(line[2:] + "\n" for line in lines if line.startswith("k "))
    return public, authorized, known


def _make_key(conn, root: str) -> str:
    """Make the cluster key and install it on rank 0; return its public line.

    The private key is made here, in memory, and goes to rank 0 only, through the
    command's stdin (never in a command line): 0600 in a 0700 folder. A new key is
    authorized nowhere yet, so the record of where it is goes.
    """
    d = shlex.quote(_ssh_dir(root))
    private, public = hostkeys.generate_host_key()
    script = (f"umask 077 && mkdir -p {d} && chmod 700 {d} && rm -f {d}/{AUTHORIZED} && "
              f"cat > {d}/id_ed25519.tmp && mv -f {d}/id_ed25519.tmp {d}/id_ed25519 && "
              f"printf '%s\\n' {shlex.quote(public)} > {d}/id_ed25519.pub")
    with opened(open_stream(conn, script)) as stream:
        stream.send(private.encode())
        stream.close_stdin()
        status, stderr = stream.finish()
    if status != 0:
        raise JobError(f"could not install the node-to-node SSH key on rank 0 (exit {status}): "
                       f"{(stderr.strip().splitlines() or ['no output'])[-1]}")
    return public


def _authorize(conn, public: str, server_name: str) -> None:
    """Let the cluster key log in to the node of ``conn`` (its ``~/.ssh/authorized_keys``)."""
    line = shlex.quote(f"{public} crimpl-cluster-{server_name}")
    script = ('set -e; umask 077; mkdir -p "$HOME/.ssh"; f="$HOME/.ssh/authorized_keys"; touch "$f"; '
              f'grep -qxF {line} "$f" || printf \'%s\\n\' {line} >> "$f"')
    result = run(conn, script)
    if result.exited != 0:
        raise JobError(f"could not authorize the node-to-node SSH key on {conn.host} (exit {result.exited}): "
                       f"{(result.stderr.strip().splitlines() or ['no output'])[-1]}")


def _write_ssh_files(conn, root: str, known_hosts: str, authorized: list) -> None:
    """Write rank 0's ``known_hosts`` (the pinned keys by private IP), ``ssh_config`` and its record
    of the nodes the key is authorized on."""
    d = shlex.quote(_ssh_dir(root))
    config = ("Host *\n  User %s\n  Port 22\n  IdentityFile \"%s/id_ed25519\"\n  IdentitiesOnly yes\n"
              "  UserKnownHostsFile \"%s/known_hosts\"\n  GlobalKnownHostsFile /dev/null\n"
              "  StrictHostKeyChecking yes\n  UpdateHostKeys no\n  CheckHostIP no\n  BatchMode yes\n"
              "  ConnectTimeout 10\n  ServerAliveInterval 5\n  ServerAliveCountMax 3\n  LogLevel ERROR\n")
    record = "".join(f"{instance_id}\n" for instance_id in authorized)
    script = (f"set -e; umask 077; mkdir -p {d}; cd {d}; dir=$(pwd); "
              f"printf '%s' {shlex.quote(known_hosts)} > known_hosts.tmp; mv -f known_hosts.tmp known_hosts; "
              f"printf {shlex.quote(config)} \"$(id -un)\" \"$dir\" \"$dir\" > ssh_config.tmp; "
              f"mv -f ssh_config.tmp ssh_config; printf '%s' {shlex.quote(record)} > {AUTHORIZED}.tmp; "
              f"mv -f {AUTHORIZED}.tmp {AUTHORIZED}")
    result = run(conn, script)
    if result.exited != 0:
        raise JobError(f"could not write the node-to-node SSH files on rank 0 (exit {result.exited}): "
                       f"{(result.stderr.strip().splitlines() or ['no output'])[-1]}")


def forget_authorized(conn, root: str) -> None:
    """Drop rank 0's record of where the key is authorized: the next submit authorizes every node again."""
    run(conn, f"rm -f {shlex.quote(_ssh_dir(root) + '/' + AUTHORIZED)}")


def _settled_tags(node) -> dict:
    """``node``'s tags once no host-key replacement is under way on it.

    A first connection starts replacing the host key from the user data; the next one ends
    it. Rank 0 must know only the new key: the old one's private half was readable in the
    user data.
    """
    tags = node.tags
    if len(hostkeys.keys_from_text(tags.get(hostkeys.HOST_KEY_TAG))) > 1:
        with node.session(start=True):
            pass
        tags = node.tags
    return tags


def prepare_nodes(server, conn, nodes, ips) -> None:
    """Make node-to-node SSH from rank 0 work, verified: key, authorized_keys, known_hosts, config.

    What rank 0 already has is read in one command; only nodes the key is not yet
    authorized on (new nodes, or after a new key) are connected to, and rank 0's files
    are written only when they change. A cluster already prepared costs that one command.

    :param conn: the open connection to rank 0.
    :param nodes: every node (rank order), :class:`~crimpl.server.AWSEC2` objects.
    :param ips: their private IPs.
    """
    root = server.job_root
    public, authorized, known_now = _read_state(conn, root)
    if public is None:
        public, authorized = _make_key(conn, root), set()
    name = server.server_name
    for node in nodes:
        if node.instanceId in authorized:
            continue
        if node is nodes[0]:
            _authorize(conn, public, name)
            continue
        # Each node over its own connection, verified with its own pinned key.
        with node.session(start=True) as node_conn:
            _authorize(node_conn, public, name)
    known = "".join(f"{ip} {hostkeys.public_line(key)}\n" for node, ip in zip(nodes, ips)
                    for key in hostkeys.trusted_keys(node.instanceId, _settled_tags(node).get(hostkeys.HOST_KEY_TAG)))
    ids = [node.instanceId for node in nodes]
    if known != known_now or set(ids) != authorized:
        _write_ssh_files(conn, root, known, ids)


# -- fan-out --------------------------------------------------------------------------------

_FANOUT_SCRIPT = r"""
cd {job_dir} || exit 3
if crimpl_running . || crimpl_running {record_dir}; then echo running; exit 0; fi
rm -rf {record_dir}
cfg="$(cd ../../{ssh_dir} && pwd)/ssh_config"
r=1
for ip in {ips}; do
  ( {{ tar --totals -cf - -- {names} 2> .crimpl-fanout-$r.tar; echo $? > .crimpl-fanout-$r.tarcode; }} |
      ssh -F "$cfg" "$ip" {receive} 2> .crimpl-fanout-$r.err
    echo $? > .crimpl-fanout-$r.code ) &
  r=$((r+1))
done
wait
r=1
for ip in {ips}; do
  bytes=$(sed -n 's/^Total bytes written: \([0-9]*\).*/\1/p' .crimpl-fanout-$r.tar)
  why=$(cat .crimpl-fanout-$r.err .crimpl-fanout-$r.tar | grep -v '^Total bytes' | tail -n 1)
  printf 'fanout\t%s\t%s\t%s\t%s\t%s\t%s\n' $r "$ip" "$(cat .crimpl-fanout-$r.code)" \
    "$(cat .crimpl-fanout-$r.tarcode)" "${{bytes:-0}}" "$why"
  rm -f .crimpl-fanout-$r.*
  r=$((r+1))
done
"""


def fan_out(conn, root: str, name: str, ips) -> dict:
    """Copy job ``name``'s uploaded files from rank 0 to every other node, over their network.

    Run on rank 0 (``conn``): one ``tar | ssh <node> tar -x`` per node, all at once.
    What goes is what crimpl uploaded to the job (the top-level names of its
    manifest), not what a run wrote there, and not rank 0's :data:`RANK_FILE`.

    :returns: ``{rank: bytes sent}``.
    :raises JobError: if a copy failed or the job is running.
    """
    from ..transfer import MANIFEST

    directory = job_dir(root, name)
    manifest = run(conn, f"cat {shlex.quote(directory + '/' + MANIFEST)} 2> /dev/null").stdout
    try:
        files = json.loads(manifest)["files"]
    except (ValueError, KeyError, TypeError):
        raise JobError(f"job {name} on rank 0 has no readable upload manifest: "
                       f"submit it again with job_name={name!r}") from None
    names = sorted({rel.split("/", 1)[0] for rel in files} - {RANK_FILE})
    quoted = shlex.quote(directory)
    receive = shlex.quote(f"mkdir -p {quoted} && tar -x -p --no-same-owner -f - -C {quoted}")
    script = protocol.SHELL_FUNCTIONS + _FANOUT_SCRIPT.format(
        job_dir=quoted, record_dir=RECORD_DIR, ssh_dir=SSH_DIR, ips=" ".join(ips[1:]),
        names=" ".join(shlex.quote(n) for n in names), receive=receive)
    result = run(conn, script)
    if result.stdout.strip() == "running":
        raise JobError(f"job {name} is still running: kill it before resubmitting")
    sent = {}
    for line in result.stdout.splitlines():
        parts = line.split("\t")
        if len(parts) != 7 or parts[0] != "fanout":
            continue
        _, rank, ip, ssh_code, tar_code, size, why = parts
        if ssh_code != "0" or tar_code != "0":
            # A node may have lost the key since it was recorded there: authorize every node again next time.
            forget_authorized(conn, root)
            raise JobError(f"copying job {name}'s inputs from rank 0 to node {rank} ({ip}) failed "
                           f"({why.strip() or f'exit {ssh_code}'}); it was not started: submit again "
                           f"with job_name={name!r}")
        sent[int(rank)] = int(size)
    if len(sent) != len(ips) - 1:
        raise JobError(f"copying job {name}'s inputs to the other nodes failed on rank 0 "
                       f"(exit {result.exited}): {(result.stderr.strip().splitlines() or ['no output'])[-1]}")
    return sent
