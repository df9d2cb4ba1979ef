"""The instance-type table: vCPUs, memory and hourly price, and ``nprocs`` -> type.

Where the numbers come from: AWS EC2 on-demand prices for Linux in us-east-1,
as published on https://aws.amazon.com/ec2/pricing/on-demand/ (read 2024-06;
the build machine has no network to refresh them). Other regions cost 0-30%
more. They are used to pick the cheapest type for ``nprocs`` and to estimate
what a running instance has cost; they are estimates, not a bill.

:func:`refresh` (``crimpl prices --refresh``) replaces the prices with those of AWS's
public bulk price file for EC2 in one region, kept in ``$CRIMPL_HOME/prices.json``
(mode 0600) with the file's publication date; the cost estimates then use it, and a
type that file does not price keeps the price above. The choice of a type for
``nprocs`` always uses the table above.

Only non-burstable compute (c) and general-purpose (m) families are listed:
burstable t-types throttle a batch job that keeps its CPUs busy.
"""

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import date, datetime, timezone

from .errors import AWSError, ConfigError
from .home import crimpl_home, write_private_file

PRICES_AS_OF = "2024-06"
PRICES_REGION = "us-east-1"
#: gp3 storage, USD per GiB-month, us-east-1 (https://aws.amazon.com/ebs/pricing/, read 2024-06).
GP3_USD_PER_GIB_MONTH = 0.08
#: The hours AWS bills a GiB-month over (its price pages use 730).
HOURS_PER_MONTH = 730
#: A price table older than this many days is warned about.
STALE_AFTER_DAYS = 180
#: AWS's public bulk price file for EC2 in one region (no credentials needed).
BULK_URL = "https://pricing.us-east-1.amazonaws.com/offers/v1.0/aws/AmazonEC2/current/{region}/index.json"
#: Replaces :data:`BULK_URL` (tests serve a small file on loopback).
URL_ENV = "CRIMPL_PRICE_URL"
#: The refreshed table in ``$CRIMPL_HOME``.
LOCAL_TABLE = "prices.json"


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


@dataclass(frozen=True)
class PriceTable:
    """The prices in use: the built-in ones, or those of the last :func:`refresh`.

    :param as_of: the date of the prices (``2024-06``, or the bulk file's publication date).
    :param source: where they come from (``built-in`` or the URL downloaded).
    """

    as_of: str
    region: str
    source: str
    gp3_usd_per_gib_month: float
    usd_per_hour: dict = field(default_factory=dict)


BUILT_IN = PriceTable(PRICES_AS_OF, PRICES_REGION, "built-in", GP3_USD_PER_GIB_MONTH,
                      {t.name: t.usd_per_hour for t in TABLE.values()})


def price_table() -> PriceTable:
    """Return the refreshed table in ``$CRIMPL_HOME`` if there is a readable one, else :data:`BUILT_IN`."""
    try:
        data = json.loads((crimpl_home() / LOCAL_TABLE).read_text(encoding="utf-8"))
        return PriceTable(str(data["as_of"]), str(data["region"]), str(data["source"]),
                          float(data["gp3_usd_per_gib_month"]),
                          {str(k): float(v) for k, v in data["usd_per_hour"].items()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ConfigError):
        return BUILT_IN  # never refreshed, or a file edited by hand: the built-in prices


def hourly_price(instance_type: str, table: PriceTable | None = None) -> float | None:
    """Return the on-demand USD/hour of ``instance_type``, or None if no table prices it.

    :param table: the prices to use (default: :func:`price_table`).
    """
    table = table or price_table()
    if instance_type in table.usd_per_hour:
        return table.usd_per_hour[instance_type]
    row = TABLE.get(instance_type)
    return row.usd_per_hour if row else None


def estimated_cost(instance_type: str, hours: float) -> float | None:
    """Return the estimated USD cost of running ``instance_type`` for ``hours``, or None if unknown."""
    price = hourly_price(instance_type)
    return None if price is None else round(price * max(hours, 0.0), 4)


def prices_age_days(now: datetime, table: PriceTable | None = None) -> int:
    """Return how many days old the price table is at ``now`` (a month counts from its 1st)."""
    parts = list(map(int, (table or price_table()).as_of.split("-")))
    return (now.date() - date(*parts, *[1] * (3 - len(parts)))).days


def refresh(region: str = PRICES_REGION, url: str | None = None, timeout: float = 120) -> PriceTable:
    """Download AWS's bulk price file for EC2 in ``region`` and keep its prices as the table in use.

    Only on-demand Linux prices of shared-tenancy instances without pre-installed software
    are kept, and gp3 storage. The file is large (hundreds of MB); it is read once and
    not kept.

    :param url: the file to read (default: ``$CRIMPL_PRICE_URL``, else :data:`BULK_URL`).
    :raises AWSError: if it cannot be downloaded or holds no such price; the table in use stays.
    """
    url = url or os.environ.get(URL_ENV) or BULK_URL.format(region=region)
    kept = f"the prices of {price_table().as_of} stay in use"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - an https URL or the test's
            data = json.load(response)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise AWSError(f"could not download AWS's price file {url} ({reason}): check the network "
                       f"and try again; {kept}") from exc
    except ValueError as exc:
        raise AWSError(f"AWS's price file {url} is not JSON ({exc}); {kept}") from exc
    table = _parse_bulk(data, region, url)
    if not table.usd_per_hour:
        raise AWSError(f"AWS's price file {url} has no on-demand Linux instance prices; {kept}")
    write_private_file(crimpl_home() / LOCAL_TABLE, json.dumps({
        "as_of": table.as_of, "region": table.region, "source": table.source,
        "gp3_usd_per_gib_month": table.gp3_usd_per_gib_month, "usd_per_hour": table.usd_per_hour,
    }, indent=1, sort_keys=True) + "\n")
    return table


def _parse_bulk(data, region, url):
    """The :class:`PriceTable` of a bulk price file (``products`` and ``terms.OnDemand``)."""
    try:
        products, on_demand = data["products"], data["terms"]["OnDemand"]
    except (KeyError, TypeError):
        raise AWSError(f"AWS's price file {url} has no products and terms.OnDemand: is it the EC2 file?") from None
    instances, gp3 = {}, set()
    for sku, product in products.items():
        attrs = product.get("attributes", {})
        family = product.get("productFamily")
        if (family == "Compute Instance" and attrs.get("operatingSystem") == "Linux"
                and attrs.get("tenancy") == "Shared" and attrs.get("preInstalledSw", "NA") == "NA"
                and attrs.get("capacitystatus", "Used") == "Used"):
            instances[sku] = attrs.get("instanceType")
        elif family == "Storage" and attrs.get("volumeApiName") == "gp3":
            gp3.add(sku)
    hourly, storage = {}, None
    for sku, terms in on_demand.items():
        if sku not in instances and sku not in gp3:
            continue
        for term in terms.values():
            for dimension in term.get("priceDimensions", {}).values():
                try:
                    usd = float(dimension["pricePerUnit"]["USD"])
                except (KeyError, TypeError, ValueError):
                    continue
                if sku in gp3 and dimension.get("unit") == "GB-Mo":
                    storage = usd
                elif sku in instances and dimension.get("unit") == "Hrs" and usd > 0 and instances[sku]:
                    hourly[instances[sku]] = usd
    published = str(data.get("publicationDate") or "")[:10] or datetime.now(timezone.utc).strftime("%Y-%m-%d")
    return PriceTable(published, region, url, storage if storage is not None else GP3_USD_PER_GIB_MONTH, hourly)
