"""The local sandbox: a real EC2 endpoint (moto_server) and real OpenSSH servers on loopback.

Used by the test fixtures (``tests/conftest.py``), the benchmarks and the
``invoke sandbox`` demo. Everything listens on 127.0.0.1 only, and the SSH
config it writes ends with a catch-all that sends any other host to a closed
loopback port, so no test traffic can leave the machine.
"""

import base64
import ctypes
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import boto3

CANONICAL = "099720109477"
REGION = "us-east-1"
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


#: The networks test configs open SSH to: a documentation address (RFC 5737), so that
#: crimpl never has to look up the caller's address.
SSH_CIDRS = ["203.0.113.7/32"]


def session_pids(listener_pid):
    """Every process below the sshd listener: the per-connection sshd, its shell, tar."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [listener_pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def processes_with(text):
    """Pids whose command line contains ``text`` (bytes), this process excepted."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int(entry.name) != os.getpid() \
                    and text in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def kill_sessions(sshd):
    """SIGKILL every process of the sshd's open connections (the listener stays)."""
    for pid in session_pids(sshd.process.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

def cut_after_first_mib(conn, how, sshd):
    """Return a transfer callback that breaks the connection once 1 MiB has moved.

    :param how: "client drops the connection", or anything else to kill the server's sessions.
    """

    def interrupt(done, total):
        if done > 2**20:
            if how == "client drops the connection":
                conn.client.get_transport().close()
            else:
                kill_sessions(sshd)

    return interrupt


class Background:
    """Run ``call`` in a thread; ``done``, ``result`` and ``error`` tell how it went."""

    def __init__(self, call):
        self.done, self.result, self.error = False, None, None

        def body():
            try:
                self.result = call()
            except Exception as exc:  # noqa: BLE001 - the test looks at it
                self.error = exc
            finally:
                self.done = True

        threading.Thread(target=body, daemon=True).start()


def free_port():
    """Return a TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def die_with_parent():
    """In a child process (``preexec_fn``): get SIGTERM when the parent dies, even by SIGKILL.

    Linux's ``PR_SET_PDEATHSIG`` fires when the *thread* that started the child
    ends, so use it only for children started from a process's main thread.
    """
    PR_SET_PDEATHSIG = 1  # noqa: N806 - <sys/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def wait_until(predicate, timeout, interval=0.05, what="condition"):
    """Poll ``predicate`` until it returns a truthy value, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        time.sleep(interval)


def _ami(ami_id, name, created, arch="x86_64", owner=CANONICAL, description=""):
    return {
        "ami_id": ami_id,
        "name": name,
        "description": description or name,
        "owner_id": owner,
        "public": True,
        "virtualization_type": "hvm",
        "architecture": arch,
        "state": "available",
        "platform": None,
        "image_type": "machine",
        "hypervisor": "xen",
        "root_device_name": "/dev/sda1",
        "root_device_type": "ebs",
        "sriov": "simple",
        "creation_date": created,
    }


#: A realistic image list: several Ubuntu LTS and interim releases, builds of
#: different dates, an arm64 image newer than every amd64 one, and a non-Canonical
#: image named like Ubuntu. The right answer for "current Ubuntu LTS, amd64" is
#: NEWEST_UBUNTU_LTS.
NEWEST_UBUNTU_LTS = "ami-0a5c3558529277641"
AMIS = [
    _ami("ami-0e2c8caa4b6378d8c", "ubuntu/images/hvm-ssd/ubuntu-focal-20.04-amd64-server-20240821", "2024-08-21T09:10:11.000Z"),
    _ami("ami-005fc0f236362e99f", "ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-amd64-server-20241002", "2024-10-02T08:41:52.000Z"),
    _ami("ami-0866a3c8686eaeeba", "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-20240927", "2024-09-27T05:12:08.000Z"),
    _ami(NEWEST_UBUNTU_LTS, "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-20241109", "2024-11-09T04:22:31.000Z"),
    _ami("ami-0c1b2d4a7d6e2f3c1", "ubuntu/images/hvm-ssd-gp3/ubuntu-oracular-24.10-amd64-server-20241120", "2024-11-20T02:01:44.000Z"),
    _ami("ami-0f9de6e2d2f067fca", "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-arm64-server-20241120", "2024-11-20T03:33:10.000Z", arch="arm64"),
    _ami("ami-0d5e0a1c6b1f0c8a2", "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-20241201-copy", "2024-12-01T00:00:00.000Z", owner="123456789012"),
    _ami("ami-063d43db0594b521b", "al2023-ami-2023.6.20241121.0-kernel-6.1-x86_64", "2024-11-21T21:39:40.000Z", owner="137112412989"),
]


def write_amis(path):
    """Write :data:`AMIS` as a ``MOTO_AMIS_PATH`` file and return its path."""
    Path(path).write_text(json.dumps(AMIS, indent=1), encoding="utf-8")
    return Path(path)


class MotoServer:
    """moto_server as a separate process on a loopback port: a real HTTP EC2 endpoint.

    :param die_with_parent: end it when the process that started it dies (see
        :func:`die_with_parent`).
    """

    def __init__(self, workdir, die_with_parent=False):
        self.workdir = Path(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None
        self.die_with_parent = die_with_parent

    def start(self):
        amis = write_amis(self.workdir / "amis.json")
        env = dict(os.environ, MOTO_AMIS_PATH=str(amis))
        self.log = open(self.workdir / "moto_server.log", "wb")
        # cwd: the process can be told apart from another sandbox's by its working folder.
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("moto_launcher.py")),
             "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=self.workdir, preexec_fn=die_with_parent if self.die_with_parent else None,
        )
        wait_until(self._answers, timeout=60, interval=0.1, what="moto_server start")
        return self

    def _answers(self):
        if self.process.poll() is not None:
            raise RuntimeError(f"moto_server exited; see {self.workdir / 'moto_server.log'}")
        try:
            with urllib.request.urlopen(f"{self.url}/moto-api/data.json", timeout=2):
                return True
        except OSError:
            return False

    def reset(self):
        """Forget every resource (``POST /moto-api/reset``)."""
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def environ(self):
        """Return the environment that points boto3 at this server with dummy credentials."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
        }

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def make_client_key(directory):
    """Create an ed25519 login key pair in ``directory`` (private 0600) and return its path."""
    key = Path(directory) / "id_ed25519"
    if not key.exists():
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "crimpl-test", "-f", str(key)],
            check=True,
        )
    return key


class Sshd:
    """OpenSSH's sshd on a loopback port with its own config, host key and authorized_keys.

    Its port and host key stay the same across :meth:`stop` and :meth:`start`,
    as an instance's do across a stop and start. As on Ubuntu, crimpl can
    replace the host key over SSH (``crimpl.hostkeys.rotate``): ``SetEnv``
    tells its script where this server's key and pid file are.

    :param home: give the sessions this folder as their home and working folder
        (an instance's own disk) instead of the login user's home on this machine.
    :param die_with_parent: end sshd when the thread that started it ends (see
        :func:`die_with_parent`).
    :param env: more variables its sessions get (``SetEnv``), e.g. a login node's ``SLURM_CONF``.
    :param listen: more ``address:port`` to listen on, e.g. a cluster node's private IP and port 22.
    """

    def __init__(self, workdir, host_private_pem, authorized_public, port=None, home=None,
                 die_with_parent=False, env=None, listen=()):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host_key = self.workdir / "ssh_host_ed25519_key"
        self.host_key.write_text(host_private_pem, encoding="utf-8")
        self.host_key.chmod(0o600)
        self.authorized_keys = self.workdir / "authorized_keys"
        self.authorized_keys.write_text(authorized_public.strip() + "\n", encoding="utf-8")
        self.authorized_keys.chmod(0o600)
        self.config = self.workdir / "sshd_config"
        self.pid_file = self.workdir / "sshd.pid"
        self.home = Path(home) if home else None
        self.die_with_parent = die_with_parent
        self.env = dict(env or {})
        self.listen = list(listen)
        self.process = None

    def _login_lines(self):
        if self.home is None:
            return ""
        self.home.mkdir(parents=True, exist_ok=True)
        login = self.workdir / "login.sh"
        # sshd starts every session in the user's home from /etc/passwd, shared by
        # every sandbox instance; this wrapper moves it to the instance's own home.
        login.write_text(
            "#!/bin/sh\n"
            f"HOME={shlex.quote(str(self.home))}; export HOME\n"
            'cd "$HOME" || exit 1\n'
            'if [ -z "${SSH_ORIGINAL_COMMAND+set}" ]; then exec "$SHELL" -l; fi\n'
            'exec "$SHELL" -c "$SSH_ORIGINAL_COMMAND"\n',
            encoding="utf-8",
        )
        login.chmod(0o755)
        return f"ForceCommand {login}\n"

    def start(self, wait=True):
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        self.config.write_text(
            f"Port {self.port}\n"
            "ListenAddress 127.0.0.1\n"
            + "".join(f"ListenAddress {address}\n" for address in self.listen) +
            f"HostKey {self.host_key}\n"
            f"AuthorizedKeysFile {self.authorized_keys}\n"
            f"PidFile {self.pid_file}\n"
            f"SetEnv CRIMPL_HOST_KEY_FILE={self.host_key} CRIMPL_SSHD_PIDFILE={self.pid_file}"
            + "".join(f" {name}={value}" for name, value in self.env.items()) + "\n"
            + self._login_lines() +
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "MaxStartups 100:30:200\n"
            "MaxSessions 50\n"
            "AcceptEnv LANG LC_*\n"
            "Subsystem sftp internal-sftp\n",
            encoding="utf-8",
        )
        self.log = open(self.workdir / "sshd.log", "ab")
        self.process = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(self.config)],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir,
            start_new_session=True, preexec_fn=die_with_parent if self.die_with_parent else None,
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout=20):
        def banner():
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd exited: {(self.workdir / 'sshd.log').read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    return sock.recv(4).startswith(b"SSH-")
            except OSError:
                return False

        wait_until(banner, timeout=timeout, what="sshd start")

    def stop(self):
        if self.process and self.process.poll() is None:
            # sshd runs in its own session: end it and the per-connection children it forked.
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if getattr(self, "log", None):
            self.log.close()


def start_pinned_sshd(workdir, sshd_class=Sshd):
    """Start an sshd in ``workdir`` with a new login key and ed25519 host key.

    The returned server carries ``client_key`` (the login key's path) and
    ``host_public`` (the host key's public line, to pin).
    """
    from crimpl.hostkeys import generate_host_key

    key = make_client_key(workdir)
    private, public = generate_host_key()
    server = sshd_class(workdir / "sshd", private, key.with_suffix(".pub").read_text()).start()
    server.client_key = key
    server.host_public = public
    return server


class SSHRoutes:
    """An OpenSSH config file that routes instance addresses to loopback sshd ports.

    This is how a user routes through a bastion; here every route ends on
    127.0.0.1. A final ``Host *`` sends every other name to a closed port, so a
    wrong address fails fast instead of leaving the machine.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.routes = {}
        self.closed_port = free_port()
        self.write()

    def add(self, host, port, user=None):
        self.routes[host] = (port, user)
        self.write()

    def write(self):
        lines = []
        for host, (port, user) in self.routes.items():
            lines += [f"Host {host}", "  HostName 127.0.0.1", f"  Port {port}"]
            if user:
                lines.append(f"  User {user}")
        lines += ["Host *", "  HostName 127.0.0.1", f"  Port {self.closed_port}", ""]
        self.path.write_text("\n".join(lines), encoding="utf-8")


def moto_client(endpoint_url):
    """Return a boto3 EC2 client for moto_server at ``endpoint_url``, with its dummy credentials."""
    return boto3.client("ec2", region_name=REGION, endpoint_url=endpoint_url,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def instance_addresses(instance_id, endpoint_env):
    """Return the public and private IP of ``instance_id`` as moto_server reports them."""
    ec2 = moto_client(endpoint_env["AWS_ENDPOINT_URL"])
    inst = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    return [ip for ip in (inst.get("PublicIpAddress"), inst.get("PrivateIpAddress")) if ip]


def host_key_from_user_data(user_data):
    """Return ``(private_pem, public_line)`` from crimpl's cloud-config user data, or None.

    This is what cloud-init does with crimpl's ``ssh_keys``; the sandbox uses it
    to start an instance's sshd with the key from its user data.
    """
    if not user_data or "ed25519_private: |" not in user_data:
        return None
    lines = user_data.splitlines()
    start = lines.index("  ed25519_private: |") + 1
    private_lines = []
    for line in lines[start:]:
        if not line.startswith("    "):
            break
        private_lines.append(line[4:])
    public = next(
        line.split(":", 1)[1].strip() for line in lines if line.startswith("  ed25519_public:")
    )
    return "\n".join(private_lines) + "\n", public


def user_data_host_key(ec2, instance_id):
    """Return the host key pair in the instance's user data, read back via EC2, or None."""
    attr = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    value = attr.get("UserData", {}).get("Value")
    return host_key_from_user_data(base64.b64decode(value).decode() if value else "")


def instance_host_key(instance_id, endpoint_env):
    """Return the host private key crimpl put in the instance's user data, read back via EC2."""
    private, _public = user_data_host_key(moto_client(endpoint_env["AWS_ENDPOINT_URL"]), instance_id)
    return private


# ---------------------------------------------------------------------------
# The sandbox as a service: `python tests/sandbox.py --dir DIR` (or `invoke sandbox`)


class LoopbackHTTPServer:
    """A small HTTP server on 127.0.0.1 in a thread; ``handler`` is a BaseHTTPRequestHandler class."""

    def __init__(self, handler):
        import http.server
        import threading

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


class StaticHTTPServer(LoopbackHTTPServer):
    """Answers a GET of ``path`` (every path when None) with ``body``, others with 404; records the paths asked."""

    def __init__(self, body: str | bytes, path: str | None = None):
        import http.server

        data = body.encode() if isinstance(body, str) else body
        self.paths = []
        served = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                served.paths.append(self.path)
                self.send_response(200 if path in (None, self.path) else 404)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        super().__init__(Handler)


class CheckIP(StaticHTTPServer):
    """A loopback stand-in for checkip.amazonaws.com: answers every GET with ``body``."""

    def __init__(self, body="127.0.0.1\n"):
        super().__init__(body)
        self.url += "/"


class Sandbox:
    """moto_server plus one sshd per crimpl instance, kept in step with EC2.

    Every ``interval`` seconds it looks at the crimpl instances moto_server
    knows. An instance it sees for the first time gets its own sshd port, home
    folder and SSH routes for its addresses at once, even before it runs, as a
    real instance's address and port 22 are fixed from its launch; its sshd uses
    the host key from the user data, as cloud-init would install it. A running
    instance's sshd is started; a stopped one's is stopped (its port then
    refuses, its key and home stay), a terminated one's is removed.

    :param die_with_parent: end moto_server and every sshd when this process dies
        (call :meth:`sync` from the main thread then).
    """

    def __init__(self, directory, interval=0.3, die_with_parent=False):
        import getpass

        self.moto = self.checkip = None
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.interval = interval
        self.die_with_parent = die_with_parent
        self.user = getpass.getuser()
        self.sshds = {}
        self.env_file = self.dir / "env.sh"
        # A stale env.sh would point at a server that is gone; it reappears once this one is up.
        self.env_file.unlink(missing_ok=True)
        # The instances of an earlier sandbox in this folder are gone with its moto_server.
        for old in self.dir.glob("sshd-i-*"):
            shutil.rmtree(old, ignore_errors=True)

    def start(self):
        self.moto = MotoServer(self.dir, die_with_parent=self.die_with_parent).start()
        self.checkip = CheckIP()
        self.key = make_client_key(self.dir)
        self.routes = SSHRoutes(self.dir / "ssh_config")
        self.env = {**self.moto.environ(), "CRIMPL_SSH_CONFIG": str(self.routes.path),
                    "CRIMPL_CHECKIP_URL": self.checkip.url}
        return self

    def write_env(self):
        """Write ``env.sh`` (whole, at once): its existence means the sandbox is ready."""
        lines = [f"export {k}={shlex.quote(v)}" for k, v in self.env.items()]
        tmp = self.env_file.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.replace(self.env_file)

    def stack_yaml(self, nprocs=2):
        """Return a ``Pulumi.<stack>.yaml`` whose server the sandbox can serve."""
        return (
            "# A stack for the local sandbox (moto_server + sshd); see README.\n"
            "config:\n"
            "  aws:region: us-east-1\n"
            f"  crimpl:keyFile: {self.key}\n"
            f"  crimpl:username: {self.user}\n"
            f"  crimpl:nprocs: {nprocs}\n"
            "  crimpl:sshTimeout: 60\n"
        )

    def sync(self):
        """Bring the sshd servers and routes in line with the instances, once."""
        ec2 = moto_client(self.moto.url)
        pages = ec2.describe_instances(Filters=[{"Name": "tag:crimpl:managed", "Values": ["true"]}])
        for reservation in pages["Reservations"]:
            for inst in reservation["Instances"]:
                iid, state = inst["InstanceId"], inst["State"]["Name"]
                if state in ("terminated", "shutting-down"):
                    if iid in self.sshds:
                        self.sshds.pop(iid).stop()
                    continue
                if iid not in self.sshds:
                    host_key = user_data_host_key(ec2, iid)
                    if host_key is None:
                        continue  # no host key in its user data: cloud-init would not start sshd either
                    workdir = self.dir / f"sshd-{iid}"
                    self.sshds[iid] = Sshd(workdir, host_key[0], self.key.with_suffix(".pub").read_text(),
                                           home=workdir / "home", die_with_parent=self.die_with_parent)
                sshd = self.sshds[iid]
                for address in (inst.get("PublicIpAddress"), inst.get("PrivateIpAddress")):
                    if address and self.routes.routes.get(address, (None,))[0] != sshd.port:
                        self.routes.add(address, sshd.port)
                running = sshd.process is not None and sshd.process.poll() is None
                if state == "running" and not running:
                    sshd.start()
                elif state != "running" and running:
                    sshd.stop()

    def serve(self, seconds):
        """Keep in step with EC2 for at most ``seconds``, then stop."""
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                self.sync()
                time.sleep(self.interval)
        finally:
            self.stop()

    def stop(self):
        """Stop every sshd, the check-ip server and moto_server; remove ``env.sh``. Safe to repeat."""
        self.env_file.unlink(missing_ok=True)
        for sshd in self.sshds.values():
            sshd.stop()
        self.sshds.clear()
        for part in ("checkip", "moto"):
            if getattr(self, part, None) is not None:
                getattr(self, part).stop()
                setattr(self, part, None)


# ---------------------------------------------------------------------------
# The command line: foreground, --background, --stop


def _moto_missing():
    try:
        import moto.server  # noqa: F401 - only to tell whether it is installed
    except ImportError:
        return True
    return False


def _sandbox_pid(directory):
    """Return the pid of the sandbox serving ``directory``, or None."""
    try:
        pid = int((Path(directory) / "sandbox.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"sandbox.py" in cmdline else None


def process_alive(pid):
    """Tell whether process ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop_sandbox(directory, timeout=30):
    """Stop the sandbox serving ``directory`` (SIGTERM, then SIGKILL); return whether one ran."""
    pid = _sandbox_pid(directory)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    try:
        wait_until(lambda: not process_alive(pid), timeout=timeout, interval=0.1, what="sandbox exit")
    except TimeoutError:
        # Its children get SIGTERM from the kernel when it dies (die_with_parent).
        os.kill(pid, signal.SIGKILL)
    (Path(directory) / "sandbox.pid").unlink(missing_ok=True)
    return True


def start_in_background(argv, directory, timeout=120):
    """Start the sandbox as its own process, detached from this terminal; return once it is ready.

    :raises SystemExit: with the end of its log if it exits before it is ready.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / "sandbox.log"
    env_file = directory / "env.sh"
    env_file.unlink(missing_ok=True)
    with open(log_path, "wb") as log:
        # Its own session, and no pipe of the caller held open: the caller's shell (or
        # invoke, which waits for its pipes to close) gets control back.
        child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv],
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)

    def ready():
        if child.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise SystemExit(f"crimpl: error: the sandbox exited before it was ready: {tail[0]} "
                             f"(log: {log_path})")
        return env_file.exists()

    try:
        wait_until(ready, timeout=timeout, interval=0.1, what="sandbox start")
    except TimeoutError:
        child.terminate()
        raise SystemExit(f"crimpl: error: the sandbox was not ready after {timeout} s "
                         f"(log: {log_path})") from None
    return child.pid


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(
        description="Run crimpl's local sandbox: a loopback EC2 endpoint and an sshd per instance.")
    parser.add_argument("--dir", default="/tmp/crimpl-sandbox", help="working folder (env.sh lands here)")
    parser.add_argument("--minutes", type=float, default=60, help="stop by itself after this long")
    parser.add_argument("--stack-file", help="also write a Pulumi.<stack>.yaml for the sandbox here")
    parser.add_argument("--background", action="store_true",
                        help="run detached; return once env.sh is written")
    parser.add_argument("--stop", action="store_true", help="stop the sandbox running in --dir")
    args = parser.parse_args(argv)
    directory = Path(args.dir).resolve()
    if args.stop:
        print("sandbox stopped" if stop_sandbox(directory) else f"no sandbox running in {directory}")
        return
    if _moto_missing():
        raise SystemExit("crimpl: error: the sandbox needs moto: pip install -e '.[sandbox]'")
    # One sandbox per folder: a second start replaces the first.
    stop_sandbox(directory)
    if args.background:
        rest = ["--dir", str(directory), "--minutes", str(args.minutes)]
        if args.stack_file:
            rest += ["--stack-file", str(Path(args.stack_file).resolve())]
        start_in_background(rest, directory)
        folder = "" if directory == Path(parser.get_default("dir")).resolve() else f" --folder {directory}"
        print(f"sandbox ready for {args.minutes:g} min: . {directory / 'env.sh'}; "
              f"stop it with `invoke sandbox --stop{folder}`", flush=True)
        return
    serve_forever(directory, args.minutes, args.stack_file)


def interrupt_on_signals():
    """Make SIGTERM and SIGINT raise KeyboardInterrupt in this process, once: a second signal
    must not interrupt the cleanup the first one starts."""

    def stop_on_signal(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_on_signal)
    signal.signal(signal.SIGINT, stop_on_signal)


def serve_forever(directory, minutes, stack_file=None):
    """Run the sandbox in this process until ``minutes`` pass, SIGTERM or SIGINT."""

    interrupt_on_signals()
    sandbox = Sandbox(directory, die_with_parent=True)
    pid_file = sandbox.dir / "sandbox.pid"
    pid_file.write_text(str(os.getpid()), encoding="utf-8")
    try:
        sandbox.start()
        if stack_file:
            Path(stack_file).write_text(sandbox.stack_yaml(), encoding="utf-8")
        sandbox.write_env()
        print(f"sandbox ready for {minutes:g} min: . {sandbox.env_file}", flush=True)
        sandbox.serve(minutes * 60)
    except KeyboardInterrupt:
        pass
    finally:
        sandbox.stop()
        if _sandbox_pid(directory) == os.getpid():
            pid_file.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
