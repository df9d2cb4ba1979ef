"""The caller's public address, for a security group that lets in SSH from it alone."""

import ipaddress
import os
import urllib.error
import urllib.request

from .errors import ConfigError

#: AWS's own "what is my IP" service; ``CRIMPL_CHECKIP_URL`` overrides it.
CHECKIP_URL = "https://checkip.amazonaws.com"


def caller_cidr(timeout=10):
    """Return this machine's public address as a one-address CIDR (``/32`` or ``/128``).

    :raises ConfigError: if the address cannot be found; the message says how to give it.
    """
    url = os.environ.get("CRIMPL_CHECKIP_URL") or CHECKIP_URL
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read(200).decode("ascii", "replace").strip()
        address = ipaddress.ip_address(text)
    except (OSError, urllib.error.URLError, ValueError) as exc:
        raise ConfigError(
            f"could not find your public address from {url} ({exc}); "
            "set ssh_cidrs (crimpl:sshCidrs in a stack) to the networks allowed to SSH"
        ) from exc
    return f"{address}/{address.max_prefixlen}"
