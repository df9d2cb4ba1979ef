"""Jobs: a script run detached on a server, found again by name.

- :mod:`.protocol`: the job directory, the shell commands run on the server and
  the parsing of what they print (its docstring describes the protocol);
- :mod:`.api`: :class:`Job`, :class:`JobStatus` and :class:`JobsMixin`, the job
  methods every server kind has;
- :mod:`.arrays`: job arrays (``array=``): the spec, and a job's state from its tasks'.
"""

from .api import Job, JobsMixin, JobStatus
from .protocol import STATES

__all__ = ["STATES", "Job", "JobStatus", "JobsMixin"]
