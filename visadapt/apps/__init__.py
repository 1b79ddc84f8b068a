"""Applications: one module per console script (see pyproject.toml [project.scripts]); each has ``main(argv)``."""
