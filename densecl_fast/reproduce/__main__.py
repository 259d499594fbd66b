"""`python -m densecl_fast.reproduce` runs as launch/reproduce.py does."""
import sys

from .cli import main

sys.exit(main())
