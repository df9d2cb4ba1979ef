"""crimpl's Pulumi program (``__main__.py``), installed as ``crimpl.infra``."""
