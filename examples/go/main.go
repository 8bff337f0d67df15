// Command reassigned-client is an example Go client of the reassigned gRPC
// API (grpc-go).
//
// It connects with mutual TLS and a bearer token, asks the sandbox numbers
// with CheckNumber, BatchCheckNumbers and StreamCheckNumbers, reads
// GetMirrorStatus, and decodes google.rpc.BadRequest and google.rpc.RetryInfo
// from two errors it provokes. It prints one JSON object per line.
//
// Settings (environment): REASSIGNED_TARGET (default localhost:50051),
// REASSIGNED_CA, REASSIGNED_CERT, REASSIGNED_KEY (PEM files, default the
// demo's demo-data/certs/ca.pem, platform-a.pem, platform-a.key) and TOKEN.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"os"
	"path/filepath"
	"time"

	reassignedv1 "github.com/reassigned/reassigned/gen/go/reassigned/v1"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
)

// The sandbox numbers (README "Sandbox numbers"): each gives one fixed answer.
var sandbox = [][2]string{
	{"+12025550100", "2024-06-01"},  // REASSIGNED
	{"+12025550101", "2024-07-01"},  // NOT_REASSIGNED (disconnected before since)
	{"+12025550102", "2024-01-01"},  // NOT_REASSIGNED (never disconnected)
	{"+12025550103", "2020-06-01"},  // NO_DATA / BEFORE_COVERAGE
	{"+447700900100", "2024-01-01"}, // NO_DATA / NUMBER_NOT_COVERED
	{"+12025550104", "2020-06-01"},  // REASSIGNED (a known disconnect wins)
}

// bearer sends `authorization: Bearer <token>` with every call.
type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

func (bearer) RequireTransportSecurity() bool { return true }

func emit(fields map[string]interface{}) {
	line, err := json.Marshal(fields)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(string(line))
}

func answerLine(call string, a *reassignedv1.CheckNumberResponse, since string) {
	emit(map[string]interface{}{
		"call": call, "phone_number": a.GetPhoneNumber(), "since": since,
		"status": a.GetStatus().String(), "no_data_reason": a.GetNoDataReason().String(),
	})
}

// errorDetails is the gRPC code and the google.rpc details of an error.
func errorDetails(provoked string, call string, err error) map[string]interface{} {
	st := status.Convert(err)
	out := map[string]interface{}{
		"call": call, "provoked": provoked, "message": st.Message(),
		"code": codeName(st.Code().String()),
	}
	for _, d := range st.Details() {
		switch d := d.(type) {
		case *errdetails.BadRequest:
			var violations []map[string]string
			for _, v := range d.GetFieldViolations() {
				violations = append(violations, map[string]string{"field": v.GetField(), "description": v.GetDescription()})
			}
			out["field_violations"] = violations
		case *errdetails.RetryInfo:
			delay := d.GetRetryDelay()
			out["retry_delay_seconds"] = (time.Duration(delay.GetSeconds())*time.Second + time.Duration(delay.GetNanos())).Seconds()
		}
	}
	return out
}

// codeName turns grpc-go's code names (InvalidArgument) into the
// canonical ones (INVALID_ARGUMENT).
func codeName(camel string) string {
	var out []rune
	for i, r := range camel {
		if i > 0 && r >= 'A' && r <= 'Z' {
			out = append(out, '_')
		}
		if r >= 'a' && r <= 'z' {
			r -= 'a' - 'A'
		}
		out = append(out, r)
	}
	return string(out)
}

func env(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

func main() {
	demo := filepath.Join("demo-data", "certs")
	ca, err := os.ReadFile(env("REASSIGNED_CA", filepath.Join(demo, "ca.pem")))
	if err != nil {
		log.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(ca) {
		log.Fatal("no CA certificate in REASSIGNED_CA")
	}
	cert, err := tls.LoadX509KeyPair(env("REASSIGNED_CERT", filepath.Join(demo, "platform-a.pem")),
		env("REASSIGNED_KEY", filepath.Join(demo, "platform-a.key")))
	if err != nil {
		log.Fatal(err)
	}
	creds := credentials.NewTLS(&tls.Config{RootCAs: roots, Certificates: []tls.Certificate{cert}})
	conn, err := grpc.Dial(env("REASSIGNED_TARGET", "localhost:50051"),
		grpc.WithTransportCredentials(creds), grpc.WithPerRPCCredentials(bearer(os.Getenv("TOKEN"))))
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	api := reassignedv1.NewReassignedNumbersClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	var checks []*reassignedv1.CheckNumberRequest
	for _, s := range sandbox {
		checks = append(checks, &reassignedv1.CheckNumberRequest{PhoneNumber: s[0], Since: s[1]})
	}

	for _, c := range checks {
		a, err := api.CheckNumber(ctx, c)
		if err != nil {
			log.Fatal(err)
		}
		answerLine("CheckNumber", a, c.Since)
	}

	batch, err := api.BatchCheckNumbers(ctx, &reassignedv1.BatchCheckNumbersRequest{Checks: checks})
	if err != nil {
		log.Fatal(err)
	}
	for i, r := range batch.GetResults() {
		if a := r.GetAnswer(); a != nil {
			answerLine("BatchCheckNumbers", a, checks[i].Since)
		} else {
			emit(map[string]interface{}{"call": "BatchCheckNumbers", "error": r.GetError().GetCode(), "message": r.GetError().GetMessage()})
		}
	}

	stream, err := api.StreamCheckNumbers(ctx)
	if err != nil {
		log.Fatal(err)
	}
	for _, c := range checks {
		if err := stream.Send(c); err != nil {
			log.Fatal(err)
		}
	}
	if err := stream.CloseSend(); err != nil {
		log.Fatal(err)
	}
	for i := 0; ; i++ {
		r, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			log.Fatal(err)
		}
		answerLine("StreamCheckNumbers", r.GetAnswer(), checks[i].Since)
	}

	s, err := api.GetMirrorStatus(ctx, &reassignedv1.GetMirrorStatusRequest{})
	if err != nil {
		log.Fatal(err)
	}
	emit(map[string]interface{}{
		"call": "GetMirrorStatus", "data_as_of": s.GetDataAsOf(), "coverage_start": s.GetCoverageStart(),
		"covered_prefixes": s.GetCoveredPrefixes(), "record_count": s.GetRecordCount(), "stale": s.GetStale(),
	})

	// A malformed number and an impossible date: INVALID_ARGUMENT + BadRequest.
	if _, err := api.CheckNumber(ctx, &reassignedv1.CheckNumberRequest{PhoneNumber: "+1415", Since: "2025-02-30"}); err != nil {
		emit(errorDetails("bad_request", "CheckNumber", err))
	} else {
		emit(map[string]interface{}{"call": "CheckNumber", "unexpected": "no error for bad input"})
	}

	// 1,000 numbers at once, beyond the interop server's daily quota:
	// RESOURCE_EXHAUSTED + RetryInfo.
	big := &reassignedv1.BatchCheckNumbersRequest{}
	for i := 0; i < 1000; i++ {
		big.Checks = append(big.Checks, checks[0])
	}
	if _, err := api.BatchCheckNumbers(ctx, big); err != nil {
		emit(errorDetails("retry_info", "BatchCheckNumbers", err))
	} else {
		emit(map[string]interface{}{"call": "BatchCheckNumbers", "unexpected": "no quota error"})
	}
}
