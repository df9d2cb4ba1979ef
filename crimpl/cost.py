"""What each server has cost: an estimate rebuilt from EC2 and from what crimpl recorded.

EC2 keeps no history of an instance's starts and stops, and forgets a terminated
instance after about an hour, so the running hours are reconstructed from:

1. crimpl's own log, ``$CRIMPL_HOME/state-log.jsonl`` (mode 0600): one JSON line per
   launch, start, stop and terminate that crimpl made, with its time, the instance
   type, the root volume size and whether it is spot (:func:`record`);
2. EC2's description: ``LaunchTime`` (the last start), the root volume's attach time
   (the first launch) and the time in ``StateTransitionReason`` (the last stop or
   terminate), for what happened outside crimpl (the watchdog, the console, another
   machine). Only the latest such change is visible: earlier ones crimpl did not make
   are unknown, and the report says which sources it used.

Compute is the running hours times the on-demand price of :mod:`crimpl.pricing`, or the
spot price from ``DescribeSpotPriceHistory`` in effect at the start of each running period
for a spot instance. Storage is the root volume's GiB times the months from launch to
terminate (stopped time included) times the gp3 price. Every figure is an estimate, not
a bill; the price table's date is shown and a table older than 180 days is warned about.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from . import ec2, pricing
from .home import crimpl_home

LOG = "state-log.jsonl"
EVENTS = ("launched", "started", "stopped", "terminated")
#: How far back the report looks.
DEFAULT_DAYS = 90
_REASON_TIME = re.compile(r"\((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (?:GMT|UTC)\)")


def clock() -> datetime:
    """The time crimpl records events at (UTC); tests replace it with a fixed clock."""
    return datetime.now(timezone.utc)


def log_path():
    """Return the path of crimpl's state-change log."""
    return crimpl_home() / LOG


def record(instance_id: str, event: str, *, name: str | None = None, instance_type: str | None = None,
           volume_gib: int | None = None, spot: bool | None = None) -> None:
    """Append one state change crimpl made to the log (one line, one write, mode 0600)."""
    entry = {"time": clock().isoformat(), "instance": instance_id, "event": event}
    entry.update({k: v for k, v in (("name", name), ("type", instance_type), ("volume_gib", volume_gib),
                                    ("spot", spot)) if v is not None})
    fd = os.open(log_path(), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
    finally:
        os.close(fd)


def read_log() -> dict[str, list[dict]]:
    """Return the logged events by instance id, oldest first; unreadable lines are skipped."""
    by_instance: dict[str, list[dict]] = {}
    try:
        text = log_path().read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return by_instance
    for line in text.splitlines():
        try:
            entry = json.loads(line)
            entry["at"] = datetime.fromisoformat(entry["time"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a crash, or edited by hand
        if entry.get("event") in EVENTS and isinstance(entry.get("instance"), str):
            by_instance.setdefault(entry["instance"], []).append(entry)
    for events in by_instance.values():
        events.sort(key=lambda e: e["at"])
    return by_instance


@dataclass
class ServerCost:
    """The estimated cost of one server (one instance) over its life."""

    instance_id: str
    name: str
    state: str
    instance_type: str
    spot: bool
    running_hours: float
    compute_usd: float | None
    volume_gib: int | None
    volume_months: float
    storage_usd: float | None
    #: where the hours come from, in words
    how: str
    launched: datetime | None = None
    #: when it was terminated; None while it exists
    ended: datetime | None = None

    @property
    def total_usd(self) -> float:
        """Compute plus storage (an unknown part counts 0; :attr:`how` says so)."""
        return round((self.compute_usd or 0.0) + (self.storage_usd or 0.0), 6)

    @property
    def so_far(self) -> str:
        """The total as ``crimpl list`` shows it: ``$1.23``, or ``?`` when the compute price is unknown."""
        return "?" if self.compute_usd is None else f"${self.total_usd:.2f}"

    def __str__(self) -> str:
        compute = "?" if self.compute_usd is None else f"${self.compute_usd:.2f}"
        storage = "?" if self.storage_usd is None else f"${self.storage_usd:.2f}"
        return (f"cost so far {self.so_far}: {self.running_hours:.1f} h running{' (spot)' if self.spot else ''} "
                f"{compute} + disk {storage} (an estimate; `crimpl cost` says how)")


@dataclass
class CostReport:
    """What :func:`cost_report` returns."""

    servers: list[ServerCost] = field(default_factory=list)
    prices_as_of: str = pricing.PRICES_AS_OF
    #: the region of those prices
    prices_region: str = pricing.PRICES_REGION
    #: warnings: a stale price table, unknown prices
    warnings: list[str] = field(default_factory=list)

    @property
    def total_usd(self) -> float:
        """The sum over every server."""
        return round(sum(s.total_usd for s in self.servers), 6)


def cost_report(region: str | None = None, ec2_client: Any = None, now: datetime | None = None,
                days: int = DEFAULT_DAYS) -> CostReport:
    """Estimate what every crimpl server of the last ``days`` days has cost, terminated ones too.

    :param now: the time to count up to (default: now).
    """
    client = ec2_client or ec2.client(region)
    now = now or clock()
    since = now - timedelta(days=days)
    logged = read_log()
    described = {i["InstanceId"]: i for i in ec2.find_instances(client, include_terminated=True)}
    table = pricing.price_table()
    report = CostReport(prices_as_of=table.as_of, prices_region=table.region)
    if pricing.prices_age_days(now, table) > pricing.STALE_AFTER_DAYS:
        report.warnings.append(f"the price table is from {table.as_of}, more than "
                               f"{pricing.STALE_AFTER_DAYS} days old: prices may have changed")
    volumes = _root_volume_sizes(client, described)
    for instance_id in sorted(set(described) | set(logged)):
        row = _server_cost(client, instance_id, logged.get(instance_id, []), described.get(instance_id),
                           volumes.get(instance_id), now, table)
        if row is None or (row.ended is not None and row.ended < since):
            continue
        if row.compute_usd is None:
            report.warnings.append(f"{instance_id}: no price for {row.instance_type} in the table; "
                                   "its compute is not counted")
        report.servers.append(row)
    report.servers.sort(key=lambda s: (s.launched or now, s.instance_id))
    return report


def costs_so_far(region: str | None = None, ec2_client: Any = None) -> dict[str, ServerCost]:
    """Return ``{instance_id: ServerCost}`` up to now for every crimpl server :func:`cost_report` knows."""
    return {row.instance_id: row for row in cost_report(region, ec2_client).servers}


def _root_volume_sizes(client, described):
    ids = [i for i, inst in described.items() if ec2.state_of(inst) != "terminated"]
    if not ids:
        return {}
    with ec2.api_errors():
        volumes = client.describe_volumes(Filters=[{"Name": "attachment.instance-id", "Values": ids}])["Volumes"]
    return {a["InstanceId"]: v["Size"] for v in volumes for a in v.get("Attachments", [])}


def _transition_time(instance):
    match = _REASON_TIME.search(instance.get("StateTransitionReason") or "")
    if not match:
        return None
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)


def _first_launch(instance):
    # The root volume stays attached from the first launch: its attach time survives stop and start.
    for mapping in instance.get("BlockDeviceMappings", []):
        attached = mapping.get("Ebs", {}).get("AttachTime")
        if mapping.get("DeviceName") == instance.get("RootDeviceName", mapping.get("DeviceName")) and attached:
            return attached
    return instance["LaunchTime"]


def _events(logged, instance):
    """The ``(time, event)`` list of one instance, and the sources it was built from."""
    events = [(e["at"], e["event"]) for e in logged]
    sources = ["crimpl's log"] if events else []
    if instance is not None:
        if not events:
            events.append((_first_launch(instance), "launched"))
            sources.append("EC2's first launch (root volume attach time)")
        last = events[-1][0]
        if instance["LaunchTime"] > last:
            events.append((instance["LaunchTime"], "started"))
            sources.append("EC2's last start (LaunchTime)")
        state = ec2.state_of(instance)
        changed = _transition_time(instance)
        ended = state in ("stopping", "stopped", "shutting-down", "terminated")
        if ended and changed and changed >= events[-1][0]:
            events.append((changed, "terminated" if state in ("shutting-down", "terminated") else "stopped"))
            sources.append(f"EC2's state transition reason ({state})")
    return sorted(events, key=lambda e: e[0]), sources


def _server_cost(client, instance_id, logged, instance, volume_gib, now, table):
    events, sources = _events(logged, instance)
    if not events:
        return None
    facts = {k: v for e in logged for k, v in e.items() if k in ("name", "type", "volume_gib", "spot")}
    instance_type = instance["InstanceType"] if instance else facts.get("type", "?")
    spot = (instance.get("InstanceLifecycle") == "spot") if instance else bool(facts.get("spot"))
    volume_gib = volume_gib or facts.get("volume_gib")
    name = ec2.tags_of(instance).get(ec2.NAME_TAG, "") if instance else facts.get("name", "")
    state = ec2.state_of(instance) if instance else {"launched": "running", "started": "running"}.get(
        events[-1][1], events[-1][1])

    periods, since = [], None
    for at, event in events:
        if event in ("launched", "started"):
            since = since or at
        elif since is not None:
            periods.append((since, at))
            since = None
    if since is not None and state in ("pending", "running"):
        periods.append((since, now))
    hours = sum((end - start).total_seconds() for start, end in periods) / 3600
    if spot:
        zone = (instance or {}).get("Placement", {}).get("AvailabilityZone")
        compute = round(sum(_spot_price(client, instance_type, zone, start) * (end - start).total_seconds() / 3600
                            for start, end in periods), 6)  # spot prices can be tiny
    else:
        price = pricing.hourly_price(instance_type, table)
        compute = None if price is None else round(price * hours, 4)
    ended = events[-1][0] if events[-1][1] == "terminated" else None
    months = ((ended or now) - events[0][0]).total_seconds() / 3600 / pricing.HOURS_PER_MONTH
    storage = round(volume_gib * months * table.gp3_usd_per_gib_month, 4) if volume_gib else None
    how = ", ".join(sources) + ("" if volume_gib else "; volume size unknown, storage not counted")
    return ServerCost(instance_id=instance_id, name=name, state=state, instance_type=instance_type, spot=spot,
                      running_hours=round(hours, 4), compute_usd=compute, volume_gib=volume_gib,
                      volume_months=round(months, 4), storage_usd=storage, how=how, launched=events[0][0],
                      ended=ended)


def _spot_price(client, instance_type, zone, at):
    """The spot price (USD/hour) in effect at ``at``: the latest record at or before it, else the first."""
    with ec2.api_errors():
        history = client.describe_spot_price_history(
            InstanceTypes=[instance_type], ProductDescriptions=["Linux/UNIX", "Linux/UNIX (Amazon VPC)"],
            EndTime=at, **({"AvailabilityZone": zone} if zone else {}),
        )["SpotPriceHistory"]
    if not history:
        return pricing.hourly_price(instance_type) or 0.0
    before = [h for h in history if h["Timestamp"] <= at] or history
    return float(max(before, key=lambda h: h["Timestamp"])["SpotPrice"])
