"""``python -m client_app.native [--strict] [--verbose]``: build the native executor once (``make venv`` runs it).

Without a compiler it says so and exits 0 (the Python executors are the fallback); ``--strict`` exits 1 then.
"""

import argparse
import sys

from client_app.native import build

parser = argparse.ArgumentParser(prog="python -m client_app.native", description=__doc__)
parser.add_argument("--strict", action="store_true", help="exit 1 when the extension cannot be built")
parser.add_argument("--verbose", action="store_true", help="show the compiler's commands")
args = parser.parse_args()
ok, _seconds, message = build(verbose=args.verbose)
print(message)
sys.exit(0 if ok or not args.strict else 1)
