"""The price table and nprocs -> instance type, and which type AWSEC2.new launches."""

import pytest

from crimpl import AWSEC2, AWSEC2_Config, ConfigError
from crimpl import pricing
from sandbox import SSH_CIDRS

LARGEST = max(row.vcpus for row in pricing.TABLE.values())


def is_burstable(name):
    # t2, t3, t3a, t4g...: the burstable families throttle a batch job.
    return name.startswith("t")


def eligible(nprocs):
    return [row for row in pricing.TABLE.values()
            if row.vcpus >= nprocs and not is_burstable(row.name)]


def test_table_rows_are_plausible():
    assert len(pricing.TABLE) > 10
    for name, row in pricing.TABLE.items():
        assert row.name == name
        assert row.vcpus >= 1 and row.memory_gib > 0 and 0 < row.usd_per_hour < 50


@pytest.mark.parametrize("nprocs", range(1, LARGEST + 1))
def test_nprocs_picks_cheapest_non_burstable_type_with_enough_vcpus(nprocs):
    chosen = pricing.TABLE[pricing.instance_type_for(nprocs)]

    assert chosen.vcpus >= nprocs
    assert not is_burstable(chosen.name)
    assert chosen.usd_per_hour == min(row.usd_per_hour for row in eligible(nprocs))


def test_burstable_type_is_not_chosen_even_when_cheapest():
    cheapest_two_vcpu = min((r for r in pricing.TABLE.values() if r.vcpus >= 2),
                            key=lambda r: r.usd_per_hour)
    assert is_burstable(cheapest_two_vcpu.name)  # the table has a cheaper burstable type

    assert pricing.instance_type_for(2) != cheapest_two_vcpu.name


@pytest.mark.parametrize("nprocs", [0, -1, -64, 2.0, 2.5, "4", None, True, False, LARGEST + 1, 10**6])
def test_invalid_nprocs_is_one_line_config_error_naming_nprocs(nprocs):
    with pytest.raises(ConfigError) as caught:
        pricing.instance_type_for(nprocs)

    assert "nprocs" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_estimated_cost_is_price_times_hours():
    price = pricing.hourly_price("c6a.xlarge")

    assert price == pricing.TABLE["c6a.xlarge"].usd_per_hour
    assert pricing.estimated_cost("c6a.xlarge", 10) == pytest.approx(10 * price)
    assert pricing.estimated_cost("c6a.xlarge", -1) == 0


def test_cost_of_type_missing_from_table_is_unknown():
    assert pricing.hourly_price("x9z.huge") is None
    assert pricing.estimated_cost("x9z.huge", 3) is None


def test_new_launches_type_chosen_for_nprocs(aws, config):
    server = AWSEC2.new(config=config, nprocs=3)

    assert server.instance_type == pricing.instance_type_for(3)
    assert pricing.TABLE[server.instance_type].vcpus >= 3


def test_config_instance_type_wins_over_nprocs(aws, key_file):
    config = AWSEC2_Config(KeyFile=str(key_file), ssh_cidrs=SSH_CIDRS, InstanceType="m6a.large")

    server = AWSEC2.new(config=config, nprocs=16)

    assert server.instance_type == "m6a.large"


def test_config_instance_type_wins_over_nprocs_beyond_the_table(aws, key_file):
    config = AWSEC2_Config(KeyFile=str(key_file), ssh_cidrs=SSH_CIDRS, InstanceType="c6a.large")

    server = AWSEC2.new(config=config, nprocs=LARGEST + 64)

    assert server.instance_type == "c6a.large"


def test_instance_type_argument_wins_over_config_and_nprocs(aws, key_file):
    config = AWSEC2_Config(KeyFile=str(key_file), ssh_cidrs=SSH_CIDRS, InstanceType="m6a.large")

    server = AWSEC2.new(config=config, nprocs=64, instance_type="c6i.xlarge")

    assert server.instance_type == "c6i.xlarge"


@pytest.mark.parametrize("nprocs", [0, -2, "8", True])
def test_nonsensical_nprocs_is_refused_even_with_instance_type(aws, key_file, nprocs):
    config = AWSEC2_Config(KeyFile=str(key_file), ssh_cidrs=SSH_CIDRS, InstanceType="m6a.large")

    with pytest.raises(ConfigError, match="nprocs"):
        AWSEC2.new(config=config, nprocs=nprocs)


def test_new_without_nprocs_or_instance_type_is_refused(aws, config):
    with pytest.raises(ConfigError, match="nprocs"):
        AWSEC2.new(config=config)
