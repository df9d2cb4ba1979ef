"""The watchdog (crimpl/watchdog.py), run for real on this machine against a sandbox instance.

Each instance gets its own sshd and home folder, as in the sandbox service; the watchdog
runs there as cloud-init or ``crimpl autostop`` starts it, with its look interval
shortened through its config file. Its shutdown command is replaced by one that records
the call and asks moto_server to stop or terminate the instance, as EC2 does on an
instance-initiated shutdown (the instance's InstanceInitiatedShutdownBehavior decides).
Every wait polls the watchdog's own status record, with a bound.
"""

import subprocess
import threading
import time

import boto3
import pytest
import yaml
from sandbox import wait_until

import crimpl
from crimpl import watchdog
from crimpl.config import config_from_stack
from crimpl.errors import ConfigError

TICK = 0.2


def _now():
    return int(time.time())


def _final_state(server, wanted):
    wait_until(lambda: server.state == wanted, timeout=30, what=f"instance {wanted}")


# -- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize("values, message", [
    ({"autostop": "0"}, "autostop must be a duration such as 30m"),
    ({"autostop": "0m"}, "autostop must be longer than 0"),
    ({"autostop": "-5m"}, "autostop must be a duration such as 30m"),
    ({"autostop": "abc"}, "autostop must be a duration such as 30m"),
    ({"max_lifetime": "10x"}, "max_lifetime must be a duration"),
    ({"autostop": "30m", "max_lifetime": "10m"}, "max_lifetime 10m is shorter than autostop 30m"),
])
def test_bad_autostop_values_are_one_line_config_errors(key_file, values, message):
    with pytest.raises(ConfigError, match=message) as caught:
        crimpl.AWSEC2_Config(KeyFile=str(key_file), **values)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("values, message", [
    ({"autostop": "0"}, "crimpl:autostop must be a duration"),
    ({"autostop": "-5m"}, "crimpl:autostop must be a duration"),
    ({"autostop": "abc"}, "crimpl:autostop must be a duration"),
    ({"autostop": "2h", "maxLifetime": "1h"}, "crimpl:maxLifetime 1h is shorter than autostop 2h"),
])
def test_bad_autostop_stack_values_name_the_stack_key(key_file, values, message):
    with pytest.raises(ConfigError, match=message) as caught:
        config_from_stack({"keyFile": str(key_file), **values}, source="Pulumi.dev.yaml")
    assert str(caught.value).startswith("Pulumi.dev.yaml: ")
    assert "\n" not in str(caught.value)


def test_stack_keys_set_autostop_lifetime_and_terminate(key_file):
    config, _, _ = config_from_stack({"keyFile": str(key_file), "autostop": "30m", "maxLifetime": "12h",
                                      "autostopDown": True})
    assert (config.autostop, config.max_lifetime, config.autostop_down) == ("30m", "12h", True)


def test_user_data_installs_the_watchdog_and_its_unit_beside_the_host_key(key_file):
    from crimpl.config import build_spec

    config = crimpl.AWSEC2_Config(KeyFile=str(key_file), autostop="30m", max_lifetime="12h", autostop_down=True)
    spec = build_spec(config, nprocs=2, server_name="ud")
    data = yaml.safe_load(spec.user_data)
    assert data["ssh_keys"]["ed25519_public"] == spec.host_public_key
    files = {f["path"]: f for f in data["write_files"]}
    folder = "/home/ubuntu/crimpl/watchdog"
    assert files[f"{folder}/watchdog.sh"]["content"] == watchdog.render_script()
    assert "AUTOSTOP=1800\n" in files[f"{folder}/autostop.conf"]["content"]
    assert "SHUTDOWN='sudo shutdown -h now'" in files[f"{folder}/autostop.conf"]["content"]
    assert files[f"{folder}/lifetime.conf"]["content"] == "LIFETIME=43200\n"
    assert all(files[f"{folder}/{n}"]["owner"] == "ubuntu:ubuntu" and files[f"{folder}/{n}"]["defer"]
               for n in ("watchdog.sh", "autostop.conf", "lifetime.conf"))
    unit = files["/etc/systemd/system/crimpl-watchdog.service"]["content"]
    assert f"ExecStart=/bin/sh {folder}/watchdog.sh" in unit and "User=ubuntu" in unit
    assert ["systemctl", "enable", "--now", "crimpl-watchdog.service"] in data["runcmd"]
    assert spec.shutdown_behavior == "terminate"


# -- on the instance ------------------------------------------------------------------------


def _cloud_init(inst, login_user):
    """Do what cloud-init does with the watchdog part of the user data, in the instance's home.

    The deferred files go to the login user's home (here the sandbox instance's home), and
    the unit's ExecStart runs the watchdog; the unit itself is not installed on this machine.
    """
    ec2 = boto3.client("ec2")
    import base64

    value = ec2.describe_instance_attribute(InstanceId=inst.server.instanceId,
                                            Attribute="userData")["UserData"]["Value"]
    data = yaml.safe_load(base64.b64decode(value).decode())
    home = "/root" if login_user == "root" else f"/home/{login_user}"
    for entry in data["write_files"]:
        if entry.get("defer"):
            path = inst.home / entry["path"][len(home) + 1:]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(entry["content"])
            path.chmod(int(entry["permissions"], 8))


def test_watchdog_stops_the_server_within_a_tick_once_idle(instance):
    inst = instance()
    assert inst.server.set_autostop("1s", tick=TICK) == "detached"
    _final_state(inst.server, "stopped")
    fired = inst.fired()
    assert fired["behavior"] == "stop"
    status = fired["status_at_call"]
    assert status["fired"].startswith("idle for")
    assert status["busy"] == ""
    assert status["checked"] - status["idle_from"] >= 1


def test_autostop_down_terminates_the_server(instance):
    inst = instance()
    inst.server.set_autostop("1s", down=True, tick=TICK)
    _final_state(inst.server, "terminated")
    assert inst.fired()["behavior"] == "terminate"
    assert inst.fired()["status_at_call"]["down"] == "yes"


def test_watchdog_waits_while_a_job_runs_and_stops_after_it(instance):
    inst = instance()
    gate = inst.home / "gate"
    inst.server.submit_script([f"while [ ! -e {gate} ]; do sleep 0.1; done"], job_name="long")
    inst.server.set_autostop("1s", tick=TICK)
    first = inst.looked_past(0, 0, busy="job long")
    inst.looked_past(first["checked"], 3, busy="job long")
    assert inst.fired() is None
    assert inst.server.state == "running"
    gate.touch()
    _final_state(inst.server, "stopped")
    status = inst.fired()["status_at_call"]
    assert status["busy"] == "" and status["fired"].startswith("idle")
    # Idle time counts from the job's end, not from before it.
    assert status["idle_from"] >= first["checked"] + 3


def test_watchdog_waits_while_an_ssh_session_is_open(instance):
    inst = instance()
    # The session opens under a long idle time, so that the time it takes cannot
    # already count as idle; then the idle time becomes 1 s.
    inst.server.set_autostop("1h", tick=TICK)
    session = _open_session(inst)
    try:
        inst.server.set_autostop("1s", tick=TICK)
        # A look after crimpl's own connection of set_autostop has closed.
        first = inst.looked_past(_now(), 0, busy="an SSH session")
        inst.looked_past(first["checked"], 3, busy="an SSH session")
        assert inst.fired() is None
        assert inst.server.state == "running"
    finally:
        session.stdin.write(b"done\n")
        session.stdin.close()
        session.wait(20)
    _final_state(inst.server, "stopped")
    assert inst.fired()["status_at_call"]["idle_from"] >= first["checked"] + 3


def _open_session(inst):
    """Open an OpenSSH session to the instance (host key pinned) and wait until it runs.

    Retried: sshd restarts once when crimpl replaces the user-data host key, and a
    connection made at that moment is refused.
    """
    marker = inst.home / "session-up"
    argv = inst.server.ssh_command()

    def opened():
        session = subprocess.Popen([*argv[:-1], "-tt", argv[-1], f"touch {marker}; read line"],
                                   stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        wait_until(lambda: marker.exists() or session.poll() is not None, timeout=30,
                   what="the SSH session to start or fail")
        return session if marker.exists() else None

    for _ in range(3):
        session = opened()
        if session is not None:
            return session
    raise AssertionError("no SSH session could be opened in 3 tries")


def test_an_upload_in_progress_keeps_the_server_busy(instance):
    inst = instance()
    upload = inst.home / "crimpl" / "jobs" / "j" / ".crimpl-upload-x"
    upload.mkdir(parents=True)
    stop = threading.Event()

    def write():  # as tar does while an upload streams in
        with open(upload / "data", "ab") as f:
            while not stop.wait(0.05):
                f.write(b"x" * 1024)
                f.flush()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        inst.server.set_autostop("1s", tick=TICK)
        first = inst.looked_past(0, 0, busy="a transfer")
        inst.looked_past(first["checked"], 3, busy="a transfer")
        assert inst.fired() is None
    finally:
        stop.set()
        writer.join(5)
    _final_state(inst.server, "stopped")


def test_off_disables_autostop(instance):
    inst = instance()
    gate = inst.home / "gate"
    inst.server.submit_script([f"while [ ! -e {gate} ]; do sleep 0.1; done"], job_name="hold")
    inst.server.set_autostop("1s", tick=TICK)
    inst.looked_past(0, 0, busy="job hold")
    inst.server.set_autostop("off", tick=TICK)
    gate.touch()
    idle = inst.looked_past(0, 0, busy="")
    last = inst.looked_past(idle["checked"], 3, busy="")
    assert last["autostop"] == 0
    assert inst.fired() is None
    assert inst.server.state == "running"
    assert str(inst.server.watchdog_status()).startswith("autostop off")


def test_just_after_a_restart_it_waits_the_whole_idle_time(instance):
    inst = instance()
    inst.server.set_autostop("1h", tick=TICK)
    inst.looked_past(0, 0)
    # The last activity was long ago, as for a server stopped for days and started again.
    (inst.folder / "state" / "active").write_text("1000\n")
    inst.server.set_autostop("2s", tick=TICK)  # restarts it, as a boot does
    _final_state(inst.server, "stopped")
    status = inst.fired()["status_at_call"]
    started = status["started"]
    assert status["idle_from"] == started
    assert status["checked"] - started >= 2


def test_lifetime_set_at_launch_fires_even_during_a_job(instance, login_user):
    inst = instance(max_lifetime="2s")
    _cloud_init(inst, login_user)
    assert (inst.folder / "lifetime.conf").read_text() == "LIFETIME=2\n"
    gate = inst.home / "gate"
    inst.server.submit_script([f"while [ ! -e {gate} ]; do sleep 0.1; done"], job_name="busy")
    # The look interval is shortened through the config; the lifetime from the user data stays.
    inst.server.set_autostop(None, tick=TICK)
    _final_state(inst.server, "stopped")
    status = inst.fired()["status_at_call"]
    assert status["busy"] == "job busy"
    assert status["fired"] == "lifetime of 2s reached"
    assert status["checked"] >= inst.state_value("launched") + 2
    gate.touch()  # the job ends: moto stopping the instance does not end its processes here


def test_status_shows_autostop_and_time_left(instance):
    inst = instance()
    inst.server.set_autostop("1h", tick=TICK)
    inst.looked_past(0, 0)
    shown = inst.server.watchdog_status()
    assert shown.autostop == 3600 and not shown.down and shown.busy in ("", "an SSH session")
    assert 0 < shown.autostop_left <= 3600
    assert shown.lifetime_left is None
    assert str(shown).startswith("autostop 1h (stop)")


def test_status_shows_the_lifetime_left(instance, login_user):
    from cli_helper import run_cli

    inst = instance(max_lifetime="2h", autostop="1h")
    _cloud_init(inst, login_user)
    inst.server.set_autostop("1h", tick=TICK)
    look = inst.looked_past(0, 0)
    assert look["deadline"] == inst.state_value("launched") + 7200
    shown = inst.server.watchdog_status()
    assert 0 < shown.lifetime_left <= 7200
    result = run_cli("status", "--instance-id", inst.server.instanceId)
    assert result.code == 0, result.stderr
    assert "autostop 1h (stop) in " in result.stdout.splitlines()[-1]
    assert "; lifetime ends in " in result.stdout.splitlines()[-1]


# -- the command line -------------------------------------------------------------------------


def test_crimpl_autostop_installs_and_status_shows_it(instance, ec2):
    from cli_helper import run_cli

    inst = instance()
    iid = inst.server.instanceId
    result = run_cli("autostop", "30m", "--down", "--instance-id", iid)
    assert result.code == 0, result.stderr
    assert "autostop 30m (terminate)" in result.stdout
    attr = ec2.describe_instance_attribute(InstanceId=iid, Attribute="instanceInitiatedShutdownBehavior")
    assert attr["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    shown = run_cli("status", "--instance-id", iid)
    assert shown.code == 0, shown.stderr
    assert "autostop 30m (terminate)" in shown.stdout.splitlines()[-1]

    off = run_cli("autostop", "off", "--instance-id", iid)
    assert off.code == 0, off.stderr
    assert "autostop off" in off.stdout
    attr = ec2.describe_instance_attribute(InstanceId=iid, Attribute="instanceInitiatedShutdownBehavior")
    assert attr["InstanceInitiatedShutdownBehavior"]["Value"] == "stop"


@pytest.mark.parametrize("duration", ["0", "abc", "--duration=-5m"])
def test_crimpl_autostop_refuses_a_bad_duration_in_one_line(instance, duration):
    from cli_helper import run_cli

    inst = instance()
    result = run_cli("autostop", duration, "--instance-id", inst.server.instanceId)
    assert result.code == 2
    assert result.stderr.strip().count("\n") == 0
    assert "autostop must be a duration" in result.stderr
    assert not inst.folder.exists()
