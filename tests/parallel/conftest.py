import os
import sys

# Make both `import tests.distributed_utils` and `import distributed_utils` work however pytest is run.
_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (os.path.dirname(_TESTS), _TESTS):
    if path not in sys.path:
        sys.path.insert(0, path)
