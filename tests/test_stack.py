"""crimpl.stack: stack files, validation, and the Automation API flow.

The Pulumi CLI cannot be installed here, so the flow tests put a stand-in
``pulumi`` executable on PATH: a small script that answers the commands the
Automation API runs (version, stack select/init, config get/set/rm, up,
preview, destroy, refresh, stack output, stack history), keeps config in the
real ``Pulumi.<stack>.yaml`` as the CLI does, and logs every call with its
working directory and environment.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from crimpl import stack
from crimpl.stackkeys import KEYS
from crimpl.errors import ConfigError, PulumiNotInstalledError, StackError
from crimpl.config import node_host_key
from crimpl.hostkeys import pinned_key, public_line_of

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "Pulumi.example.yaml"
CALLER = "198.51.100.7/32"


def write_stack(directory, name, config, **top):
    path = Path(directory) / f"Pulumi.{name}.yaml"
    path.write_text(yaml.safe_dump({**top, "config": config}), encoding="utf-8")
    return path


@pytest.fixture
def project(tmp_path, key_file):
    """A project folder with one valid stack, dev."""
    folder = tmp_path / "project"
    folder.mkdir()
    write_stack(folder, "dev", {"aws:region": "eu-west-1", "crimpl:keyFile": str(key_file), "crimpl:nprocs": 2})
    return folder


# ---------------------------------------------------------------------------
# Finding and choosing a stack


def test_find_stacks_lists_stack_files_but_not_the_example(tmp_path):
    for name in ("Pulumi.dev.yaml", "Pulumi.gpu.yml", "Pulumi.example.yaml", "Pulumi.yaml", "other.yaml"):
        (tmp_path / name).write_text("config: {}\n")
    assert stack.find_stacks(tmp_path) == ["dev", "gpu"]


def test_the_only_stack_is_selected(project):
    assert stack.select_stack(project_dir=project) == "dev"


def test_crimpl_stack_chooses_among_several(project, monkeypatch):
    write_stack(project, "gpu", {})
    monkeypatch.setenv("CRIMPL_STACK", "gpu")
    assert stack.select_stack(project_dir=project) == "gpu"
    assert stack.select_stack("dev", project_dir=project) == "dev"  # an argument wins


def test_several_stacks_and_no_choice_lists_them(project):
    write_stack(project, "gpu", {})
    with pytest.raises(StackError, match=r"several stacks .*\(dev, gpu\).*CRIMPL_STACK"):
        stack.select_stack(project_dir=project)


def test_no_stack_file_says_how_to_make_one(tmp_path):
    (tmp_path / "Pulumi.example.yaml").write_text("config: {}\n")
    with pytest.raises(StackError, match=r"run `crimpl init` \(it writes Pulumi\.dev\.yaml"):
        stack.select_stack(project_dir=tmp_path)


def test_unknown_stack_lists_the_known_ones(project):
    write_stack(project, "gpu", {})
    with pytest.raises(StackError, match=r"no stack 'prod' .*stacks: dev, gpu"):
        stack.select_stack("prod", project_dir=project)
    with pytest.raises(StackError, match=r"no stack 'prod' .*stacks: dev, gpu"):
        stack.read_stack("prod", project)


# ---------------------------------------------------------------------------
# Reading a stack file


def test_read_stack_types_values_from_yaml_and_from_strings(project, key_file):
    write_stack(project, "dev", {
        "aws:region": "eu-west-1",
        "crimpl:keyFile": str(key_file),
        "crimpl:nprocs": "8",            # a quoted number, as `pulumi config set` writes it
        "crimpl:volumeSize": 50,         # a YAML number
        "crimpl:spot": "true",
        "crimpl:usePrivateIp": "False",
        "crimpl:sshTimeout": "12.5",
        "crimpl:sshCidrs": json.dumps(["203.0.113.0/24"]),  # a JSON string
        "crimpl:tags": {"team": "physics"},
        "crimpl:hostKey": {"secure": "v1:abc"},
        "other:setting": "ignored",
    })
    settings = stack.read_stack("dev", project)
    assert settings.values == {
        "region": "eu-west-1", "keyFile": str(key_file), "nprocs": 8, "volumeSize": 50, "spot": True,
        "usePrivateIp": False, "sshTimeout": 12.5, "sshCidrs": ["203.0.113.0/24"], "tags": {"team": "physics"},
    }
    assert settings.secure_keys == {"hostKey"}
    assert (settings.name, settings.project, settings.path) == ("dev", "crimpl", project / "Pulumi.dev.yaml")
    assert settings.server_name == "crimpl-dev"


def test_project_name_and_server_name(project, key_file):
    (project / "Pulumi.yaml").write_text("name: survey\nruntime: python\n")
    assert stack.read_stack("dev", project).server_name == "survey-dev"
    write_stack(project, "dev", {"crimpl:keyFile": str(key_file), "crimpl:nprocs": 2, "crimpl:serverName": "box"})
    assert stack.read_stack("dev", project).server_name == "box"


@pytest.mark.parametrize("key, value, words", [
    ("crimpl:volumesize", 30, "unknown key crimpl:volumesize"),
    ("crimpl:volumeSize", "big", "crimpl:volumeSize must be a whole number"),
    ("crimpl:volumeSize", True, "crimpl:volumeSize must be a int"),
    ("crimpl:volumeSize", 4, "crimpl:volumeSize must be between 8 and 16384"),
    ("crimpl:nprocs", "many", "crimpl:nprocs must be a whole number"),
    ("crimpl:spot", "maybe", "crimpl:spot must be true or false"),
    ("crimpl:spot", 1, "crimpl:spot must be a bool"),
    ("crimpl:tags", ["a", "b"], "crimpl:tags must be a dict"),
    ("crimpl:tags", "{not json", "crimpl:tags must be a YAML list or mapping"),
    ("crimpl:sshCidrs", ["0.0.0.0/0"], "crimpl:sshCidrs: 0.0.0.0/0 would open SSH to the whole internet"),
    ("crimpl:username", 7, "crimpl:username must be a str"),
    ("crimpl:keyFile", "/nonexistent/key", "crimpl:keyFile: /nonexistent/key does not exist"),
    ("aws:region", 5, "region must be a str"),
    ("crimpl:sshTimeout", float("nan"), "crimpl:sshTimeout must be a positive, finite number of seconds"),
    ("crimpl:sshTimeout", "inf", "crimpl:sshTimeout must be a positive, finite number of seconds"),
    ("crimpl:sshTimeout", -3, "crimpl:sshTimeout must be a positive, finite number of seconds"),
    ("crimpl:nprocs", 0, "crimpl:nprocs must be at least 1"),
    ("crimpl:serverName", 5, "crimpl:serverName must be a str"),
    ("crimpl:sshCidrs", ["0.0.0.0/1", "128.0.0.0/1"], "crimpl:sshCidrs: 0.0.0.0/1, 128.0.0.0/1 would open SSH"),
    ("crimpl:nodes", 0, "crimpl:nodes must be a whole number of nodes from 1 to 64, got 0"),
    ("crimpl:nodes", -1, "crimpl:nodes must be a whole number of nodes from 1 to 64, got -1"),
    ("crimpl:nodes", 65, "crimpl:nodes must be a whole number of nodes from 1 to 64, got 65"),
    ("crimpl:nodes", "x", "crimpl:nodes must be a whole number, got 'x'"),
    ("crimpl:nodes", 1.5, "crimpl:nodes must be a int, got float 1.5"),
    ("crimpl:nodes", "1.5", "crimpl:nodes must be a whole number, got '1.5'"),
    ("crimpl:nodes", True, "crimpl:nodes must be a int, got bool True"),
    ("crimpl:placement", "spread", "crimpl:placement must be cluster (a cluster placement group) or left out"),
])
def test_read_stack_names_the_bad_key_and_the_file(project, key, value, words):
    path = project / "Pulumi.dev.yaml"
    config = yaml.safe_load(path.read_text())["config"]
    write_stack(project, "dev", {**config, key: value})
    with pytest.raises(ConfigError) as error:
        stack.read_stack("dev", project)
    assert words in str(error.value)
    assert str(path) in str(error.value)


def test_nodes_and_placement_reach_the_spec(project, key_file):
    write_stack(project, "dev", {"crimpl:keyFile": str(key_file), "crimpl:nprocs": 2, "crimpl:nodes": "3",
                                 "crimpl:placement": "cluster"})
    spec = stack.spec_for_stack(stack.read_stack("dev", project))
    assert (spec.nnodes, spec.placement, spec.placement_group_name) == (3, "cluster", "crimpl-crimpl-dev-cluster")
    assert [node.tags["crimpl:node-rank"] for node in spec.nodes] == ["0", "1", "2"]
    write_stack(project, "dev", {"crimpl:keyFile": str(key_file), "crimpl:nprocs": 2})
    spec = stack.spec_for_stack(stack.read_stack("dev", project))
    assert (spec.nnodes, spec.placement, spec.placement_group_name) == (1, None, None)


def test_a_plain_text_host_key_is_refused(project):
    config = yaml.safe_load((project / "Pulumi.dev.yaml").read_text())["config"]
    write_stack(project, "dev", {**config, "crimpl:hostKey": "-----BEGIN OPENSSH PRIVATE KEY-----"})
    with pytest.raises(ConfigError, match=r"crimpl:hostKey is stored in plain text"):
        stack.read_stack("dev", project)


def test_the_example_stack_parses_and_validates(tmp_path, key_file):
    config = yaml.safe_load(EXAMPLE.read_text())["config"]
    assert "crimpl:keyFile" in config and "aws:region" in config
    write_stack(tmp_path, "dev", {**config, "crimpl:keyFile": str(key_file)})
    settings = stack.read_stack("dev", tmp_path)
    spec = stack.spec_for_stack(settings, ssh_cidrs=[CALLER])
    assert spec.server_name == "crimpl-dev"
    assert spec.region == config["aws:region"]


def test_the_example_documents_every_key_with_a_comment():
    lines = EXAMPLE.read_text().splitlines()
    for key in KEYS:
        [at] = [i for i, line in enumerate(lines) if line.lstrip("# ").startswith(f"crimpl:{key}:")]
        above = lines[at - 1].strip()
        assert above.startswith("#") and not above.lstrip("# ").startswith("crimpl:"), f"crimpl:{key} has no comment"
    assert any("EDIT" in line and "keyFile" in lines[i + 1] for i, line in enumerate(lines[:-1]))


def test_the_project_file_runs_crimpls_program():
    project = yaml.safe_load((ROOT / "Pulumi.yaml").read_text())
    assert project["name"] == "crimpl"
    assert project["runtime"]["name"] == "python"
    assert (ROOT / project["main"] / "__main__.py").is_file()


def test_spec_for_stack_is_the_shared_instance_spec(project):
    settings = stack.read_stack("dev", project)
    spec = stack.spec_for_stack(settings, ssh_cidrs=[CALLER])
    assert spec.instance_type == "c6a.large"
    assert spec.tags["crimpl:name"] == "crimpl-dev"
    assert spec.ssh_cidrs == (CALLER,)
    assert spec.region == "eu-west-1"


# ---------------------------------------------------------------------------
# The Pulumi CLI, backend and passphrase


@pytest.fixture
def no_pulumi(tmp_path, monkeypatch):
    """No pulumi on PATH nor in $PULUMI_HOME/bin; tmp_path/empty-bin first on PATH."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    kept = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not (Path(d) / "pulumi").exists()]
    monkeypatch.setenv("PATH", os.pathsep.join([str(empty), *kept]))
    monkeypatch.setenv("PULUMI_HOME", str(tmp_path / "pulumi-home"))
    for name in ("PULUMI_BACKEND_URL", "PULUMI_ACCESS_TOKEN", "PULUMI_CONFIG_PASSPHRASE",
                 "PULUMI_CONFIG_PASSPHRASE_FILE"):
        monkeypatch.delenv(name, raising=False)


MISSING_CLI = ("the Pulumi CLI is not installed: install it from https://www.pulumi.com/docs/install/ "
               "(curl -fsSL https://get.pulumi.com | sh), or use --provisioner boto3")


def test_missing_pulumi_cli_is_one_line(no_pulumi, project):
    with pytest.raises(PulumiNotInstalledError) as error:
        stack.pulumi_cli()
    assert str(error.value) == MISSING_CLI
    with pytest.raises(PulumiNotInstalledError, match=r"^the Pulumi CLI is not installed"):
        stack.up(stack.read_stack("dev", project))


def test_missing_cli_fails_before_pulumi_is_imported(no_pulumi, project, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from crimpl import stack
        from crimpl.errors import PulumiNotInstalledError
        settings = stack.read_stack("dev", {str(project)!r})
        for operation in (stack.up, stack.preview, stack.destroy, stack.refresh, stack.outputs):
            try:
                operation(settings)
            except PulumiNotInstalledError:
                pass
            else:
                raise SystemExit(operation.__name__ + " did not raise")
        assert not [m for m in sys.modules if m.split(".")[0] == "pulumi"], "pulumi was imported"
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr


def test_import_crimpl_does_not_import_pulumi():
    result = subprocess.run(
        [sys.executable, "-c", "import crimpl, crimpl.stack, sys; "
         "assert not [m for m in sys.modules if m.split('.')[0] == 'pulumi'], sorted(sys.modules)"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr


def test_pulumi_cli_is_found_on_path_or_where_the_installer_puts_it(no_pulumi, tmp_path, monkeypatch):
    installed = tmp_path / "pulumi-home" / "bin" / "pulumi"
    installed.parent.mkdir(parents=True)
    installed.write_text("#!/bin/sh\n")
    installed.chmod(0o755)
    assert stack.pulumi_cli() == str(installed)
    on_path = tmp_path / "empty-bin" / "pulumi"
    on_path.write_text("#!/bin/sh\n")
    on_path.chmod(0o755)
    assert stack.pulumi_cli() == str(on_path)


def test_backend_lookup_order(no_pulumi, tmp_path, monkeypatch, crimpl_home):
    assert stack.backend_url() == (crimpl_home / "pulumi").as_uri()
    credentials = tmp_path / "pulumi-home" / "credentials.json"
    credentials.parent.mkdir(parents=True)
    credentials.write_text(json.dumps({"current": "https://api.pulumi.com", "accessTokens": {}}))
    assert stack.backend_url() == "https://api.pulumi.com"
    monkeypatch.setenv("PULUMI_BACKEND_URL", "s3://team-state")
    assert stack.backend_url() == "s3://team-state"


@pytest.fixture
def fake_pulumi(no_pulumi, tmp_path, monkeypatch):
    """The stand-in pulumi CLI on PATH; returns a reader of its call log."""
    script = tmp_path / "empty-bin" / "pulumi"
    script.write_text(f"#!{sys.executable}\n" + FAKE_PULUMI)
    script.chmod(0o755)
    log = tmp_path / "pulumi-calls.jsonl"
    monkeypatch.setenv("FAKE_PULUMI_LOG", str(log))
    monkeypatch.setenv("FAKE_PULUMI_STATE", str(tmp_path / "pulumi-state.json"))
    monkeypatch.setenv("PULUMI_CONFIG_PASSPHRASE", "test passphrase")

    def calls(command=None):
        if not log.exists():
            return []
        entries = [json.loads(line) for line in log.read_text().splitlines()]
        return [e for e in entries if command is None or e["command"] == command]

    return calls


def test_missing_passphrase_says_how_to_set_it(fake_pulumi, project, monkeypatch):
    monkeypatch.delenv("PULUMI_CONFIG_PASSPHRASE")
    settings = stack.read_stack("dev", project)
    with pytest.raises(StackError, match=r"export PULUMI_CONFIG_PASSPHRASE=\.\.\. or PULUMI_CONFIG_PASSPHRASE_FILE"):
        stack.up(settings)
    assert fake_pulumi() == []  # refused before running anything
    monkeypatch.setenv("PULUMI_CONFIG_PASSPHRASE_FILE", str(project / "no-such-file"))
    with pytest.raises(StackError, match=r"PULUMI_CONFIG_PASSPHRASE_FILE=.*no-such-file does not exist"):
        stack.outputs(settings)


def test_no_passphrase_is_needed_with_the_cloud_or_a_kms(fake_pulumi, project, monkeypatch, key_file):
    monkeypatch.delenv("PULUMI_CONFIG_PASSPHRASE")
    monkeypatch.setenv("PULUMI_BACKEND_URL", "https://api.pulumi.com")
    assert stack.workspace_options(stack.read_stack("dev", project)).env_vars["PULUMI_BACKEND_URL"] == \
        "https://api.pulumi.com"
    monkeypatch.delenv("PULUMI_BACKEND_URL")
    write_stack(project, "dev", {"crimpl:keyFile": str(key_file), "crimpl:nprocs": 2},
                secretsprovider="awskms://alias/crimpl")
    stack.workspace_options(stack.read_stack("dev", project))  # does not raise


def test_workspace_runs_crimpls_program_in_this_python(fake_pulumi, project, crimpl_home):
    options = stack.workspace_options(stack.read_stack("dev", project))
    assert options.work_dir == str(project.resolve())
    assert options.project_settings.name == "crimpl"
    assert options.project_settings.main == str(stack.infra_dir())
    assert (stack.infra_dir() / "__main__.py").is_file()
    assert options.env_vars["PULUMI_PYTHON_CMD"] == sys.executable
    assert options.env_vars["PULUMI_BACKEND_URL"] == (crimpl_home / "pulumi").as_uri()
    assert (crimpl_home / "pulumi").is_dir()
    (project / "Pulumi.yaml").write_text("name: survey\nruntime: python\nmain: infra/\n")
    assert stack.workspace_options(stack.read_stack("dev", project)).project_settings is None


# ---------------------------------------------------------------------------
# up, preview, destroy, refresh, outputs through the Automation API


@pytest.fixture
def caller(monkeypatch):
    monkeypatch.setattr("crimpl.caller.caller_cidr", lambda timeout=10: CALLER)


def test_up_creates_a_secret_host_key_opens_ssh_to_the_caller_and_pins(fake_pulumi, project, caller, monkeypatch):
    lines = []
    outputs = stack.up(stack.read_stack("dev", project), on_output=lines.append)

    assert outputs["instanceId"] == "i-0fa4e000000000001"
    assert any("Updating (dev)" in line for line in lines)
    [up] = fake_pulumi("up")
    # During up: the host key is a secret, SSH is open to the caller only, crimpl's program runs.
    assert set(up["config"]["crimpl:hostKey"]) == {"secure"}
    assert up["config"]["crimpl:sshCidrs"] == [CALLER]
    assert up["project_file"]["main"] == str(stack.infra_dir())
    assert up["env"]["PULUMI_PYTHON_CMD"] == sys.executable
    assert up["env"]["PULUMI_CONFIG_PASSPHRASE"] == "test passphrase"
    # After: the caller's address is not kept, the temporary Pulumi.yaml is gone, the key is pinned.
    after = stack.read_stack("dev", project)
    assert "sshCidrs" not in after.values and after.secure_keys == {"hostKey"}
    assert not (project / "Pulumi.yaml").exists()
    private = fake_secret(yaml.safe_load((project / "Pulumi.dev.yaml").read_text())["config"]["crimpl:hostKey"])
    assert pinned_key("i-0fa4e000000000001").get_base64() == public_line_of(private).split()[1]

    # A second up keeps the same host key.
    stack.up(after, on_output=lines.append)
    second = fake_secret(yaml.safe_load((project / "Pulumi.dev.yaml").read_text())["config"]["crimpl:hostKey"])
    assert second == private
    assert len(fake_pulumi("config set")) == 3  # hostKey once, sshCidrs twice


def test_up_keeps_the_stacks_own_cidrs(fake_pulumi, project, key_file, monkeypatch):
    monkeypatch.setattr("crimpl.caller.caller_cidr", lambda timeout=10: pytest.fail("caller looked up"))
    write_stack(project, "dev", {"crimpl:keyFile": str(key_file), "crimpl:nprocs": 2,
                                 "crimpl:sshCidrs": ["203.0.113.0/24"]})
    stack.up(stack.read_stack("dev", project), on_output=lambda line: None)
    assert fake_pulumi("up")[0]["config"]["crimpl:sshCidrs"] == ["203.0.113.0/24"]
    assert yaml.safe_load((project / "Pulumi.dev.yaml").read_text())["config"]["crimpl:sshCidrs"] == \
        ["203.0.113.0/24"]


def test_up_with_yes_false_only_previews(fake_pulumi, project, caller):
    assert stack.up(stack.read_stack("dev", project), on_output=lambda line: None, yes=False) is None
    assert fake_pulumi("up") == [] and len(fake_pulumi("preview")) == 1


def test_preview_returns_the_change_summary(fake_pulumi, project, caller):
    summary = stack.preview(stack.read_stack("dev", project), on_output=lambda line: None)
    assert summary == {"create": 4}
    assert fake_pulumi("preview")[0]["config"]["crimpl:sshCidrs"] == [CALLER]


def test_destroy_unpins_the_host_key(fake_pulumi, project, caller):
    settings = stack.read_stack("dev", project)
    stack.up(settings, on_output=lambda line: None)
    assert pinned_key("i-0fa4e000000000001") is not None
    stack.destroy(stack.read_stack("dev", project), on_output=lambda line: None, yes=False)
    assert pinned_key("i-0fa4e000000000001") is not None  # a preview changes nothing
    stack.destroy(stack.read_stack("dev", project), on_output=lambda line: None)
    assert pinned_key("i-0fa4e000000000001") is None
    assert stack.outputs(settings) == {}
    assert "--preview-only" in fake_pulumi("destroy")[0]["args"]
    assert "--preview-only" not in fake_pulumi("destroy")[1]["args"]


def test_up_pins_each_nodes_own_host_key_and_destroy_forgets_them(fake_pulumi, project, key_file, caller):
    write_stack(project, "dev", {"crimpl:keyFile": str(key_file), "crimpl:nprocs": 2, "crimpl:nodes": 3})
    outputs = stack.up(stack.read_stack("dev", project), on_output=lambda line: None)

    ids = outputs["instanceIds"]
    assert len(ids) == 3
    private = fake_secret(yaml.safe_load((project / "Pulumi.dev.yaml").read_text())["config"]["crimpl:hostKey"])
    expected = [node_host_key((private, public_line_of(private)), rank)[1] for rank in range(3)]
    assert [pinned_key(i).get_base64() for i in ids] == [e.split()[1] for e in expected]
    assert len(set(expected)) == 3 and expected[0] == public_line_of(private)

    write_stack(project, "dev", {"crimpl:keyFile": str(key_file), "crimpl:nprocs": 2, "crimpl:nodes": 2})
    outputs = stack.up(stack.read_stack("dev", project), on_output=lambda line: None)
    assert outputs["instanceIds"] == ids[:2]
    assert pinned_key(ids[2]) is None and pinned_key(ids[1]) is not None  # the removed node is forgotten

    stack.destroy(stack.read_stack("dev", project), on_output=lambda line: None)
    assert [pinned_key(i) for i in ids] == [None] * 3


def test_refresh_and_outputs_need_a_deployed_stack(fake_pulumi, project, caller):
    settings = stack.read_stack("dev", project)
    with pytest.raises(StackError, match=r"stack dev has not been deployed .*run crimpl up first"):
        stack.outputs(settings)
    with pytest.raises(StackError, match=r"has not been deployed"):
        stack.refresh(settings)
    stack.up(settings, on_output=lambda line: None)
    stack.refresh(settings, on_output=lambda line: None)
    assert stack.outputs(settings)["serverName"] == "crimpl-dev"


@pytest.mark.parametrize("stderr, message", [
    ("error: [409] Conflict: Another update is currently in progress.",
     "stack dev is locked by another update: wait for it to finish, "
     "or run `pulumi cancel --stack dev` if none is running"),
    ("error: the stack is currently locked by 1 lock(s).",
     "stack dev is locked by another update: wait for it to finish, "
     "or run `pulumi cancel --stack dev` if none is running"),
    ("    pulumi:pulumi:Stack (crimpl-dev):\n      error: Pulumi.dev.yaml: crimpl:volumeSize must be a int\n"
     "error: update failed",
     "pulumi up of stack dev failed: Pulumi.dev.yaml: crimpl:volumeSize must be a int"),
    ("error: update failed", "pulumi up of stack dev failed: update failed"),
])
def test_pulumi_failures_become_one_line_stack_errors(fake_pulumi, project, caller, monkeypatch, stderr, message):
    monkeypatch.setenv("FAKE_PULUMI_FAIL", json.dumps({"command": "up", "stderr": stderr}))
    with pytest.raises(StackError) as error:
        stack.up(stack.read_stack("dev", project), on_output=lambda line: None)
    assert str(error.value) == message
    # The caller's address is removed even when up fails.
    assert "crimpl:sshCidrs" not in yaml.safe_load((project / "Pulumi.dev.yaml").read_text())["config"]


def fake_secret(value):
    return FakeCipher.decrypt(value["secure"])


class FakeCipher:
    """The stand-in's 'encryption' (reversible, obviously not secure)."""

    @staticmethod
    def decrypt(text):
        assert text.startswith("fake:")
        return bytes.fromhex(text[len("fake:"):]).decode()


FAKE_PULUMI = r'''
import json, os, sys
from pathlib import Path
import yaml

VERSION = "3.200.0"
INSTANCE_ID = "i-0fa4e000000000001"


def main(argv):
    args = [a for a in argv if a != "--non-interactive"]
    value = None
    if "--" in args:
        at = args.index("--")
        args, value = args[:at], args[at + 1:][0]
    stack = None
    if "--stack" in args:
        at = args.index("--stack")
        stack = args[at + 1]
        del args[at:at + 2]
    words = [a for a in args if not a.startswith("-")]
    command = " ".join(words[:2]) if words[0] in ("stack", "config") else words[0]
    cwd = Path.cwd()
    stack_file = cwd / f"Pulumi.{stack}.yaml"
    state_path = Path(os.environ["FAKE_PULUMI_STATE"])
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    project_file = cwd / "Pulumi.yaml"
    log = {
        "command": command, "args": args, "cwd": str(cwd),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("PULUMI_", "PYTHONPATH"))},
        "project_file": yaml.safe_load(project_file.read_text()) if project_file.exists() else None,
        "config": config_of(stack_file) if stack else None,
    }
    with open(os.environ["FAKE_PULUMI_LOG"], "a") as handle:
        handle.write(json.dumps(log) + "\n")

    fail = json.loads(os.environ.get("FAKE_PULUMI_FAIL") or "{}")
    if fail.get("command") == command:
        print("Updating (%s)" % stack)
        sys.stderr.write(fail["stderr"] + "\n")
        return 255

    if command == "version":
        print("v" + VERSION)
    elif command == "stack select":
        if stack not in state:
            sys.stderr.write(f"error: no stack named '{stack}' found\n")
            return 255
    elif command == "stack init":
        state[words[2]] = {"outputs": {}}
    elif command == "config get":
        entry = config_of(stack_file).get(words[2])
        if entry is None:
            sys.stderr.write(f"error: configuration key '{words[2]}' not found for stack '{stack}'\n")
            return 255
        secret = isinstance(entry, dict) and "secure" in entry
        plain = bytes.fromhex(entry["secure"][5:]).decode() if secret else entry
        print(json.dumps({"value": plain, "secret": secret}))
    elif command == "config set":
        key = words[2]
        stored = {"secure": "fake:" + value.encode().hex()} if "--secret" in args else value
        config = config_of(stack_file)
        if "--path" in args and key.endswith("[0]"):
            config[key[:-3]] = [stored]
        else:
            config[key] = stored
        write_config(stack_file, config)
    elif command == "config rm":
        config = config_of(stack_file)
        config.pop(words[2], None)
        write_config(stack_file, config)
    elif command == "up":
        print(f"Updating ({stack})")
        nodes = int(config_of(stack_file).get("crimpl:nodes", 1))
        state[stack]["outputs"] = {
            "instanceId": INSTANCE_ID, "publicIp": "203.0.113.10", "privateIp": "10.0.0.5",
            "username": "ubuntu", "serverName": f"crimpl-{stack}"}
        if nodes > 1:  # as crimpl's program; a stack of one node deployed by an older crimpl has no list
            state[stack]["outputs"]["instanceIds"] = [INSTANCE_ID[:-1] + str(1 + r) for r in range(nodes)]
        state[stack]["history"] = True
    elif command == "preview":
        print(f"Previewing update ({stack})")
        log_file = args[args.index("--event-log") + 1]
        with open(log_file, "a") as handle:
            handle.write(json.dumps({"sequence": 1, "timestamp": 0, "summaryEvent": {
                "maybeCorrupt": False, "durationSeconds": 1, "resourceChanges": {"create": 4},
                "PolicyPacks": {}}}) + "\n")
            handle.write(json.dumps({"sequence": 2, "timestamp": 0, "cancelEvent": {}}) + "\n")
    elif command == "destroy":
        print(f"Destroying ({stack})")
        if "--preview-only" not in args:
            state[stack]["outputs"] = {}
    elif command == "refresh":
        print(f"Refreshing ({stack})")
    elif command == "stack output":
        print(json.dumps(state[stack]["outputs"]))
    elif command == "stack history":
        print(json.dumps([{"kind": "update", "startTime": "2025-01-01T00:00:00.000Z", "message": "",
                           "environment": {}, "config": {}, "result": "succeeded",
                           "endTime": "2025-01-01T00:01:00.000Z"}] if state[stack].get("history") else []))
    else:
        sys.stderr.write(f"fake pulumi: unsupported command {argv}\n")
        return 2
    state_path.write_text(json.dumps(state))
    return 0


def config_of(path):
    if not path.exists():
        return {}
    return (yaml.safe_load(path.read_text()) or {}).get("config") or {}


def write_config(path, config):
    data = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    data["config"] = config
    path.write_text(yaml.safe_dump(data))


sys.exit(main(sys.argv[1:]))
'''
