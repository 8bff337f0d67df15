#!/usr/bin/env bash
# Runs the Java example client built by build.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
classpath=$("$here/classpath.sh")
exec java -Djava.library.path="$here/build/lib" -cp "$here/build/classes:$classpath" \
  io.github.reassigned.example.ReassignedClient "$@"
