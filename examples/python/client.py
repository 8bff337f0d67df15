"""Example Python client of the reassigned gRPC API (grpcio).

Connects with mutual TLS and a bearer token, asks the sandbox numbers with
CheckNumber, BatchCheckNumbers and StreamCheckNumbers, reads
GetMirrorStatus, and decodes google.rpc.BadRequest and google.rpc.RetryInfo
from two errors it provokes. Prints one JSON object per line.

Settings (environment): REASSIGNED_TARGET (default localhost:50051),
REASSIGNED_CA, REASSIGNED_CERT, REASSIGNED_KEY (PEM files, default the
demo's demo-data/certs/ca.pem, platform-a.pem, platform-a.key) and TOKEN.
"""

import json
import os
import sys
import tempfile
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
PROTO_ROOT = Path(os.environ.get("REASSIGNED_PROTO", HERE.parent.parent / "proto"))

# The sandbox numbers (README "Sandbox numbers"): each gives one fixed answer.
SANDBOX = [
    ("+12025550100", "2024-06-01"),  # REASSIGNED
    ("+12025550101", "2024-07-01"),  # NOT_REASSIGNED (disconnected before since)
    ("+12025550102", "2024-01-01"),  # NOT_REASSIGNED (never disconnected)
    ("+12025550103", "2020-06-01"),  # NO_DATA / BEFORE_COVERAGE
    ("+447700900100", "2024-01-01"),  # NO_DATA / NUMBER_NOT_COVERED
    ("+12025550104", "2020-06-01"),  # REASSIGNED (a known disconnect wins)
]


def load_stubs():
    """Generates the Python modules of the proto (grpcio-tools) and imports them."""
    out = tempfile.mkdtemp(prefix="reassigned-pb-")
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    rc = protoc.main([
        "protoc", f"-I{PROTO_ROOT}", f"-I{well_known}",
        f"--python_out={out}", f"--grpc_python_out={out}",
        "reassigned/v1/reassigned.proto",
    ])
    if rc != 0:
        sys.exit(f"protoc failed ({rc}) on {PROTO_ROOT}")
    sys.path.insert(0, out)
    from reassigned.v1 import reassigned_pb2, reassigned_pb2_grpc
    return reassigned_pb2, reassigned_pb2_grpc


def emit(**fields):
    print(json.dumps(fields), flush=True)


def answer_line(call, pb, answer, since):
    emit(call=call, phone_number=answer.phone_number, since=since,
         status=pb.ReassignmentStatus.Name(answer.status),
         no_data_reason=pb.NoDataReason.Name(answer.no_data_reason))


def error_details(err):
    """The gRPC code and the google.rpc details of an error (grpc-status-details-bin)."""
    out = {"code": err.code().name, "message": err.details()}
    status = rpc_status.from_call(err)
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out["field_violations"] = [
                {"field": v.field, "description": v.description} for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            out["retry_delay_seconds"] = retry.retry_delay.ToTimedelta().total_seconds()
    return out


def main():
    pb, pb_grpc = load_stubs()
    demo = Path("demo-data/certs")
    read = lambda var, default: Path(os.environ.get(var, default)).read_bytes()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read("REASSIGNED_CA", demo / "ca.pem"),
        private_key=read("REASSIGNED_KEY", demo / "platform-a.key"),
        certificate_chain=read("REASSIGNED_CERT", demo / "platform-a.pem"),
    )
    auth = [("authorization", f"Bearer {os.environ['TOKEN']}")]
    target = os.environ.get("REASSIGNED_TARGET", "localhost:50051")

    with grpc.secure_channel(target, credentials) as channel:
        api = pb_grpc.ReassignedNumbersStub(channel)
        checks = [pb.CheckNumberRequest(phone_number=n, since=s) for n, s in SANDBOX]

        for check in checks:
            answer_line("CheckNumber", pb, api.CheckNumber(check, metadata=auth), check.since)

        batch = api.BatchCheckNumbers(pb.BatchCheckNumbersRequest(checks=checks), metadata=auth)
        for check, result in zip(checks, batch.results):
            if result.WhichOneof("result") == "answer":
                answer_line("BatchCheckNumbers", pb, result.answer, check.since)
            else:
                emit(call="BatchCheckNumbers", error=result.error.code, message=result.error.message)

        for check, result in zip(checks, api.StreamCheckNumbers(iter(checks), metadata=auth)):
            answer_line("StreamCheckNumbers", pb, result.answer, check.since)

        status = api.GetMirrorStatus(pb.GetMirrorStatusRequest(), metadata=auth)
        emit(call="GetMirrorStatus", data_as_of=status.data_as_of,
             coverage_start=status.coverage_start,
             covered_prefixes=list(status.covered_prefixes),
             record_count=status.record_count, stale=status.stale)

        # A malformed number and an impossible date: INVALID_ARGUMENT + BadRequest.
        try:
            api.CheckNumber(pb.CheckNumberRequest(phone_number="+1415", since="2025-02-30"),
                            metadata=auth)
            emit(call="CheckNumber", unexpected="no error for bad input")
        except grpc.RpcError as err:
            emit(call="CheckNumber", provoked="bad_request", **error_details(err))

        # 1,000 numbers at once, beyond the interop server's daily quota:
        # RESOURCE_EXHAUSTED + RetryInfo.
        big = pb.BatchCheckNumbersRequest(checks=checks[:1] * 1000)
        try:
            api.BatchCheckNumbers(big, metadata=auth)
            emit(call="BatchCheckNumbers", unexpected="no quota error")
        except grpc.RpcError as err:
            emit(call="BatchCheckNumbers", provoked="retry_info", **error_details(err))


if __name__ == "__main__":
    main()
