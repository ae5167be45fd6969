#!/usr/bin/env bash
# Run a command (default: the sandbox and oracle tests) as an unprivileged user, to check that the
# code sandbox also holds when its caller is not root (CI runs as root).
#
#   tests/posttrain/run_as_user.sh                      # pytest tests/posttrain as 'nobody'
#   tests/posttrain/run_as_user.sh python bench.py ...  # any command
#   SANDBOX_TEST_USER=alice tests/posttrain/run_as_user.sh
#
# As root it uses a private mount namespace (unshare --mount) so that an interpreter under a
# directory only root may enter (pyenv under /root) is reachable for the test user at the same path:
# the blocking directory is covered by a tmpfs and the interpreter's prefix is bind-mounted back
# into it, read-only. Nothing changes outside that namespace. Run by a normal user, it just runs.
set -euo pipefail
cd "$(dirname "$0")/../.."
user=${SANDBOX_TEST_USER:-nobody}
if [ $# -eq 0 ]; then
    set -- python -m pytest -q -p no:cacheprovider tests/posttrain
fi
if [ "$(id -u)" != 0 ]; then
    exec "$@"
fi
python=$(python -c 'import os, sys; print(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))')
prefix=$(python -c 'import os, sys; print(os.path.realpath(sys.base_prefix))')
blocked=$(python - "$prefix" <<'PY'
import os, stat, sys
path = sys.argv[1]
parts = path.strip("/").split("/")
for i in range(1, len(parts) + 1):
    p = "/" + "/".join(parts[:i])
    if not os.stat(p).st_mode & stat.S_IXOTH:
        print(p)
        break
PY
)
export PYTHONDONTWRITEBYTECODE=1 HOME=/tmp
bindir=$(dirname "$python")
if [ -z "$blocked" ]; then
    exec runuser -u "$user" -- env PATH="$bindir:$PATH" "$@"
fi
keep=$(mktemp -d)
exec unshare --mount --propagation private bash -c '
    set -e
    mount --bind "$1" "$2"                    # keep the prefix reachable
    mount -t tmpfs -o mode=0755 tmpfs "$3"    # cover the directory the user cannot enter
    mkdir -p "$1"
    mount --bind -o ro "$2" "$1"
    user=$4 bindir=$5
    shift 5
    exec runuser -u "$user" -- env PATH="$bindir:$PATH" "$@"
' bash "$prefix" "$keep" "$blocked" "$user" "$bindir" "$@"
