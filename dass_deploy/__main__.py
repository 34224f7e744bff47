"""``python -m dass_deploy ...`` runs ``dass-segment``."""

from dass_deploy.cli import main

main()
