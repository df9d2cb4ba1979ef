"""The local sandbox: a real EC2 endpoint (moto_server) and real OpenSSH servers on loopback.

Used by the test fixtures (``tests/conftest.py``), the benchmarks and the
``invoke sandbox`` demo. Everything listens on 127.0.0.1 only, and the SSH
config it writes ends with a catch-all that sends any other host to a closed
loopback port, so no test traffic can leave the machine.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3

CANONICAL = "099720109477"
REGION = "us-east-1"
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def free_port():
    """Return a TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    """moto_server as a separate process on a loopback port: a real HTTP EC2 endpoint."""

    def __init__(self, workdir):
        self.workdir = Path(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self):
        amis = write_amis(self.workdir / "amis.json")
        env = dict(os.environ, MOTO_AMIS_PATH=str(amis))
        self.log = open(self.workdir / "moto_server.log", "wb")
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("moto_launcher.py")),
             "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, env=env,
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
    """OpenSSH's sshd on a loopback port with its own config, host key and authorized_keys."""

    def __init__(self, workdir, host_private_pem, authorized_public, port=None):
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
        self.process = None

    def start(self, wait=True):
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        self.config.write_text(
            f"Port {self.port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {self.host_key}\n"
            f"AuthorizedKeysFile {self.authorized_keys}\n"
            f"PidFile {self.workdir / 'sshd.pid'}\n"
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
        self.log = open(self.workdir / "sshd.log", "wb")
        self.process = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(self.config)],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
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


def instance_addresses(instance_id, endpoint_env):
    """Return the public and private IP of ``instance_id`` as moto_server reports them."""
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=endpoint_env["AWS_ENDPOINT_URL"],
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    inst = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    return [ip for ip in (inst.get("PublicIpAddress"), inst.get("PrivateIpAddress")) if ip]


def instance_host_key(instance_id, endpoint_env):
    """Return the host private key crimpl put in the instance's user data, read back via EC2."""
    import base64

    from crimpl.hostkeys import host_key_from_user_data

    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=endpoint_env["AWS_ENDPOINT_URL"],
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    attr = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    user_data = base64.b64decode(attr["UserData"]["Value"]).decode()
    private, _public = host_key_from_user_data(user_data)
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


class CheckIP(LoopbackHTTPServer):
    """A loopback stand-in for checkip.amazonaws.com: answers every GET with ``body``."""

    def __init__(self, body="127.0.0.1\n"):
        import http.server

        data = body.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        super().__init__(Handler)
        self.url += "/"


class Sandbox:
    """moto_server plus one sshd per running crimpl instance, kept in step with EC2.

    Every ``interval`` seconds it looks at the crimpl instances moto_server
    knows: a running one gets an sshd with the host key from its user data (as
    cloud-init would install it) and SSH routes for its current addresses; a
    stopped or terminated one loses its sshd, as a real instance does.
    """

    def __init__(self, directory, interval=0.3):
        import getpass

        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.interval = interval
        self.user = getpass.getuser()
        self.sshds = {}
        # A stale env.sh would point at a server that is gone; it reappears once this one is up.
        (self.dir / "env.sh").unlink(missing_ok=True)

    def start(self):
        self.moto = MotoServer(self.dir).start()
        self.checkip = CheckIP()
        self.key = make_client_key(self.dir)
        self.routes = SSHRoutes(self.dir / "ssh_config")
        self.env = {**self.moto.environ(), "CRIMPL_SSH_CONFIG": str(self.routes.path),
                    "CRIMPL_CHECKIP_URL": self.checkip.url}
        lines = [f"export {k}={v}" for k, v in self.env.items()]
        (self.dir / "env.sh").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return self

    def stack_yaml(self, nprocs=2):
        """Return a ``Pulumi.<stack>.yaml`` whose server the sandbox can serve."""
        return (
            "# A stack for the local sandbox (moto_server + sshd); see README.\n"
            "config:\n"
            "  aws:region: us-east-1\n"
            f"  crimpl:keyFile: {self.key}\n"
            f"  crimpl:username: {self.user}\n"
            f"  crimpl:nprocs: {nprocs}\n"
            f"  crimpl:remoteDir: {self.dir / 'remote'}\n"
            "  crimpl:sshTimeout: 60\n"
        )

    def sync(self):
        """Bring the sshd servers and routes in line with the instances, once."""
        import base64

        from crimpl.hostkeys import host_key_from_user_data

        ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=self.moto.url,
                           aws_access_key_id="testing", aws_secret_access_key="testing")
        pages = ec2.describe_instances(Filters=[{"Name": "tag:crimpl:managed", "Values": ["true"]}])
        for reservation in pages["Reservations"]:
            for inst in reservation["Instances"]:
                iid, state = inst["InstanceId"], inst["State"]["Name"]
                if state != "running":
                    if iid in self.sshds:
                        self.sshds.pop(iid).stop()
                    continue
                if iid not in self.sshds:
                    attr = ec2.describe_instance_attribute(InstanceId=iid, Attribute="userData")
                    value = attr.get("UserData", {}).get("Value")
                    host_key = host_key_from_user_data(base64.b64decode(value).decode() if value else "")
                    if host_key is None:
                        continue  # no host key in its user data: cloud-init would not start sshd either
                    private, _ = host_key
                    self.sshds[iid] = Sshd(self.dir / f"sshd-{iid}", private,
                                           self.key.with_suffix(".pub").read_text()).start()
                for address in (inst.get("PublicIpAddress"), inst.get("PrivateIpAddress")):
                    if address and self.routes.routes.get(address, (None,))[0] != self.sshds[iid].port:
                        self.routes.add(address, self.sshds[iid].port)

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
        for sshd in self.sshds.values():
            sshd.stop()
        self.sshds.clear()
        self.checkip.stop()
        self.moto.stop()


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(
        description="Run crimpl's local sandbox: a loopback EC2 endpoint and an sshd per instance.")
    parser.add_argument("--dir", default="/tmp/crimpl-sandbox", help="working folder (env.sh lands here)")
    parser.add_argument("--minutes", type=float, default=60, help="stop by itself after this long")
    parser.add_argument("--stack-file", help="also write a Pulumi.<stack>.yaml for the sandbox here")
    args = parser.parse_args(argv)
    sandbox = Sandbox(args.dir).start()
    if args.stack_file:
        Path(args.stack_file).write_text(sandbox.stack_yaml(), encoding="utf-8")
    print(f"sandbox ready for {args.minutes:g} min: . {sandbox.dir / 'env.sh'}", flush=True)
    try:
        sandbox.serve(args.minutes * 60)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
