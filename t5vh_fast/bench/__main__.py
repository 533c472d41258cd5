"""Worker entry: ``python -m t5vh_fast.bench KIND SPEC_JSON`` prints one JSON result line."""

import json
import sys

from .workers import WORKERS

if __name__ == "__main__":
    kind, spec = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps(WORKERS[kind](spec)))
