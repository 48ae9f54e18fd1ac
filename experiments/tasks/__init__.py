"""Task functions: ``run(cfg) -> results``, one module per task."""
