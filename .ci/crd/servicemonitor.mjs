// Validates every ServiceMonitor in the rendered manifests given as
// arguments against the Prometheus Operator's CRD schema (the validators
// that @kubernetes-models/prometheus-operator compiles from it): types,
// required fields, enums and patterns (e.g. an `interval` of `30` or
// `30 seconds` fails). Unknown fields are not reported: the CRD's schema
// does not forbid them (the API server prunes them), and neither does this.
// kubernetes-validate, which checks every other object in .ci/run, bundles
// no CRD schemas. Exits 1 on an invalid object, or if a rendered file has
// no ServiceMonitor at all, or if a deliberately broken copy passes (the
// validator would then be checking nothing).
import fs from "node:fs";
import * as yaml from "js-yaml";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

let failed = false;
for (const file of process.argv.slice(2)) {
  const monitors = yaml
    .loadAll(fs.readFileSync(file, "utf8"))
    .filter((doc) => doc && doc.kind === "ServiceMonitor");
  if (monitors.length === 0) {
    console.error(`${file}: no ServiceMonitor`);
    failed = true;
  }
  for (const monitor of monitors) {
    const name = `${file}: ServiceMonitor ${monitor.metadata?.name}`;
    try {
      new ServiceMonitor(monitor).validate();
      console.log(`${name}: valid (CRD schema monitoring.coreos.com/v1)`);
    } catch (e) {
      console.error(`${name}: ${e.message}`);
      failed = true;
    }
    const broken = structuredClone(monitor);
    broken.spec.endpoints = [{ ...(broken.spec.endpoints?.[0] ?? {}), interval: 30 }];
    let caught = false;
    try {
      new ServiceMonitor(broken).validate();
    } catch {
      caught = true;
    }
    if (!caught) {
      console.error(`${name}: a broken copy (interval: 30) passed: the validator checks nothing`);
      failed = true;
    }
  }
}
process.exit(failed ? 1 : 0);
