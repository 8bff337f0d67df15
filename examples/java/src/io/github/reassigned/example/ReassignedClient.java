package io.github.reassigned.example;

import com.google.gson.Gson;
import com.google.protobuf.Any;
import com.google.protobuf.InvalidProtocolBufferException;
import com.google.rpc.BadRequest;
import com.google.rpc.RetryInfo;
import io.github.reassigned.v1.BatchCheckNumbersRequest;
import io.github.reassigned.v1.BatchCheckNumbersResponse;
import io.github.reassigned.v1.BatchCheckResult;
import io.github.reassigned.v1.CheckNumberRequest;
import io.github.reassigned.v1.CheckNumberResponse;
import io.github.reassigned.v1.GetMirrorStatusRequest;
import io.github.reassigned.v1.GetMirrorStatusResponse;
import io.github.reassigned.v1.ReassignedNumbersGrpc;
import io.grpc.CallCredentials;
import io.grpc.ManagedChannel;
import io.grpc.Metadata;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.netty.GrpcSslContexts;
import io.grpc.netty.NettyChannelBuilder;
import io.grpc.protobuf.StatusProto;
import io.grpc.stub.StreamObserver;
import io.netty.handler.ssl.SslContextBuilder;
import io.netty.handler.ssl.SslProvider;
import java.io.File;
import java.util.ArrayList;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.Executor;
import java.util.concurrent.TimeUnit;

/**
 * Example Java client of the reassigned gRPC API (grpc-java).
 *
 * <p>Connects with mutual TLS and a bearer token, asks the sandbox numbers with CheckNumber,
 * BatchCheckNumbers and StreamCheckNumbers, reads GetMirrorStatus, and decodes
 * google.rpc.BadRequest and google.rpc.RetryInfo from two errors it provokes. Prints one JSON
 * object per line.
 *
 * <p>Settings (environment): REASSIGNED_TARGET (default localhost:50051), REASSIGNED_CA,
 * REASSIGNED_CERT, REASSIGNED_KEY (PEM files, default the demo's demo-data/certs/ca.pem,
 * platform-a.pem, platform-a.key) and TOKEN.
 */
public final class ReassignedClient {
  /** The sandbox numbers (README "Sandbox numbers"): each gives one fixed answer. */
  private static final String[][] SANDBOX = {
    {"+12025550100", "2024-06-01"}, // REASSIGNED
    {"+12025550101", "2024-07-01"}, // NOT_REASSIGNED (disconnected before since)
    {"+12025550102", "2024-01-01"}, // NOT_REASSIGNED (never disconnected)
    {"+12025550103", "2020-06-01"}, // NO_DATA / BEFORE_COVERAGE
    {"+447700900100", "2024-01-01"}, // NO_DATA / NUMBER_NOT_COVERED
    {"+12025550104", "2020-06-01"}, // REASSIGNED (a known disconnect wins)
  };

  private static final Gson GSON = new Gson();

  private ReassignedClient() {}

  /** Sends {@code authorization: Bearer <token>} with every call. */
  private static final class Bearer extends CallCredentials {
    private static final Metadata.Key<String> AUTHORIZATION =
        Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER);
    private final String token;

    Bearer(String token) {
      this.token = token;
    }

    @Override
    public void applyRequestMetadata(RequestInfo info, Executor executor, MetadataApplier applier) {
      Metadata headers = new Metadata();
      headers.put(AUTHORIZATION, "Bearer " + token);
      applier.apply(headers);
    }

    @Override
    public void thisUsesUnstableApi() {}
  }

  private static void emit(Map<String, Object> fields) {
    System.out.println(GSON.toJson(fields));
  }

  private static void answerLine(String call, CheckNumberResponse a, String since) {
    Map<String, Object> line = new LinkedHashMap<>();
    line.put("call", call);
    line.put("phone_number", a.getPhoneNumber());
    line.put("since", since);
    line.put("status", a.getStatus().name());
    line.put("no_data_reason", a.getNoDataReason().name());
    emit(line);
  }

  /** The gRPC code and the google.rpc details of an error (grpc-status-details-bin). */
  private static Map<String, Object> errorDetails(String call, String provoked, StatusRuntimeException e)
      throws InvalidProtocolBufferException {
    Map<String, Object> out = new LinkedHashMap<>();
    out.put("call", call);
    out.put("provoked", provoked);
    out.put("code", e.getStatus().getCode().name());
    out.put("message", e.getStatus().getDescription());
    com.google.rpc.Status status = StatusProto.fromThrowable(e);
    for (Any detail : status == null ? List.<Any>of() : status.getDetailsList()) {
      if (detail.is(BadRequest.class)) {
        List<Map<String, String>> violations = new ArrayList<>();
        for (BadRequest.FieldViolation v : detail.unpack(BadRequest.class).getFieldViolationsList()) {
          violations.add(Map.of("field", v.getField(), "description", v.getDescription()));
        }
        out.put("field_violations", violations);
      } else if (detail.is(RetryInfo.class)) {
        com.google.protobuf.Duration d = detail.unpack(RetryInfo.class).getRetryDelay();
        out.put("retry_delay_seconds", d.getSeconds() + d.getNanos() / 1e9);
      }
    }
    return out;
  }

  private static String env(String name, String fallback) {
    String v = System.getenv(name);
    return v == null || v.isEmpty() ? fallback : v;
  }

  public static void main(String[] args) throws Exception {
    String demo = "demo-data/certs/";
    ManagedChannel channel =
        NettyChannelBuilder.forTarget(env("REASSIGNED_TARGET", "localhost:50051"))
            .sslContext(
                // OpenSSL (netty-tcnative): Debian's netty has no JDK ALPN.
                GrpcSslContexts.configure(SslContextBuilder.forClient(), SslProvider.OPENSSL)
                    .trustManager(new File(env("REASSIGNED_CA", demo + "ca.pem")))
                    .keyManager(
                        new File(env("REASSIGNED_CERT", demo + "platform-a.pem")),
                        new File(env("REASSIGNED_KEY", demo + "platform-a.key")))
                    .build())
            .build();
    try {
      Bearer bearer = new Bearer(System.getenv("TOKEN"));
      ReassignedNumbersGrpc.ReassignedNumbersBlockingStub api =
          ReassignedNumbersGrpc.newBlockingStub(channel)
              .withCallCredentials(bearer)
              .withDeadlineAfter(30, TimeUnit.SECONDS);
      List<CheckNumberRequest> checks = new ArrayList<>();
      for (String[] s : SANDBOX) {
        checks.add(CheckNumberRequest.newBuilder().setPhoneNumber(s[0]).setSince(s[1]).build());
      }

      for (CheckNumberRequest c : checks) {
        answerLine("CheckNumber", api.checkNumber(c), c.getSince());
      }

      BatchCheckNumbersResponse batch =
          api.batchCheckNumbers(BatchCheckNumbersRequest.newBuilder().addAllChecks(checks).build());
      for (int i = 0; i < batch.getResultsCount(); i++) {
        BatchCheckResult r = batch.getResults(i);
        if (r.hasAnswer()) {
          answerLine("BatchCheckNumbers", r.getAnswer(), checks.get(i).getSince());
        } else {
          emit(Map.of("call", "BatchCheckNumbers", "error", r.getError().getCode(),
              "message", r.getError().getMessage()));
        }
      }

      List<BatchCheckResult> streamed = Collections.synchronizedList(new ArrayList<>());
      CompletableFuture<Void> done = new CompletableFuture<>();
      StreamObserver<CheckNumberRequest> requests =
          ReassignedNumbersGrpc.newStub(channel)
              .withCallCredentials(bearer)
              .streamCheckNumbers(
                  new StreamObserver<BatchCheckResult>() {
                    @Override
                    public void onNext(BatchCheckResult r) {
                      streamed.add(r);
                    }

                    @Override
                    public void onError(Throwable t) {
                      done.completeExceptionally(t);
                    }

                    @Override
                    public void onCompleted() {
                      done.complete(null);
                    }
                  });
      checks.forEach(requests::onNext);
      requests.onCompleted();
      done.get(30, TimeUnit.SECONDS);
      for (int i = 0; i < streamed.size(); i++) {
        answerLine("StreamCheckNumbers", streamed.get(i).getAnswer(), checks.get(i).getSince());
      }

      GetMirrorStatusResponse s = api.getMirrorStatus(GetMirrorStatusRequest.getDefaultInstance());
      Map<String, Object> status = new LinkedHashMap<>();
      status.put("call", "GetMirrorStatus");
      status.put("data_as_of", s.getDataAsOf());
      status.put("coverage_start", s.getCoverageStart());
      status.put("covered_prefixes", s.getCoveredPrefixesList());
      status.put("record_count", s.getRecordCount());
      status.put("stale", s.getStale());
      emit(status);

      // A malformed number and an impossible date: INVALID_ARGUMENT + BadRequest.
      try {
        api.checkNumber(
            CheckNumberRequest.newBuilder().setPhoneNumber("+1415").setSince("2025-02-30").build());
        emit(Map.of("call", "CheckNumber", "unexpected", "no error for bad input"));
      } catch (StatusRuntimeException e) {
        emit(errorDetails("CheckNumber", "bad_request", e));
      }

      // 1,000 numbers at once, beyond the interop server's daily quota:
      // RESOURCE_EXHAUSTED + RetryInfo.
      try {
        api.batchCheckNumbers(
            BatchCheckNumbersRequest.newBuilder()
                .addAllChecks(Collections.nCopies(1000, checks.get(0)))
                .build());
        emit(Map.of("call", "BatchCheckNumbers", "unexpected", "no quota error"));
      } catch (StatusRuntimeException e) {
        emit(errorDetails("BatchCheckNumbers", "retry_info", e));
      }
    } finally {
      channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }
  }
}
