#!/usr/bin/env bash
# Builds the Java example client offline with Debian's packages (grpc-java
# 1.41, protobuf-java, netty 4.1 with netty-tcnative, proto-google-common-protos,
# gson): protoc with the grpc-java plugin, then javac. No Maven Central.
# Output: build/classes and build/lib (the native OpenSSL binding); run.sh runs it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build=$here/build
rm -rf "$build"
mkdir -p "$build/gen" "$build/classes" "$build/lib"
protoc -I "$here/../../proto" --plugin=protoc-gen-grpc-java=/usr/bin/grpc_java_plugin \
  --java_out="$build/gen" --grpc-java_out="$build/gen" reassigned/v1/reassigned.proto
# netty looks for libnetty_tcnative.so; Debian ships libnetty-tcnative.so (a copy, not a link).
cp /usr/lib/x86_64-linux-gnu/jni/libnetty-tcnative.so "$build/lib/libnetty_tcnative.so"
classpath=$("$here/classpath.sh")
javac -nowarn -d "$build/classes" -cp "$classpath" \
  $(find "$build/gen" "$here/src" -name '*.java')
