// Validates every manifest of deploy/kubernetes offline against the Kubernetes OpenAPI schema:
// each object becomes its kubernetes-models class (apiVersion + kind), whose validate() checks
// it against the JSON schema of that API version (unknown fields and wrong types included).
// kustomization.yaml must list every manifest. Then writes, for scripts/test-kubernetes.sh,
// what the contract test checks against the uturn binary: the relay container's args and env,
// the files its volume mounts put in place (ConfigMap and Secret data), its probes and its
// preStop command.
//
//   node validate.mjs DIR [CONTRACT.json]
// Exit 0 when every object is valid, 1 otherwise (each error printed).
import { readFileSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { parseAllDocuments } from "yaml";

const dir = process.argv[2] ?? "..";
const contractPath = process.argv[3];
let failures = 0;
const fail = (msg) => {
  failures++;
  console.log(`FAIL ${msg}`);
};

const kustomization = parseAllDocuments(readFileSync(join(dir, "kustomization.yaml"), "utf8"))[0].toJS();
if (kustomization.kind !== "Kustomization" || !Array.isArray(kustomization.resources)) {
  fail("kustomization.yaml: not a Kustomization with resources");
}
const onDisk = readdirSync(dir).filter((f) => f.endsWith(".yaml") && f !== "kustomization.yaml").sort();
for (const f of onDisk) {
  if (!kustomization.resources.includes(f)) fail(`kustomization.yaml does not list ${f}`);
}

// "apps/v1" -> "kubernetes-models/apps/v1"; "v1" -> "kubernetes-models/v1".
async function modelClass(apiVersion, kind) {
  const mod = await import(`kubernetes-models/${apiVersion}`);
  const cls = mod[kind];
  if (!cls) throw new Error(`no model for ${apiVersion} ${kind}`);
  return cls;
}

const objects = [];
for (const file of kustomization.resources) {
  const docs = parseAllDocuments(readFileSync(join(dir, file), "utf8"));
  for (const doc of docs) {
    if (doc.errors.length) {
      fail(`${file}: YAML: ${doc.errors.map((e) => e.message).join("; ")}`);
      continue;
    }
    const obj = doc.toJS();
    if (obj === null) continue;
    const id = `${file}: ${obj.apiVersion} ${obj.kind}/${obj.metadata?.name}`;
    try {
      const Model = await modelClass(obj.apiVersion, obj.kind);
      new Model(obj).validate();
      console.log(`ok   ${id}`);
      objects.push(obj);
    } catch (e) {
      fail(`${id}: ${e.message}`);
    }
  }
}

// What the relay container gets.
const find = (kind, name) => objects.find((o) => o.kind === kind && (!name || o.metadata.name === name));
const ds = find("DaemonSet", "uturn");
if (!ds) {
  fail("no DaemonSet uturn");
} else {
  const spec = ds.spec.template.spec;
  const c = spec.containers.find((x) => x.name === "uturn");
  if (!spec.hostNetwork) fail("DaemonSet uturn: not hostNetwork");
  const files = {};
  for (const m of c.volumeMounts ?? []) {
    const vol = spec.volumes.find((v) => v.name === m.name);
    const src = vol.configMap ? find("ConfigMap", vol.configMap.name) : find("Secret", vol.secret.secretName);
    if (!src) {
      fail(`volume ${m.name}: its ConfigMap or Secret is not in the manifests`);
      continue;
    }
    const data = { ...(src.data ?? {}), ...(src.stringData ?? {}) };
    if (src.kind === "Secret" && src.data) {
      for (const [k, v] of Object.entries(src.data)) data[k] = Buffer.from(v, "base64").toString();
    }
    if (m.subPath) {
      if (!(m.subPath in data)) fail(`volume ${m.name}: no key ${m.subPath}`);
      files[m.mountPath] = data[m.subPath];
    } else {
      for (const [k, v] of Object.entries(data)) files[`${m.mountPath}/${k}`] = v;
    }
  }
  const probe = (p) => p && { host: p.httpGet?.host, path: p.httpGet?.path, port: p.httpGet?.port };
  const contract = {
    args: c.args ?? [],
    command: c.command ?? null,
    env: (c.env ?? []).map((e) => ({ name: e.name, value: e.value ?? null, fieldPath: e.valueFrom?.fieldRef?.fieldPath ?? null })),
    files,
    readiness: probe(c.readinessProbe),
    liveness: probe(c.livenessProbe),
    preStop: c.lifecycle?.preStop?.exec?.command ?? null,
    metricsPort: c.ports.find((p) => p.name === "metrics")?.containerPort ?? null,
  };
  const svc = find("Service", "uturn-metrics");
  if (!svc || svc.spec.ports[0].targetPort !== "metrics") fail("Service uturn-metrics does not target the metrics port");
  if (!find("PodDisruptionBudget")) fail("no PodDisruptionBudget");
  if (contractPath) writeFileSync(contractPath, JSON.stringify(contract, null, 2));
}

console.log(`manifests: ${objects.length} valid, ${failures} failed`);
process.exit(failures ? 1 : 0);
