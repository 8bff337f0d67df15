#!/usr/bin/env bash
# The classpath of the Java example client: Debian's jars (netty's individual
# jars: netty-all.jar there is an empty aggregator).
set -euo pipefail
jars=(protobuf grpc-api grpc-context grpc-core grpc-netty grpc-protobuf grpc-protobuf-lite grpc-stub
  guava perfmark-api gson geronimo-annotation-1.3-spec proto-google-common-protos
  netty-buffer netty-codec netty-codec-http netty-codec-http2 netty-common netty-handler
  netty-resolver netty-transport netty-transport-native-unix-common netty-tcnative)
cp=
for j in "${jars[@]}"; do
  [ -f "/usr/share/java/$j.jar" ] || { echo "classpath: /usr/share/java/$j.jar is missing" >&2; exit 1; }
  cp=$cp:/usr/share/java/$j.jar
done
echo "${cp#:}"
