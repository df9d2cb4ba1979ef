"""Start moto_server with one fix: let ``POST /moto-api/reset`` work with ``MOTO_AMIS_PATH``.

moto (5.x) parses the creation dates of the ``MOTO_AMIS_PATH`` images in
place, so the reset, which loads them again, fails on dates that are already
datetimes. Each load here starts from a fresh copy of the file's entries.
Usage: ``python tests/moto_launcher.py -H 127.0.0.1 -p PORT``.
"""

import copy
import sys

from moto.ec2.models import amis
from moto.server import main

_PRISTINE = copy.deepcopy(amis.AMIS)
_load_amis = amis.AmiBackend._load_amis


def _load_fresh_amis(self):
    amis.AMIS[:] = copy.deepcopy(_PRISTINE)
    _load_amis(self)


amis.AmiBackend._load_amis = _load_fresh_amis

if __name__ == "__main__":
    main(sys.argv[1:])
