"""The instance-type table: vCPUs, memory and hourly price, and ``nprocs`` -> type.

Where the numbers come from: AWS EC2 on-demand prices for Linux in us-east-1,
as published on https://aws.amazon.com/ec2/pricing/on-demand/ (read 2024-06;
the build machine has no network to refresh them). Other regions cost 0-30%
more. They are used to pick the cheapest type for ``nprocs`` and to estimate
what a running instance has cost; they are estimates, not a bill.

Only non-burstable compute (c) and general-purpose (m) families are listed:
burstable t-types throttle a batch job that keeps its CPUs busy.
"""

from dataclasses import dataclass

from .errors import ConfigError

PRICES_AS_OF = "2024-06"
PRICES_REGION = "us-east-1"


@dataclass(frozen=True)
class InstanceType:
    """One row of the table."""

    name: str
    vcpus: int
    memory_gib: float
    usd_per_hour: float


# name, vCPUs, GiB, USD/hour
_ROWS = [
    ("c7a.medium", 1, 2, 0.05131),
    ("c6a.large", 2, 4, 0.0765),
    ("c6a.xlarge", 4, 8, 0.153),
    ("c6a.2xlarge", 8, 16, 0.306),
    ("c6a.4xlarge", 16, 32, 0.612),
    ("c6a.8xlarge", 32, 64, 1.224),
    ("c6a.12xlarge", 48, 96, 1.836),
    ("c6a.16xlarge", 64, 128, 2.448),
    ("c6a.24xlarge", 96, 192, 3.672),
    ("c6a.32xlarge", 128, 256, 4.896),
    ("c6a.48xlarge", 192, 384, 7.344),
    ("c6i.large", 2, 4, 0.085),
    ("c6i.xlarge", 4, 8, 0.17),
    ("c6i.2xlarge", 8, 16, 0.34),
    ("c6i.4xlarge", 16, 32, 0.68),
    ("c6i.8xlarge", 32, 64, 1.36),
    ("c6i.32xlarge", 128, 256, 5.44),
    ("c7i.large", 2, 4, 0.08925),
    ("c7i.xlarge", 4, 8, 0.1785),
    ("c7i.2xlarge", 8, 16, 0.357),
    ("c7i.4xlarge", 16, 32, 0.714),
    ("c7i.8xlarge", 32, 64, 1.428),
    ("c7i.48xlarge", 192, 384, 8.568),
    ("m6a.large", 2, 8, 0.0864),
    ("m6a.xlarge", 4, 16, 0.1728),
    ("m6a.2xlarge", 8, 32, 0.3456),
    ("m6a.4xlarge", 16, 64, 0.6912),
    ("t3.micro", 2, 1, 0.0104),
    ("t3.small", 2, 2, 0.0208),
    ("t3.medium", 2, 4, 0.0416),
]

TABLE = {row[0]: InstanceType(*row) for row in _ROWS}
_BURSTABLE_PREFIXES = ("t2.", "t3.", "t3a.", "t4g.")


def check_nprocs(nprocs: object) -> None:
    """Raise :class:`ConfigError` unless ``nprocs`` is a positive integer (the table is not consulted)."""
    if isinstance(nprocs, bool) or not isinstance(nprocs, int):
        raise ConfigError(f"nprocs must be a whole number of processors, got {nprocs!r}")
    if nprocs < 1:
        raise ConfigError(f"nprocs must be at least 1, got {nprocs}")


def instance_type_for(nprocs: int) -> str:
    """Return the name of the cheapest non-burstable type with at least ``nprocs`` vCPUs.

    :raises ConfigError: if ``nprocs`` is not a positive integer or exceeds the largest type.
    """
    check_nprocs(nprocs)
    largest = max(t.vcpus for t in TABLE.values())
    if nprocs > largest:
        raise ConfigError(
            f"nprocs={nprocs} is more than the largest instance type offers ({largest} vCPUs); "
            "ask for fewer or pass InstanceType"
        )
    candidates = [
        t for t in TABLE.values()
        if t.vcpus >= nprocs and not t.name.startswith(_BURSTABLE_PREFIXES)
    ]
    # Ties on price go to the type with more memory, then to the name, so the choice is stable.
    best = min(candidates, key=lambda t: (t.usd_per_hour, -t.memory_gib, t.name))
    return best.name


def hourly_price(instance_type: str) -> float | None:
    """Return the on-demand USD/hour of ``instance_type``, or None if it is not in the table."""
    row = TABLE.get(instance_type)
    return row.usd_per_hour if row else None


def estimated_cost(instance_type: str, hours: float) -> float | None:
    """Return the estimated USD cost of running ``instance_type`` for ``hours``, or None if unknown."""
    price = hourly_price(instance_type)
    return None if price is None else round(price * max(hours, 0.0), 4)
