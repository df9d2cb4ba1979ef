"""What each server has cost (crimpl/cost.py), against moto_server, under a fixed clock.

crimpl's own log records the launch, stops, starts and terminate it makes; the clock
it records them with is fixed here, so the running hours and the cost are exact.
"""

import json
import stat
from datetime import datetime, timedelta, timezone

import pytest
from cli_helper import run_cli
from sandbox import StaticHTTPServer, free_port

import crimpl
from crimpl import cost, pricing

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def clock(monkeypatch):
    """A fixed clock for the events crimpl records; ``clock.at(hours)`` moves it."""
    class Clock:
        now = T0

        def at(self, hours):
            self.now = T0 + timedelta(hours=hours)

    fixed = Clock()
    monkeypatch.setattr(cost, "clock", lambda: fixed.now)
    return fixed


def _launched_and_stopped(config, clock, name):
    """Launch at 0 h, stop at 2 h, and set the clock to 5 h."""
    clock.at(0)
    server = crimpl.AWSEC2.new(config, nprocs=2, server_name=name)
    clock.at(2)
    server.stop()
    clock.at(5)
    return server


def _walk(config, clock, name):
    """Launch at 0 h, stop at 2 h, start at 5 h, terminate at 6 h: 3 running hours, 6 hours of disk."""
    server = _launched_and_stopped(config, clock, name)
    server.start()
    clock.at(6)
    server.terminate()
    return server


def test_launch_stop_start_terminate_costs_exactly_its_running_hours_and_disk_life(aws, config, clock):
    server = _walk(config, clock, "walked")

    report = crimpl.cost_report(now=T0 + timedelta(days=3))

    [row] = report.servers
    assert (row.instance_id, row.name, row.state, row.spot) == (server.instanceId, "walked", "terminated", False)
    assert row.running_hours == 3
    assert row.compute_usd == round(3 * pricing.hourly_price(row.instance_type), 4)
    assert row.volume_gib == config.VolumeSize
    assert row.volume_months == round(6 / pricing.HOURS_PER_MONTH, 4)
    disk_months = 6 / pricing.HOURS_PER_MONTH
    assert row.storage_usd == round(config.VolumeSize * disk_months * pricing.GP3_USD_PER_GIB_MONTH, 4)
    assert report.total_usd == round(row.compute_usd + row.storage_usd, 6)
    assert row.how == "crimpl's log"
    assert row.ended == T0 + timedelta(hours=6)


def test_a_running_server_costs_up_to_now(aws, config, clock):
    clock.at(0)
    crimpl.AWSEC2.new(config, nprocs=2, server_name="up")
    [row] = crimpl.cost_report(now=T0 + timedelta(hours=10)).servers
    assert row.state == "running" and row.running_hours == 10 and row.ended is None
    assert row.volume_months == round(10 / pricing.HOURS_PER_MONTH, 4)


def test_a_spot_server_is_priced_from_the_spot_price_history(aws, ec2, key_file, clock):
    config = crimpl.AWSEC2_Config(KeyFile=str(key_file), ssh_cidrs=["203.0.113.7/32"], spot=True)
    server = _walk(config, clock, "cheap")
    history = ec2.describe_spot_price_history(InstanceTypes=[server.instance_type])["SpotPriceHistory"]
    zone = server.describe()["Placement"]["AvailabilityZone"]
    latest = max((h for h in history if h["AvailabilityZone"] == zone), key=lambda h: h["Timestamp"])
    price = float(latest["SpotPrice"])

    [row] = crimpl.cost_report(now=T0 + timedelta(days=1)).servers

    assert row.spot
    assert row.compute_usd == round(3 * price, 6)
    assert row.compute_usd != round(3 * pricing.hourly_price(row.instance_type), 4)


def test_changes_made_outside_crimpl_come_from_ec2(aws, ec2, config):
    server = crimpl.AWSEC2.new(config, nprocs=2, server_name="elsewhere")
    cost.log_path().unlink()  # as on another machine: crimpl recorded nothing here
    ec2.stop_instances(InstanceIds=[server.instanceId])

    [row] = crimpl.cost_report().servers

    assert row.state == "stopped"
    assert "EC2's first launch" in row.how and "state transition reason (stopped)" in row.how
    assert row.volume_gib == config.VolumeSize
    assert row.running_hours >= 0


def test_servers_that_ended_more_than_90_days_ago_are_left_out(aws, clock):
    clock.at(0)
    cost.record("i-00000000000000001", "launched", name="old", instance_type="c6a.large", volume_gib=8)
    clock.at(1)
    cost.record("i-00000000000000001", "terminated")
    clock.at(24 * 95)
    cost.record("i-00000000000000002", "launched", name="recent", instance_type="c6a.large", volume_gib=8)
    clock.at(24 * 95 + 2)
    cost.record("i-00000000000000002", "terminated")

    report = crimpl.cost_report(now=T0 + timedelta(days=100))

    assert [r.name for r in report.servers] == ["recent"]
    assert report.servers[0].running_hours == 2


def test_the_log_is_private_and_a_cut_line_is_skipped(aws, clock):
    cost.record("i-00000000000000003", "launched", name="x", instance_type="c6a.large", volume_gib=8)
    with open(cost.log_path(), "a") as log:
        log.write('{"time": "2030-01-01T0')  # a crash in the middle of a write
    assert stat.S_IMODE(cost.log_path().stat().st_mode) == 0o600
    assert list(cost.read_log()) == ["i-00000000000000003"]


def test_an_old_price_table_is_warned_about(aws):
    assert crimpl.cost_report(now=datetime(2024, 7, 1, tzinfo=timezone.utc)).warnings == []
    [warning] = crimpl.cost_report(now=datetime(2030, 1, 1, tzinfo=timezone.utc)).warnings
    assert f"the price table is from {pricing.PRICES_AS_OF}" in warning


def test_crimpl_cost_lists_servers_total_and_says_it_is_an_estimate(aws, config, clock):
    _walk(config, clock, "listed")
    result = run_cli("cost")
    assert result.code == 0, result.stderr
    assert "listed" in result.stdout and " terminated " in result.stdout
    assert "an estimate, not a bill" in result.stdout
    assert f"prices of {pricing.PRICES_AS_OF}" in result.stdout


def _stopped_after_two_hours(config, clock, name):
    """Launch at 0 h, stop at 2 h, look at 5 h: its cost so far is 2 running hours and 5 hours of disk."""
    server = _launched_and_stopped(config, clock, name)
    expected = 2 * pricing.hourly_price(server.instance_type) + \
        config.VolumeSize * 5 / pricing.HOURS_PER_MONTH * pricing.GP3_USD_PER_GIB_MONTH
    return server, f"${expected:.2f}"


def test_list_shows_the_cost_so_far_of_a_stopped_server_over_its_whole_life(aws, config, clock):
    server, expected = _stopped_after_two_hours(config, clock, "resting")
    assert expected != "$0.00"

    result = run_cli("list")

    assert result.code == 0, result.stderr
    assert "COST SO FAR" in result.stdout
    [row] = [line.split() for line in result.stdout.splitlines() if line.startswith(server.instanceId)]
    assert row[2] == "stopped" and row[-1] == expected


def test_status_shows_the_cost_so_far(aws, config, clock):
    server, expected = _stopped_after_two_hours(config, clock, "looked-at")

    result = run_cli("status", "--instance-id", server.instanceId)

    assert result.code == 0, result.stderr
    [line] = [line for line in result.stdout.splitlines() if line.startswith("cost so far")]
    assert line.startswith(f"cost so far {expected}: 2.0 h running ")
    assert "an estimate" in line


# -- refreshing the price table from AWS's bulk price file (served on loopback) --------------


def _bulk_file(c6a_large, gp3, published="2030-01-15T00:00:00Z"):
    """A small file with the structure of AWS's bulk price file for EC2: products and terms.OnDemand."""
    def product(family, **attributes):
        return {"productFamily": family, "attributes": attributes}

    def on_demand(sku, usd, unit):
        return {f"{sku}.JRTCKXETXF": {"priceDimensions": {f"{sku}.JRTCKXETXF.6YS6EN2CT7": {
            "unit": unit, "pricePerUnit": {"USD": usd}}}}}

    linux = {"operatingSystem": "Linux", "tenancy": "Shared", "preInstalledSw": "NA", "capacitystatus": "Used"}
    return {
        "formatVersion": "v1.0", "offerCode": "AmazonEC2", "publicationDate": published,
        "products": {
            "SKU1": product("Compute Instance", instanceType="c6a.large", **linux),
            "SKU2": product("Compute Instance", instanceType="c6a.large", **{**linux, "operatingSystem": "Windows"}),
            "SKU3": product("Compute Instance", instanceType="c6a.large", **{**linux, "tenancy": "Dedicated"}),
            "SKU4": product("Storage", volumeApiName="gp3"),
        },
        "terms": {"OnDemand": {
            "SKU1": on_demand("SKU1", c6a_large, "Hrs"),
            "SKU2": on_demand("SKU2", "9.99", "Hrs"),
            "SKU3": on_demand("SKU3", "8.88", "Hrs"),
            "SKU4": on_demand("SKU4", gp3, "GB-Mo"),
        }},
    }


@pytest.fixture
def price_file(monkeypatch):
    served = StaticHTTPServer(json.dumps(_bulk_file("0.5", "0.25")), path="/index.json")
    monkeypatch.setenv(pricing.URL_ENV, f"{served.url}/index.json")
    yield served
    served.stop()


def test_prices_refresh_keeps_the_bulk_files_linux_on_demand_prices_and_its_date(price_file):
    result = run_cli("prices", "--refresh")

    assert result.code == 0, result.stderr
    assert price_file.paths == ["/index.json"]
    assert "prices of 2030-01-15, us-east-1 on-demand, 1 instance types, gp3 $0.25/GiB-month" in result.stdout
    table = pricing.price_table()
    assert (table.as_of, table.usd_per_hour, table.gp3_usd_per_gib_month) == ("2030-01-15", {"c6a.large": 0.5}, 0.25)
    assert stat.S_IMODE((cost.crimpl_home() / pricing.LOCAL_TABLE).stat().st_mode) == 0o600
    assert pricing.hourly_price("c6a.large") == 0.5
    assert pricing.hourly_price("c6a.xlarge") == pricing.TABLE["c6a.xlarge"].usd_per_hour  # not in the file


def test_cost_uses_the_refreshed_prices_and_shows_their_date(aws, config, clock, price_file):
    pricing.refresh()
    _walk(config, clock, "repriced")

    report = crimpl.cost_report(now=T0 + timedelta(days=3))

    [row] = report.servers
    assert row.compute_usd == 3 * 0.5
    assert row.storage_usd == round(config.VolumeSize * 6 / pricing.HOURS_PER_MONTH * 0.25, 4)
    assert report.prices_as_of == "2030-01-15" and report.warnings == []
    result = run_cli("cost")
    assert "prices of 2030-01-15, us-east-1 on-demand" in result.stdout


def test_prices_refresh_offline_is_a_one_line_error_and_keeps_the_table(aws, monkeypatch):
    # A loopback port nothing listens on: the download fails as it does offline.
    monkeypatch.setenv(pricing.URL_ENV, f"http://127.0.0.1:{free_port()}/index.json")

    result = run_cli("prices", "--refresh")

    assert result.code == 3
    message = result.stderr.strip()
    assert "\n" not in message
    assert "could not download AWS's price file" in message and "check the network" in message
    assert f"the prices of {pricing.PRICES_AS_OF} stay in use" in message
    assert not (cost.crimpl_home() / pricing.LOCAL_TABLE).exists()


def test_a_file_without_ec2_prices_is_refused(monkeypatch):
    served = StaticHTTPServer(json.dumps({"products": {}, "terms": {"OnDemand": {}}}), path="/index.json")
    try:
        with pytest.raises(crimpl.CrimplError, match="has no on-demand Linux instance prices"):
            pricing.refresh(url=f"{served.url}/index.json")
    finally:
        served.stop()
    assert pricing.price_table() is pricing.BUILT_IN
