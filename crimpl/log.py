"""crimpl's progress messages ("starting the instance", "replaced results/x.csv").

They go to the ``crimpl`` logger at INFO. The package attaches one stderr
handler so a user of the Python API or the CLI sees them without configuring
logging; set the ``crimpl`` logger's level to WARNING to silence them.
"""

import logging

logger = logging.getLogger("crimpl")


def say(message: str) -> None:
    """Tell the user what crimpl is doing."""
    logger.info(message)


def warn(message: str) -> None:
    """Tell the user about something crimpl worked around (a bad line it skipped, ...)."""
    logger.warning(message)


def install_default_handler() -> None:
    """Attach a plain ``crimpl: message`` stderr handler unless one is configured."""
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("crimpl: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
