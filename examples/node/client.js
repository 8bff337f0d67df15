// Example Node client of the reassigned gRPC API (@grpc/grpc-js).
//
// Connects with mutual TLS and a bearer token, asks the sandbox numbers with
// CheckNumber, BatchCheckNumbers and StreamCheckNumbers, reads
// GetMirrorStatus, and decodes google.rpc.BadRequest and google.rpc.RetryInfo
// from two errors it provokes. Prints one JSON object per line.
//
// Settings (environment): REASSIGNED_TARGET (default localhost:50051),
// REASSIGNED_CA, REASSIGNED_CERT, REASSIGNED_KEY (PEM files, default the
// demo's demo-data/certs/ca.pem, platform-a.pem, platform-a.key) and TOKEN.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTO_ROOT = process.env.REASSIGNED_PROTO || path.join(__dirname, '..', '..', 'proto');
const GOOGLE_PROTOS = path.dirname(require.resolve('google-proto-files/package.json'));

// The sandbox numbers (README "Sandbox numbers"): each gives one fixed answer.
const SANDBOX = [
  ['+12025550100', '2024-06-01'], // REASSIGNED
  ['+12025550101', '2024-07-01'], // NOT_REASSIGNED (disconnected before since)
  ['+12025550102', '2024-01-01'], // NOT_REASSIGNED (never disconnected)
  ['+12025550103', '2020-06-01'], // NO_DATA / BEFORE_COVERAGE
  ['+447700900100', '2024-01-01'], // NO_DATA / NUMBER_NOT_COVERED
  ['+12025550104', '2020-06-01'], // REASSIGNED (a known disconnect wins)
];

// enums as names, 64-bit integers as numbers, defaults filled in.
const LOAD = { keepCase: true, enums: String, longs: Number, defaults: true, oneofs: true };
const pb = grpc.loadPackageDefinition(
  protoLoader.loadSync('reassigned/v1/reassigned.proto', { ...LOAD, includeDirs: [PROTO_ROOT] }),
).reassigned.v1;

// google.rpc.Status and its details, to decode grpc-status-details-bin.
const rpc = new protobuf.Root();
rpc.resolvePath = (_, target) => path.join(GOOGLE_PROTOS, target);
rpc.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto']);
const Status = rpc.lookupType('google.rpc.Status');
const BadRequest = rpc.lookupType('google.rpc.BadRequest');
const RetryInfo = rpc.lookupType('google.rpc.RetryInfo');

function emit(fields) {
  process.stdout.write(JSON.stringify(fields) + '\n');
}

function answerLine(call, answer, since) {
  const { phone_number, status, no_data_reason } = answer;
  emit({ call, phone_number, since, status, no_data_reason });
}

// The gRPC code and the google.rpc details of an error.
function errorDetails(err) {
  const out = { code: grpc.status[err.code], message: err.details };
  const [bin] = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (!bin) return out;
  for (const any of Status.decode(bin).details) {
    const type = any.type_url.split('/').pop();
    if (type === 'google.rpc.BadRequest') {
      out.field_violations = BadRequest.decode(any.value).fieldViolations.map((v) => ({
        field: v.field,
        description: v.description,
      }));
    } else if (type === 'google.rpc.RetryInfo') {
      const d = RetryInfo.decode(any.value).retryDelay || {};
      out.retry_delay_seconds = Number(d.seconds || 0) + (d.nanos || 0) / 1e9;
    }
  }
  return out;
}

// Calls a unary method as a promise.
function unary(api, method, request, metadata) {
  return new Promise((resolve, reject) => {
    api[method](request, metadata, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

async function main() {
  const demo = path.join('demo-data', 'certs');
  const read = (name, file) => fs.readFileSync(process.env[name] || path.join(demo, file));
  const credentials = grpc.credentials.createSsl(
    read('REASSIGNED_CA', 'ca.pem'),
    read('REASSIGNED_KEY', 'platform-a.key'),
    read('REASSIGNED_CERT', 'platform-a.pem'),
  );
  const api = new pb.ReassignedNumbers(process.env.REASSIGNED_TARGET || 'localhost:50051', credentials);
  const auth = new grpc.Metadata();
  auth.set('authorization', `Bearer ${process.env.TOKEN}`);
  const checks = SANDBOX.map(([phone_number, since]) => ({ phone_number, since }));

  for (const check of checks) {
    answerLine('CheckNumber', await unary(api, 'CheckNumber', check, auth), check.since);
  }

  const batch = await unary(api, 'BatchCheckNumbers', { checks }, auth);
  batch.results.forEach((r, i) => {
    if (r.answer) answerLine('BatchCheckNumbers', r.answer, checks[i].since);
    else emit({ call: 'BatchCheckNumbers', error: r.error.code, message: r.error.message });
  });

  const stream = api.StreamCheckNumbers(auth);
  checks.forEach((c) => stream.write(c));
  stream.end();
  let i = 0;
  for await (const r of stream) answerLine('StreamCheckNumbers', r.answer, checks[i++].since);

  const s = await unary(api, 'GetMirrorStatus', {}, auth);
  emit({
    call: 'GetMirrorStatus',
    data_as_of: s.data_as_of,
    coverage_start: s.coverage_start,
    covered_prefixes: s.covered_prefixes,
    record_count: s.record_count,
    stale: s.stale,
  });

  // A malformed number and an impossible date: INVALID_ARGUMENT + BadRequest.
  try {
    await unary(api, 'CheckNumber', { phone_number: '+1415', since: '2025-02-30' }, auth);
    emit({ call: 'CheckNumber', unexpected: 'no error for bad input' });
  } catch (err) {
    emit({ call: 'CheckNumber', provoked: 'bad_request', ...errorDetails(err) });
  }

  // 1,000 numbers at once, beyond the interop server's daily quota:
  // RESOURCE_EXHAUSTED + RetryInfo.
  try {
    await unary(api, 'BatchCheckNumbers', { checks: Array(1000).fill(checks[0]) }, auth);
    emit({ call: 'BatchCheckNumbers', unexpected: 'no quota error' });
  } catch (err) {
    emit({ call: 'BatchCheckNumbers', provoked: 'retry_info', ...errorDetails(err) });
  }
  api.close();
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
