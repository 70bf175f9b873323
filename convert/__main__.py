"""`python -m convert --help` lists every format."""
import sys

from convert.cli import cli

sys.exit(cli())
