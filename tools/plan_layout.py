#!/usr/bin/env python
"""Thin wrapper: see megatron_phi4/planner/ and docs/planner.md."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from megatron_phi4.planner.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
