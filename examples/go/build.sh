#!/usr/bin/env bash
# Builds the Go example client offline with Debian's packages (golang-go,
# protobuf-compiler, protoc-gen-go, protoc-gen-go-grpc, golang-google-grpc-dev,
# golang-github-golang-protobuf-1-5-dev, golang-google-genproto-dev): GOPATH
# mode over /usr/share/gocode, no module proxy. Output: build/reassigned-client.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build=$here/build
rm -rf "$build/src"
mkdir -p "$build/src"
# go_package puts the code at github.com/reassigned/reassigned/gen/go/reassigned/v1.
protoc -I "$here/../../proto" --go_out="$build/src" --go-grpc_out="$build/src" reassigned/v1/reassigned.proto
cd "$here"
GO111MODULE=off GOPATH="$build:/usr/share/gocode" GOPROXY=off GOFLAGS= go build -o "$build/reassigned-client" .
