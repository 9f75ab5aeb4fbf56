"""``python -m covidxray`` runs the CLI (useful where the console script is not installed)."""

from covidxray.cli import main

main()
