"""The invoke tasks as the user runs them: the `crimpl` command (and `invoke` in a checkout),
in-process through tests/cli_helper.py, against moto_server, real sshd and the local target;
a few end-to-end tests run the installed console script itself."""

import importlib.util
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pathspec
import pytest
from cli_helper import REPO, run_cli, run_invoke
from sandbox import wait_until

import crimpl
from crimpl import AWSEC2, AWSEC2_Config, cli, errors
from crimpl.errors import ExitStatus
from crimpl.hostkeys import generate_host_key

LIFECYCLE_TASKS = ["start", "stop", "terminate", "status", "list"]
INVOKE_OPTIONS = ["--prompt-for-sudo-password", "--pty", "--dry", "--command-timeout", "--echo",
                  "--warn-only", "--hide", "--config", "--search-root", "--collection"]


def crimpl_command():
    beside_python = Path(sys.executable).with_name("crimpl")
    return str(beside_python) if beside_python.exists() else shutil.which("crimpl")


def assert_one_line_error(result, code=None):
    assert result.code != 0
    if code is not None:
        assert result.code == code, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("crimpl: error: ")
    return lines[0]


def task_help(listing):
    """Task name -> its help lines, from ``--list`` or ``--help`` output."""
    helps, current = {}, None
    for line in listing.splitlines():
        entry = re.match(r"^  (\S+)\s{2,}(\S.*)$", line)
        if entry:
            current = entry.group(1)
            helps[current] = [entry.group(2)]
        elif current and re.match(r"^\s{4,}\S", line):
            helps[current].append(line.strip())
        else:
            current = None
    return helps


def hint(output):
    """The command quoted in backticks in ``output``, as words."""
    return re.search(r"`([^`]+)`", output).group(1).split()


def checkout_tasks():
    """This checkout's tasks.py, loaded as invoke loads it."""
    spec = importlib.util.spec_from_file_location("checkout_tasks", REPO / "tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def config(config):
    """The test config, saved: the CLI finds the only saved config."""
    config.save("default")
    return config


@pytest.fixture
def local_job(tmp_path):
    """Run a script on the local target to its end; return the job."""

    def run(text, name=None):
        script = tmp_path / "job.sh"
        script.write_text(text)
        job = crimpl.Local().submit_script(str(script), job_name=name)
        job.wait(timeout=30, interval=0.05)
        return job

    return run


def state_of(ec2, instance_id):
    return ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]["State"]["Name"]


# -- help --------------------------------------------------------------------------------


def test_crimpl_list_shows_one_line_help_for_lifecycle_tasks(tmp_path):
    result = run_cli("--list", cwd=tmp_path)

    assert result.code == 0, result.stderr
    helps = task_help(result.stdout)
    for name in LIFECYCLE_TASKS:
        assert len(helps.get(name, [])) == 1, (name, result.stdout)


def test_invoke_list_in_checkout_shows_one_line_help_for_lifecycle_tasks(tmp_path):
    result = run_invoke("--list", cwd=tmp_path)

    assert result.code == 0, result.stderr
    helps = task_help(result.stdout)
    for name in LIFECYCLE_TASKS:
        assert len(helps.get(name, [])) == 1, (name, result.stdout)


def test_crimpl_help_shows_crimpls_tasks_and_options_but_none_of_invokes(tmp_path):
    result = run_cli("--help", cwd=tmp_path)

    assert result.code == 0, result.stderr
    for option in INVOKE_OPTIONS + ["-T", "--core-opts"]:
        assert option not in result.stdout, option
    for option in ("--help", "--version", "--list"):
        assert option in result.stdout
    helps = task_help(result.stdout)
    for name in cli.ns.task_names:
        assert len(helps.get(name, [])) == 1, (name, result.stdout)


@pytest.mark.parametrize("option", ["--pty", "--dry", "--prompt-for-sudo-password", "-T"])
def test_invokes_own_options_are_refused_by_crimpl(option, tmp_path):
    result = run_cli(option, "list", cwd=tmp_path)

    assert result.code == 1
    assert result.stderr.strip() == f"No idea what '{option}' is!"


def test_every_option_of_every_task_has_a_help_line():
    collections = {"crimpl": cli.ns, "tasks.py": checkout_tasks().ns}
    for where, collection in collections.items():
        for name, task in collection.tasks.items():
            for arg in task.get_arguments():
                assert arg.help, f"{where}: {name} --{arg.name} has no help"


def test_task_help_shows_every_option_again_on_a_second_run(tmp_path):
    # invoke's Task.get_arguments consumes its help strings; crimpl's tasks keep them.
    first = run_cli("--help", "fetch", cwd=tmp_path)
    second = run_cli("--help", "fetch", cwd=tmp_path)

    assert first.code == second.code == 0
    assert first.stdout == second.stdout
    assert "local directory to fetch into, created if missing" in " ".join(second.stdout.split())


def test_task_help_shows_the_words_a_task_takes(tmp_path):
    usage = {name: run_cli("--help", name, cwd=tmp_path).stdout.splitlines()[0]
             for name in ("logs", "kill", "fetch", "init", "list")}

    assert usage == {
        "logs": "Usage: crimpl logs [JOB] [OPTIONS]",
        "kill": "Usage: crimpl kill [JOB] [OPTIONS]",
        "fetch": "Usage: crimpl fetch PATH [ALSO ...] [OPTIONS]",
        "init": "Usage: crimpl init [STACK] [OPTIONS]",
        "list": "Usage: crimpl list [OPTIONS]",
    }


def test_crimpl_version_is_the_package_version(tmp_path):
    result = run_cli("--version", cwd=tmp_path)

    assert result.stdout.strip() == f"crimpl {crimpl.__version__}"


# -- hints name the command the user ran, with arguments that work -------------------------


def test_submit_hint_is_a_crimpl_command_that_follows_the_job(tmp_path):
    (tmp_path / "run.sh").write_text("echo counted 3 words\n")

    submitted = run_cli("submit", "run.sh", "--stack", "local", cwd=tmp_path)

    assert submitted.code == 0, submitted.stderr
    command = hint(submitted.stdout)
    assert command[0] == "crimpl"
    followed = run_cli(*command[1:], cwd=tmp_path)
    assert followed.code == 0, followed.stderr
    assert "counted 3 words" in followed.stdout


def test_submit_hint_in_a_checkout_is_an_invoke_command_that_follows_the_job(tmp_path):
    (tmp_path / "run.sh").write_text("echo counted 4 words\n")

    submitted = run_invoke("submit", "run.sh", "--stack", "local", cwd=tmp_path)

    assert submitted.code == 0, submitted.stderr
    command = hint(submitted.stdout)
    assert command[0] == "invoke"
    followed = run_invoke(*command[1:], cwd=tmp_path)
    assert followed.code == 0, followed.stderr
    assert "counted 4 words" in followed.stdout


@pytest.mark.parametrize("runner, command", [(run_cli, "crimpl"), (run_invoke, "invoke")])
def test_no_live_server_hint_names_the_command_that_was_run(aws, key_file, tmp_path, runner, command):
    (tmp_path / "Pulumi.alpha.yaml").write_text(
        f"config:\n  aws:region: us-east-1\n  crimpl:keyFile: {key_file}\n")

    result = runner("status", "--stack", "alpha", cwd=tmp_path)

    line = assert_one_line_error(result, ExitStatus.AWS)
    assert "stack alpha has no live server" in line
    assert line.endswith(f"run `{command} up --stack alpha`")


def test_progress_goes_to_stderr_and_the_result_to_stdout(aws, key_file, tmp_path):
    (tmp_path / "Pulumi.alpha.yaml").write_text(
        f"config:\n  aws:region: us-east-1\n  crimpl:keyFile: {key_file}\n"
        "  crimpl:nprocs: 2\n  crimpl:sshCidrs:\n    - 203.0.113.7/32\n")

    result = run_cli("up", "--provisioner", "boto3", cwd=tmp_path)

    assert result.code == 0, result.stderr
    assert re.fullmatch(r"alpha: launched i-\w+ \(.*\)\n", result.stdout)
    assert result.stderr.startswith("crimpl: launching ")


# -- the job name as a word -----------------------------------------------------------------


def test_logs_takes_the_job_name_as_a_word(local_job, tmp_path):
    first = local_job("echo from the first job\n", name="first")
    local_job("echo from the latest job\n", name="latest")

    named = run_cli("logs", first.job_name, "--stack", "local", cwd=tmp_path)
    after_options = run_cli("logs", "--stack", "local", "--follow", first.job_name, cwd=tmp_path)
    short_options = run_cli("logs", "-s", "local", first.job_name, cwd=tmp_path)
    latest = run_cli("logs", "--stack", "local", cwd=tmp_path)

    assert (named.code, named.stdout) == (0, "from the first job\n")
    assert (short_options.code, short_options.stdout) == (0, "from the first job\n")
    assert after_options.code == 0, after_options.stderr
    assert after_options.stdout == "from the first job\n"
    assert latest.stdout == "from the latest job\n"


def test_kill_takes_the_job_name_as_a_word(tmp_path):
    script = tmp_path / "wait.sh"
    script.write_text("echo waiting\nsleep 60\n")
    job = crimpl.Local().submit_script(str(script), job_name="waiter")
    wait_until(lambda: job.status().state == "running", timeout=10, what="job running")

    result = run_cli("kill", "waiter", "--stack", "local", cwd=tmp_path)

    assert (result.code, result.stdout) == (0, "waiter: killed\n")
    assert job.status().state == "killed"


def test_two_job_names_are_refused(local_job, tmp_path):
    local_job("true\n", name="one")

    result = run_cli("logs", "one", "two", "--stack", "local", cwd=tmp_path)

    assert result.code == 1
    assert result.stderr.strip() == "No idea what 'two' is!"


# -- fetch ---------------------------------------------------------------------------------------


def test_fetch_dest_is_a_directory_created_if_missing(local_job, tmp_path):
    local_job("echo 3 > count.txt\n")

    first = run_cli("fetch", "count.txt", "--dest", "results", "--stack", "local", cwd=tmp_path)
    again = run_cli("fetch", "count.txt", "--dest", "results", "--stack", "local", cwd=tmp_path)

    assert first.code == again.code == 0, (first.stderr, again.stderr)
    assert (tmp_path / "results").is_dir()
    assert (tmp_path / "results" / "count.txt").read_text() == "3\n"
    assert first.stdout == "fetched 1 file(s) into results/\n"


def test_fetch_takes_several_paths_and_a_comma_is_part_of_a_name(local_job, tmp_path):
    local_job("echo a > a,b.txt\necho c > c.txt\necho d > d.txt\n")

    words = run_cli("fetch", "a,b.txt", "c.txt", "--dest", "words", "--stack", "local", cwd=tmp_path)
    options = run_invoke("fetch", "a,b.txt", "--also", "c.txt", "--also", "d.txt", "--dest", "options",
                         "--stack", "local", cwd=tmp_path)

    assert words.code == options.code == 0, (words.stderr, options.stderr)
    assert sorted(p.name for p in (tmp_path / "words").iterdir()) == ["a,b.txt", "c.txt"]
    assert sorted(p.name for p in (tmp_path / "options").iterdir()) == ["a,b.txt", "c.txt", "d.txt"]
    assert (tmp_path / "words" / "a,b.txt").read_text() == "a\n"


# -- init and the packaged stack template -----------------------------------------------------------


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh $HOME with an empty ~/.ssh."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    return home


def test_the_wheel_ships_the_stack_template(tmp_path):
    # Build from a copy of the sources, as pip would, with setuptools' build_py:
    # the step that collects what the wheel contains (no network, unlike pip's
    # isolated build).
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "crimpl", "infra"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, source / name)
    built = tmp_path / "built"
    subprocess.run([sys.executable, "-c", "import setuptools; setuptools.setup()", "-q",
                    "build_py", "--build-lib", str(built)],
                   cwd=source, check=True, capture_output=True, timeout=120)

    shipped = built / "crimpl" / "Pulumi.example.yaml"
    assert shipped.read_bytes() == (REPO / "crimpl" / "Pulumi.example.yaml").read_bytes()
    packages = {p.parent.relative_to(REPO).as_posix() for p in (REPO / "crimpl").rglob("*.py")}
    assert {d for d in packages if not (built / d).is_dir()} == set()


def test_the_top_level_example_is_the_packaged_template():
    assert (REPO / "Pulumi.example.yaml").read_bytes() == (REPO / "crimpl" / "Pulumi.example.yaml").read_bytes()


def test_init_writes_a_stack_with_the_users_region_and_key(home, tmp_path, monkeypatch):
    (home / ".ssh" / "id_ed25519").write_text("no .pub beside it: not offered")
    for name in ("id_ecdsa", "id_ecdsa.pub", "id_rsa", "id_rsa.pub"):
        (home / ".ssh" / name).write_text("key")
        (home / ".ssh" / name).chmod(0o600)
    monkeypatch.setenv("AWS_REGION", "eu-west-3")

    result = run_cli("init", "prod", cwd=tmp_path)

    assert result.code == 0, result.stderr
    written = tmp_path / "Pulumi.prod.yaml"
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    template = (REPO / "crimpl" / "Pulumi.example.yaml").read_text().splitlines()
    lines = written.read_text().splitlines()
    changed = [(old, new) for old, new in zip(template, lines) if old != new]
    assert len(lines) == len(template)
    assert changed == [("  aws:region: us-east-1", "  aws:region: eu-west-3"),
                       ("  crimpl:keyFile: ~/.ssh/id_ed25519", "  crimpl:keyFile: ~/.ssh/id_ecdsa")]
    assert "`crimpl up --stack prod`" in result.stdout
    from crimpl import stack as stacks
    assert stacks.read_stack("prod", project_dir=tmp_path).values["keyFile"] == "~/.ssh/id_ecdsa"


def test_init_without_a_region_or_key_writes_us_east_1_and_says_how_to_make_a_key(home, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)

    result = run_cli("init", cwd=tmp_path)

    assert result.code == 0, result.stderr
    text = (tmp_path / "Pulumi.dev.yaml").read_text()
    assert "\n  aws:region: us-east-1\n" in text
    assert "\n  crimpl:keyFile: ~/.ssh/id_ed25519\n" in text
    assert "ssh-keygen -t ed25519 -f ~/.ssh/id_ed25519" in result.stderr


def test_init_never_overwrites_a_stack_file(home, tmp_path):
    (tmp_path / "Pulumi.dev.yaml").write_text("config: {}  # mine\n")

    result = run_cli("init", "dev", cwd=tmp_path)

    assert "Pulumi.dev.yaml exists" in assert_one_line_error(result, ExitStatus.CONFIG)
    assert (tmp_path / "Pulumi.dev.yaml").read_text() == "config: {}  # mine\n"


@pytest.mark.parametrize("name", ["local", "example", "../up", "-x"])
def test_init_refuses_a_name_that_cannot_be_a_stack(home, tmp_path, name):
    result = run_cli("init", "--stack", name, cwd=tmp_path)

    assert "cannot name a stack" in assert_one_line_error(result, ExitStatus.CONFIG)
    assert list(tmp_path.glob("Pulumi.*")) == []


# -- the checkout ----------------------------------------------------------------------------


def test_what_the_readme_commands_leave_in_a_checkout_is_ignored_by_git():
    spec = pathspec.GitIgnoreSpec.from_lines((REPO / ".gitignore").read_text().splitlines())

    for left in ("results/count.txt", "demo-results/summary.txt", "Pulumi.sandbox.yaml", "Pulumi.dev.yaml"):
        assert spec.match_file(left), left
    for kept in ("Pulumi.example.yaml", "Pulumi.yaml", "examples/demo/results/keep.txt", "crimpl/cli.py"):
        assert not spec.match_file(kept), kept


# -- exit codes --------------------------------------------------------------------------------------


def test_every_exit_status_is_in_the_readme_table():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Exit codes"):]

    for status in ExitStatus:
        assert re.search(rf"^\| {status.value} \| `{status.name}` \| \S", section, re.MULTILINE), status


@pytest.mark.parametrize("error, status", [
    (errors.ConfigError("x"), ExitStatus.CONFIG),
    (errors.StackError("x"), ExitStatus.CONFIG),
    (errors.PulumiNotInstalledError("x"), ExitStatus.CONFIG),
    (errors.AWSError("x"), ExitStatus.AWS),
    (errors.InstanceNotFoundError("x"), ExitStatus.AWS),
    (errors.InstanceStateError("x"), ExitStatus.AWS),
    (errors.SSHError("x"), ExitStatus.SSH),
    (errors.HostKeyMismatchError("x"), ExitStatus.SSH),
    (errors.SSHNotReadyError("x"), ExitStatus.SSH),
    (errors.ConnectionLostError("x"), ExitStatus.SSH),
    (errors.JobUnreachableError("x"), ExitStatus.SSH),
    (errors.ScriptFailedError("x"), ExitStatus.JOB_FAILED),
    (errors.JobError("x"), ExitStatus.ERROR),
    (errors.TransferError("x"), ExitStatus.ERROR),
    (errors.CrimplError("x"), ExitStatus.ERROR),
])
def test_each_kind_of_error_has_its_exit_status(error, status):
    assert cli.exit_status(error) == status


def test_a_missing_stack_file_exits_config(tmp_path):
    result = run_cli("status", cwd=tmp_path)

    assert "`crimpl init`" in assert_one_line_error(result, ExitStatus.CONFIG)


def test_an_unknown_instance_exits_aws(aws, tmp_path):
    result = run_cli("status", "--instance-id", "i-00000000000000000", cwd=tmp_path)

    assert "`crimpl list`" in assert_one_line_error(result, ExitStatus.AWS)


def test_a_wrong_host_key_exits_ssh(aws, key_file, login_user, serve_instance, tmp_path):
    config = AWSEC2_Config(KeyFile=str(key_file), username=login_user, ssh_cidrs=["127.0.0.1/32"],
                           remote_dir=str(tmp_path / "remote"), ssh_timeout=20)
    config.save("default")
    server = AWSEC2.new(config, nprocs=2)
    serve_instance(server.instanceId, host_private_pem=generate_host_key()[0])

    result = run_cli("jobs", "--instance-id", server.instanceId, cwd=tmp_path)

    assert "does not match the pinned key" in assert_one_line_error(result, ExitStatus.SSH)


def test_following_a_failed_job_exits_job_failed(tmp_path):
    (tmp_path / "fail.sh").write_text("echo trying\nexit 3\n")
    run_cli("submit", "fail.sh", "--stack", "local", cwd=tmp_path)

    result = run_cli("logs", "--follow", "--stack", "local", cwd=tmp_path)

    assert result.code == ExitStatus.JOB_FAILED
    assert result.stdout == "trying\n"
    assert "failed" in result.stderr


def test_an_unknown_job_exits_error(local_job, tmp_path):
    local_job("true\n", name="known")

    result = run_cli("logs", "unknown", "--stack", "local", cwd=tmp_path)

    assert "no job unknown" in assert_one_line_error(result, ExitStatus.ERROR)


# -- the console script itself -------------------------------------------------------------------------


def test_the_crimpl_command_prints_its_version(tmp_path):
    result = subprocess.run([crimpl_command(), "--version"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)

    assert (result.returncode, result.stdout.strip()) == (0, f"crimpl {crimpl.__version__}")


def test_ctrl_c_while_following_exits_interrupted(tmp_path):
    script = tmp_path / "slow.sh"
    script.write_text("echo started\nsleep 60\n")
    job = crimpl.Local().submit_script(str(script))
    out = tmp_path / "out.txt"
    with out.open("w") as stdout:
        follower = subprocess.Popen([crimpl_command(), "logs", "--follow", "--stack", "local"], cwd=tmp_path,
                                    stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: "started" in out.read_text(), timeout=30, what="the job's output followed")
        follower.send_signal(signal.SIGINT)
        _, stderr = follower.communicate(timeout=30)
    finally:
        follower.kill()
        job.kill()

    assert follower.returncode == ExitStatus.INTERRUPTED
    assert stderr.strip() == "crimpl: interrupted"


# -- list and status -----------------------------------------------------------------------


def test_list_shows_each_live_server_with_state_type_address_and_cost(ec2, config, tmp_path):
    running = AWSEC2.new(config=config, nprocs=2, server_name="runner")
    stopped = AWSEC2.new(config=config, nprocs=4, server_name="sleeper")
    stopped.stop()
    plain = ec2.run_instances(ImageId="ami-0a5c3558529277641", InstanceType="c6a.large",
                              MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]

    result = run_cli("list", cwd=tmp_path)

    assert result.code == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert set(rows) == {running.instanceId, stopped.instanceId}
    assert plain not in result.stdout
    run_row = rows[running.instanceId]
    assert run_row[1:4] == ["runner", "running", running.instance_type]
    assert run_row[4] == running.public_ip
    assert re.fullmatch(r"\$\d+\.\d\d", run_row[-1])
    assert rows[stopped.instanceId][1:3] == ["sleeper", "stopped"]
    assert rows[stopped.instanceId][-1] == "$0.00"


def test_list_without_servers_says_nothing_is_billing(aws, tmp_path):
    result = run_cli("list", cwd=tmp_path)

    assert result.code == 0, result.stderr
    assert "no crimpl servers" in result.stdout


def test_status_by_instance_id_shows_name_state_type_and_address(aws, config, tmp_path):
    server = AWSEC2.new(config=config, nprocs=2, server_name="watched")

    result = run_cli("status", "--instance-id", server.instanceId, cwd=tmp_path)

    assert result.code == 0, result.stderr
    first, spent = result.stdout.splitlines()
    assert first.split() == ["watched", server.instanceId, "running", server.instance_type, server.public_ip]
    assert spent.startswith("cost so far $")


def test_status_reads_state_changed_outside_crimpl(ec2, config, tmp_path):
    server = AWSEC2.new(config=config, nprocs=2, server_name="watched")
    ec2.stop_instances(InstanceIds=[server.instanceId])

    result = run_cli("status", "--server", "watched", cwd=tmp_path)

    assert result.code == 0, result.stderr
    assert result.stdout.split()[:3] == ["watched", server.instanceId, "stopped"]


# -- lifecycle ------------------------------------------------------------------------------


def test_stop_and_start_by_server_name(ec2, config, tmp_path):
    server = AWSEC2.new(config=config, nprocs=2, server_name="cycler")

    stopped = run_cli("stop", "--server", "cycler", cwd=tmp_path)

    assert stopped.code == 0, stopped.stderr
    assert state_of(ec2, server.instanceId) == "stopped"
    assert f"{server.instanceId}: stopped" in stopped.stdout

    started = run_cli("start", "--server", "cycler", cwd=tmp_path)

    assert started.code == 0, started.stderr
    assert state_of(ec2, server.instanceId) == "running"
    assert f"{server.instanceId}: running at {server.public_ip}" in started.stdout


def test_terminate_with_yes_terminates_and_cleans_up(ec2, config, tmp_path):
    server = AWSEC2.new(config=config, nprocs=2, server_name="doomed")

    result = run_cli("terminate", "--instance-id", server.instanceId, "--yes", cwd=tmp_path)

    assert result.code == 0, result.stderr
    assert state_of(ec2, server.instanceId) == "terminated"
    assert ec2.describe_key_pairs()["KeyPairs"] == []


@pytest.mark.parametrize("answer", ["", "no\n", "y\n"])
def test_terminate_without_yes_and_no_answer_changes_nothing(ec2, config, tmp_path, answer):
    server = AWSEC2.new(config=config, nprocs=2)

    result = run_cli("terminate", "--instance-id", server.instanceId, cwd=tmp_path, stdin=answer)

    assert result.code == ExitStatus.ERROR
    assert "Traceback" not in result.stderr
    assert "--yes" in result.stderr
    assert state_of(ec2, server.instanceId) == "running"


def test_terminate_answered_yes_terminates(ec2, config, tmp_path):
    server = AWSEC2.new(config=config, nprocs=2)

    result = run_cli("terminate", "--instance-id", server.instanceId, cwd=tmp_path, stdin="yes\n")

    assert result.code == 0, result.stderr
    assert state_of(ec2, server.instanceId) == "terminated"


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["status", "--instance-id", "i-00000000000000000"],
    ["terminate", "--instance-id", "i-00000000000000000", "--yes"],
    ["stop", "--server", "nobody"],
    ["start", "--instance-id", "not-an-id"],
])
def test_unknown_server_is_one_line_error_without_traceback(aws, args, tmp_path):
    result = run_cli(*args, cwd=tmp_path)

    line = assert_one_line_error(result, ExitStatus.AWS)
    assert ("i-00000000000000000" in line) or ("nobody" in line) or ("not-an-id" in line)


def test_starting_terminated_server_is_one_line_error(ec2, config, tmp_path):
    server = AWSEC2.new(config=config, nprocs=2)
    server.terminate()

    result = run_cli("start", "--instance-id", server.instanceId, cwd=tmp_path)

    line = assert_one_line_error(result, ExitStatus.AWS)
    assert "terminated" in line
    assert "`crimpl up`" in line


def test_missing_region_is_one_line_error(aws, tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)

    result = run_cli("list", cwd=tmp_path)

    assert "region" in assert_one_line_error(result, ExitStatus.AWS)
