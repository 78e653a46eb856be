#!/usr/bin/env python3
"""Checks the rendered manifests say what SPEC says; run by scripts/check-manifests.sh.

usage: check-manifests.py BASE.yaml CERT_MANAGER.yaml EXAMPLES.yaml VERSION [REMORA_INJECTOR]
Each file is the `kubectl kustomize` output of manifests/, manifests/cert-manager and
manifests/examples: the injector and remora-control. With the path of a built remora-injector,
also checks that it accepts the Deployments' arguments and environment. Prints one line per check group and exits 1 on the
first failure.
"""

import os
import subprocess
import sys

import yaml

SYSTEM_NAMESPACES = {"kube-system", "kube-public", "kube-node-lease"}
OWN_NAMESPACE = "remora-system"
NAME = "remora-injector"
SECRET = "remora-injector-tls"
INJECT_LABEL = "remora.io/inject"
CONTROL = "remora-control"
# SPEC "Fixed numbers": gRPC 8090 behind the Service of that name, admin 9990.
CONTROL_GRPC_PORT = 9990 - 1900
CONTROL_ADMIN_PORT = 9990
CONTROL_ADDR = f"{CONTROL}.{OWN_NAMESPACE}.svc:{CONTROL_GRPC_PORT}"
# SPEC "remora-control": list+watch of these kinds, and nothing else (Pods as metadata).
CONTROL_READS = {
    ("", "services"),
    ("discovery.k8s.io", "endpointslices"),
    ("gateway.networking.k8s.io", "httproutes"),
    ("gateway.networking.k8s.io", "grpcroutes"),
    ("gateway.networking.k8s.io", "referencegrants"),
    ("", "pods"),
}
# SPEC "Workload identity and mTLS": TokenReviews, and the identity CA's Secret in remora-system.
CONTROL_CREATES = {("authentication.k8s.io", "tokenreviews")}
IDENTITY_CA_SECRET = "remora-identity-ca"


class CheckFailed(Exception):
    pass


def check(condition, message):
    if not condition:
        raise CheckFailed(message)


def load(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def find(docs, kind, name=None):
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs, kind, name):
    found = find(docs, kind, name)
    check(len(found) == 1, f"expected exactly one {kind} {name}, found {len(found)}")
    return found[0]


def selector_matches(selector, labels):
    """Kubernetes LabelSelector semantics (matchLabels AND every matchExpression)."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def namespace_labels(name, inject=None):
    labels = {"kubernetes.io/metadata.name": name}  # set by the API server on every namespace
    if inject is not None:
        labels[INJECT_LABEL] = inject
    return labels


def check_registration(docs):
    """SPEC "Opting in and out", webhook by webhook and namespace by namespace."""
    config = one(docs, "MutatingWebhookConfiguration", NAME)
    webhooks = config.get("webhooks") or []
    by_path = {w["clientConfig"]["service"]["path"]: w for w in webhooks}
    check(len(webhooks) == 2 and set(by_path) == {"/inject", "/inject/opt-in"},
          f"expected two webhooks on /inject and /inject/opt-in, got {sorted(by_path)}")
    expected_policy = {"/inject": "Fail", "/inject/opt-in": "Ignore"}
    for path, hook in by_path.items():
        where = f"webhook {hook['name']} ({path})"
        service = hook["clientConfig"]["service"]
        check((service["name"], service["namespace"], service.get("port", 443)) == (NAME, OWN_NAMESPACE, 443),
              f"{where}: calls {service}, expected Service {OWN_NAMESPACE}/{NAME} port 443")
        check("url" not in hook["clientConfig"], f"{where}: must call the Service, not a URL")
        check(hook.get("failurePolicy") == expected_policy[path],
              f"{where}: failurePolicy {hook.get('failurePolicy')}, SPEC says {expected_policy[path]}")
        rules = hook.get("rules") or []
        check(len(rules) == 1, f"{where}: expected one rule, got {rules}")
        rule = rules[0]
        check(rule.get("operations") == ["CREATE"], f"{where}: operations {rule.get('operations')}, SPEC says [CREATE]")
        check(rule.get("resources") == ["pods"], f"{where}: resources {rule.get('resources')}, SPEC says [pods]")
        check(rule.get("apiGroups") == [""] and rule.get("apiVersions") == ["v1"],
              f"{where}: rule must match core/v1 pods, got {rule}")
        check(hook.get("sideEffects") == "None", f"{where}: sideEffects {hook.get('sideEffects')}, SPEC says None")
        check(hook.get("admissionReviewVersions") == ["v1"],
              f"{where}: admissionReviewVersions {hook.get('admissionReviewVersions')}, SPEC says [v1]")
        check(hook.get("reinvocationPolicy") == "IfNeeded",
              f"{where}: reinvocationPolicy {hook.get('reinvocationPolicy')}, SPEC says IfNeeded")
        timeout = hook.get("timeoutSeconds")
        check(isinstance(timeout, int) and 1 <= timeout <= 5, f"{where}: timeoutSeconds {timeout}, SPEC says at most 5")
        # Pod-level opt-in/out is by label OR annotation, decided by the injector: an
        # objectSelector would hide annotated pods from it.
        check(not hook.get("objectSelector"), f"{where}: no objectSelector (the injector decides per pod)")

    # Which webhook sees a pod in which namespace.
    cases = [
        ("a namespace labelled enabled", namespace_labels("shop", "enabled"), ["/inject"]),
        ("a namespace labelled disabled", namespace_labels("shop", "disabled"), []),
        ("an unlabelled namespace", namespace_labels("default"), ["/inject/opt-in"]),
        ("a namespace with another label value", namespace_labels("shop", "maybe"), ["/inject/opt-in"]),
    ]
    for ns in sorted(SYSTEM_NAMESPACES | {OWN_NAMESPACE}):
        cases += [
            (f"{ns}", namespace_labels(ns), []),
            (f"{ns} even labelled enabled", namespace_labels(ns, "enabled"), []),
        ]
    for what, labels, expected in cases:
        matched = sorted(p for p, h in by_path.items() if selector_matches(h.get("namespaceSelector"), labels))
        check(matched == sorted(expected), f"pods in {what}: reach webhooks {matched}, SPEC says {expected}")
    print(f"ok: registration matches SPEC ({len(cases)} namespace cases)")
    return config


def container(deployment, name="injector"):
    containers = deployment["spec"]["template"]["spec"]["containers"]
    found = [c for c in containers if c["name"] == name]
    check(len(found) == 1, f"Deployment {deployment['metadata']['name']}: no container {name}")
    return found[0]


def check_hardened(c, pod, what):
    """Resources set; non-root, no privilege escalation, read-only root, no capability, seccomp."""
    resources = c.get("resources") or {}
    for kind in ("requests", "limits"):
        check({"cpu", "memory"} <= set(resources.get(kind) or {}), f"{what}: resources.{kind} needs cpu and memory")
    sc, psc = c.get("securityContext") or {}, pod.get("securityContext") or {}
    check(sc.get("allowPrivilegeEscalation") is False, f"{what}: allowPrivilegeEscalation must be false")
    check(sc.get("readOnlyRootFilesystem") is True, f"{what}: readOnlyRootFilesystem must be true")
    check((sc.get("capabilities") or {}).get("drop") == ["ALL"], f"{what}: capabilities must drop ALL")
    check(sc.get("runAsNonRoot") or psc.get("runAsNonRoot"), f"{what}: runAsNonRoot must be true")
    check((sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault",
          f"{what}: seccompProfile must be RuntimeDefault")
    check(not (sc.get("capabilities") or {}).get("add"), f"{what} needs no capability")


def check_spread(pod, labels, what):
    spread = pod.get("topologySpreadConstraints") or []
    anti = ((pod.get("affinity") or {}).get("podAntiAffinity") or {})
    terms = anti.get("preferredDuringSchedulingIgnoredDuringExecution") or []
    check(any(t["topologyKey"] == "kubernetes.io/hostname" and selector_matches(t["labelSelector"], labels) for t in spread),
          f"{what}: replicas are not spread across nodes")
    check(any(t["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
              and selector_matches(t["podAffinityTerm"]["labelSelector"], labels) for t in terms),
          f"{what}: no podAntiAffinity keeping replicas on different nodes")


def arg_value(args, flag):
    return next((a.split("=", 1)[1] for a in args if a.startswith(flag + "=")), None)


def mounted_volume(deployment, c, path):
    """The volume mounted at the directory holding `path`, or None."""
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"].get("volumes") or []}
    for mount in c.get("volumeMounts") or []:
        if path is not None and path.rsplit("/", 1)[0] == mount["mountPath"]:
            return volumes.get(mount["name"])
    return None


def check_control(docs, version):
    """remora-control (SPEC "remora-control", issue 23): Deployment, Service, PDB."""
    deployment = one(docs, "Deployment", CONTROL)
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    c = container(deployment, "control")
    where = f"Deployment {CONTROL}"
    check(deployment["metadata"]["namespace"] == OWN_NAMESPACE, f"{where} must be in remora-system")
    check(spec["replicas"] == 2, f"{where}: replicas {spec['replicas']}, the issue says 2")
    labels = spec["template"]["metadata"]["labels"]
    check(selector_matches(spec["selector"], labels), f"{where}: the selector does not match its pods")
    check(pod.get("serviceAccountName") == CONTROL, f"{where} must run as its own ServiceAccount {CONTROL}")
    check_spread(pod, labels, where)
    image = f"ghcr.io/remora-mesh/remora-control:{version}"
    check(c["image"] == image, f"{where}: image {c['image']}, expected {image} (the workspace version)")
    args = c.get("args") or []
    check(args[:1] == ["serve"] and "--plaintext" not in args, f"{where} runs `serve` over TLS, got {args}")
    # SPEC "Workload identity and mTLS": its serving certificate chains to the identity CA, so
    # the one ca.crt proxies get verifies both: remora-control issues it (no --tls-cert).
    for flag in ("--tls-cert", "--tls-key"):
        check(arg_value(args, flag) is None and flag not in args,
              f"{where}: {flag} given; remora-control must serve the certificate its identity CA issues")
    env = {e["name"]: e for e in c.get("env") or []}
    field = ((env.get("POD_NAMESPACE") or {}).get("valueFrom") or {}).get("fieldRef") or {}
    check(field.get("fieldPath") == "metadata.namespace",
          f"{where}: POD_NAMESPACE from the downward API names its serving certificate's namespace, got {env}")
    ports = {p["name"]: p["containerPort"] for p in c.get("ports") or []}
    check(ports.get("grpc") == CONTROL_GRPC_PORT and ports.get("admin") == CONTROL_ADMIN_PORT,
          f"{where}: ports grpc {CONTROL_GRPC_PORT} and admin {CONTROL_ADMIN_PORT} (SPEC), got {ports}")
    for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/live")):
        get = (c.get(probe) or {}).get("httpGet") or {}
        port = ports.get(get.get("port"), get.get("port"))
        check((get.get("path"), port, get.get("scheme", "HTTP")) == (path, CONTROL_ADMIN_PORT, "HTTP"),
              f"{where}: {probe}: expected GET {path} on {CONTROL_ADMIN_PORT}, got {get}")
    check_hardened(c, pod, where)

    service = one(docs, "Service", CONTROL)
    check(service["metadata"]["namespace"] == OWN_NAMESPACE, f"Service {CONTROL} must be in remora-system")
    check(selector_matches({"matchLabels": service["spec"]["selector"]}, labels), f"Service {CONTROL} does not select its pods")
    sports = service["spec"]["ports"]
    check(len(sports) == 1, f"Service {CONTROL}: one port, got {sports}")
    sport = sports[0]
    check((sport["port"], sport.get("name"), sport.get("appProtocol"), ports.get(sport["targetPort"], sport["targetPort"]))
          == (CONTROL_GRPC_PORT, "grpc", "grpc", CONTROL_GRPC_PORT),
          f"Service {CONTROL}: port {CONTROL_GRPC_PORT} named grpc, appProtocol grpc, to {CONTROL_GRPC_PORT}; got {sport}")
    pdb = one(docs, "PodDisruptionBudget", CONTROL)
    check(selector_matches(pdb["spec"]["selector"], labels), f"PodDisruptionBudget {CONTROL} does not select its pods")
    check(pdb["spec"].get("minAvailable") == 1 or pdb["spec"].get("maxUnavailable") == 1,
          f"PodDisruptionBudget {CONTROL} must keep one replica up")
    print("ok: remora-control Deployment, Service, PodDisruptionBudget")


def check_control_rbac(docs, secret_mode):
    """remora-control may list and watch what it indexes, create TokenReviews, and (keeping its CA
    in a Secret) get/update that Secret and create Secrets in remora-system; nothing else."""
    account = one(docs, "ServiceAccount", CONTROL)
    check(account["metadata"]["namespace"] == OWN_NAMESPACE, f"ServiceAccount {CONTROL} must be in remora-system")
    role = one(docs, "ClusterRole", CONTROL)
    granted = {"list+watch": set(), "create": set()}
    for rule in role["rules"]:
        check(set(rule) <= {"apiGroups", "resources", "verbs"},
              f"ClusterRole {CONTROL}: no resourceNames or nonResourceURLs expected: {rule}")
        verbs = sorted(rule["verbs"])
        check(verbs in (["list", "watch"], ["create"]), f"ClusterRole {CONTROL}: list and watch, or create alone, got {rule}")
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                check("*" not in (group, resource), f"ClusterRole {CONTROL}: no wildcards: {rule}")
                granted["+".join(verbs)].add((group, resource))
    check(granted["list+watch"] == CONTROL_READS,
          f"ClusterRole {CONTROL} grants list/watch on {sorted(granted['list+watch'])}, SPEC says exactly {sorted(CONTROL_READS)}")
    check(granted["create"] == CONTROL_CREATES,
          f"ClusterRole {CONTROL} grants create on {sorted(granted['create'])}, SPEC says exactly {sorted(CONTROL_CREATES)}")
    own_role = find(docs, "Role", CONTROL)
    own_binding = find(docs, "RoleBinding", CONTROL)
    if secret_mode:
        check(len(own_role) == 1 and len(own_binding) == 1, f"Role and RoleBinding {CONTROL} keep the identity CA's Secret")
        check(own_role[0]["metadata"]["namespace"] == OWN_NAMESPACE, f"Role {CONTROL} must be in remora-system")
        rules = sorted((sorted(r["verbs"]), r.get("resourceNames")) for r in own_role[0]["rules"])
        for r in own_role[0]["rules"]:
            check(r.get("apiGroups") == [""] and r.get("resources") == ["secrets"], f"Role {CONTROL} grants more than Secrets: {r}")
        check(rules == [(["create"], None), (["get", "update"], [IDENTITY_CA_SECRET])],
              f"Role {CONTROL}: get/update of Secret {IDENTITY_CA_SECRET} and create of Secrets, nothing else; got {rules}")
        check(own_binding[0]["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": CONTROL}
              and own_binding[0]["subjects"] == [{"kind": "ServiceAccount", "name": CONTROL, "namespace": OWN_NAMESPACE}],
              f"RoleBinding {CONTROL} must bind Role {CONTROL} to its ServiceAccount alone")
    else:
        check(not own_role and not own_binding, f"with the CA as files, remora-control needs no Role")
    subject = {"kind": "ServiceAccount", "name": CONTROL, "namespace": OWN_NAMESPACE}
    binding = one(docs, "ClusterRoleBinding", CONTROL)
    check(binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": CONTROL},
          f"ClusterRoleBinding {CONTROL} must bind ClusterRole {CONTROL}")
    check(binding["subjects"] == [subject], f"ClusterRoleBinding {CONTROL} must bind only {subject}")
    # Nothing else grants it anything, and its role is bound to nobody else.
    for kind in ("RoleBinding", "ClusterRoleBinding"):
        for other in find(docs, kind):
            if other is binding or other in own_binding:
                continue
            check(subject not in (other.get("subjects") or []), f"{kind} {other['metadata']['name']} also binds {CONTROL}")
            check(other["roleRef"]["name"] != CONTROL, f"{kind} {other['metadata']['name']} binds ClusterRole {CONTROL}")
    print(f"ok: remora-control RBAC (list/watch on {len(CONTROL_READS)} kinds, create tokenreviews"
          + (f", Secret {IDENTITY_CA_SECRET} in {OWN_NAMESPACE})" if secret_mode else ")"))


def check_control_ca(docs, files):
    """Where remora-control's identity CA comes from: its Secret (base), or files (cert-manager):
    the CA that issues its own serving certificate, so one ca.crt verifies both."""
    deployment = one(docs, "Deployment", CONTROL)
    c = container(deployment, "control")
    args = c.get("args") or []
    cert, key = arg_value(args, "--ca-cert"), arg_value(args, "--ca-key")
    if not files:
        check(cert is None and key is None, f"the base keeps the identity CA in Secret {IDENTITY_CA_SECRET}, got {args}")
        print(f"ok: remora-control keeps its identity CA in Secret {IDENTITY_CA_SECRET}")
        return
    check(cert is not None and key is not None, f"the cert-manager overlay gives remora-control --ca-cert and --ca-key, got {args}")
    secrets = set()
    for flag, value in (("--ca-cert", cert), ("--ca-key", key)):
        volume = mounted_volume(deployment, c, value)
        secret = (volume or {}).get("secret") or {}
        check(secret.get("secretName"), f"{flag} {value} must be read from a mounted Secret, got {volume}")
        secrets.add(secret["secretName"])
    check(len(secrets) == 1, f"--ca-cert and --ca-key from one Secret, got {secrets}")
    ca_secret = secrets.pop()
    ca_cert = [d for d in find(docs, "Certificate") if d["spec"].get("secretName") == ca_secret]
    check(len(ca_cert) == 1 and ca_cert[0]["spec"].get("isCA") is True, f"Secret {ca_secret} must be a cert-manager CA (isCA)")
    # The injector's ca.crt (the proxies' trust anchors) is that of its Certificate's issuer:
    # it must be this CA, which issues remora-control's serving certificate and every peer's.
    webhook_cert = [d for d in find(docs, "Certificate") if d["spec"].get("secretName") == SECRET]
    check(len(webhook_cert) == 1, f"one Certificate writes Secret {SECRET}, got {len(webhook_cert)}")
    ref = webhook_cert[0]["spec"]["issuerRef"]
    issuer = one(docs, ref.get("kind", "Issuer"), ref["name"])
    check((issuer["spec"].get("ca") or {}).get("secretName") == ca_secret,
          f"the trust anchors (ca.crt of {SECRET}) must be the identity CA ({ca_secret}), got issuer {issuer['spec']}")
    print(f"ok: remora-control's identity CA is Secret {ca_secret}, whose certificate the injector's ca.crt is")


def check_injector_control_flags(docs, what, identity_secret):
    """The injector gives proxies the Service's address, and as trust anchors the identity CA's
    certificate: the ca.crt of Secret remora-identity-ca, that key alone (`identity_secret`,
    the base), or the ca.crt beside its own pair (cert-manager, where that is the same CA)."""
    deployment = one(docs, "Deployment", NAME)
    c = container(deployment)
    args = c.get("args") or []
    service = one(docs, "Service", CONTROL)
    grpc = service["spec"]["ports"][0]["port"]
    want = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc:{grpc}"
    check(want == CONTROL_ADDR, f"{what}: Service {CONTROL} is at {want}, SPEC says {CONTROL_ADDR}")
    check(arg_value(args, "--control-addr") in (None, want),
          f"{what}: the injector's --control-addr {arg_value(args, '--control-addr')} is not {want}")
    anchors = arg_value(args, "--trust-anchors")
    check(anchors is not None and anchors.endswith("/ca.crt"), f"{what}: --trust-anchors must name a ca.crt, got {anchors}")
    volume = mounted_volume(deployment, c, anchors)
    check(volume is not None, f"{what}: --trust-anchors {anchors} is in no mounted volume")
    if identity_secret:
        secret = volume.get("secret") or {}
        check(secret.get("secretName") == IDENTITY_CA_SECRET
              and secret.get("items") == [{"key": "ca.crt", "path": "ca.crt"}],
              f"{what}: --trust-anchors must be the ca.crt of Secret {IDENTITY_CA_SECRET}, that key alone "
              f"(never its CA key), got {volume}")
        check(arg_value(args, "--control-tls-secret") == "",
              f"{what}: remora-control issues its own certificate: the injector must issue it none (--control-tls-secret=)")
        source = f"the ca.crt of Secret {IDENTITY_CA_SECRET}"
    else:
        cert = arg_value(args, "--tls-cert")
        check(cert is not None and anchors.rsplit("/", 1)[0] == cert.rsplit("/", 1)[0],
              f"{what}: --trust-anchors must be the ca.crt beside --tls-cert ({cert}), got {anchors}")
        source = "the CA bundle beside its certificate"
    print(f"ok: {what}: the injector gives proxies --control {want} and {source}")


def check_deployment(docs, version):
    deployment = one(docs, "Deployment", NAME)
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    c = container(deployment)
    check(deployment["metadata"]["namespace"] == OWN_NAMESPACE, "the Deployment must be in remora-system")
    check(spec["replicas"] == 2, f"replicas {spec['replicas']}, the issue says 2")
    labels = spec["template"]["metadata"]["labels"]
    check(selector_matches(spec["selector"], labels), "the Deployment selector does not match its pods")
    spread = pod.get("topologySpreadConstraints") or []
    anti = ((pod.get("affinity") or {}).get("podAntiAffinity") or {})
    check(any(t["topologyKey"] == "kubernetes.io/hostname" and selector_matches(t["labelSelector"], labels) for t in spread)
          or anti, "replicas are not spread across nodes")
    image = f"ghcr.io/remora-mesh/remora-injector:{version}"
    check(c["image"] == image, f"image {c['image']}, expected {image} (the workspace version)")
    env = {e["name"]: e for e in c.get("env") or []}
    for var, repo in (("REMORA_PROXY_IMAGE", "remora-proxy"), ("REMORA_INIT_IMAGE", "remora-init")):
        want = f"ghcr.io/remora-mesh/{repo}:{version}"
        check(var not in env or env[var].get("value") == want, f"{var} is {env.get(var)}, expected {want}")
    check(env.get("POD_NAMESPACE", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace",
          "POD_NAMESPACE must come from the downward API")
    ports = {p["name"]: p["containerPort"] for p in c.get("ports") or []}
    check(ports.get("https") == 8443, f"container port https must be 8443 (SPEC), got {ports}")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = (c.get(probe) or {}).get("httpGet") or {}
        port = ports.get(get.get("port"), get.get("port"))
        check((get.get("path"), port, get.get("scheme")) == (path, 8443, "HTTPS"),
              f"{probe}: expected HTTPS GET {path} on 8443, got {get}")
    check_hardened(c, pod, NAME)

    service = one(docs, "Service", NAME)
    check(selector_matches({"matchLabels": service["spec"]["selector"]}, labels), "the Service does not select the pods")
    sports = service["spec"]["ports"]
    check(len(sports) == 1 and sports[0]["port"] == 443 and ports.get(sports[0]["targetPort"], sports[0]["targetPort"]) == 8443,
          f"the Service must map 443 to 8443, got {sports}")
    pdb = one(docs, "PodDisruptionBudget", NAME)
    check(selector_matches(pdb["spec"]["selector"], labels), "the PodDisruptionBudget does not select the pods")
    check(pdb["spec"].get("minAvailable") == 1 or pdb["spec"].get("maxUnavailable") == 1,
          "the PodDisruptionBudget must keep one replica up")
    namespace = one(docs, "Namespace", OWN_NAMESPACE)
    check(namespace["metadata"].get("labels", {}).get(INJECT_LABEL) == "disabled", "remora-system must be labelled disabled")
    print("ok: Deployment, Service, PodDisruptionBudget")
    return deployment


def check_rbac(docs):
    role = one(docs, "Role", NAME)
    check(role["metadata"]["namespace"] == OWN_NAMESPACE, "the Role must be in remora-system")
    for rule in role["rules"]:
        check(rule.get("apiGroups") == [""] and rule.get("resources") == ["secrets"], f"Role grants more than Secrets: {rule}")
        check("*" not in rule["verbs"], f"Role uses a wildcard verb: {rule}")
        if rule.get("resourceNames"):
            check(rule["resourceNames"] == [SECRET], f"Role must name its own Secret, nothing else: {rule}")
        else:
            # create cannot be limited by name; nothing else may be unrestricted.
            check(rule["verbs"] == ["create"], f"only create may be granted on every Secret: {rule}")
    verbs = {v for r in role["rules"] for v in r["verbs"]}
    check(verbs == {"create", "get", "update"}, f"Secret verbs {sorted(verbs)}, the manager uses create, get, update")
    cluster_role = one(docs, "ClusterRole", NAME)
    check(len(cluster_role["rules"]) == 1, "the ClusterRole must hold one rule")
    rule = cluster_role["rules"][0]
    check((rule["apiGroups"], rule["resources"], rule.get("resourceNames"), sorted(rule["verbs"]))
          == (["admissionregistration.k8s.io"], ["mutatingwebhookconfigurations"], [NAME], ["get", "patch"]),
          f"the ClusterRole must allow get/patch of its own registration only: {rule}")
    for kind in ("RoleBinding", "ClusterRoleBinding"):
        binding = one(docs, kind, NAME)
        check(binding["subjects"] == [{"kind": "ServiceAccount", "name": NAME, "namespace": OWN_NAMESPACE}],
              f"{kind} must bind only the injector's ServiceAccount")
    deployment = one(docs, "Deployment", NAME)
    check(deployment["spec"]["template"]["spec"].get("serviceAccountName") == NAME, "the Deployment must use its ServiceAccount")
    print("ok: RBAC (own Secret, own registration)")


def check_self_managed(docs):
    c = container(one(docs, "Deployment", NAME))
    args = c.get("args") or []
    check(args[:1] == ["serve"] and "--manage-certs" in args, f"the base runs `serve --manage-certs`, got {args}")
    mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts") or []}
    for flag, file in (("--tls-cert", "tls.crt"), ("--tls-key", "tls.key")):
        value = next((a.split("=", 1)[1] for a in args if a.startswith(flag + "=")), None)
        check(value is not None and any(value == f"{p}/{file}" for p in mounts.values()),
              f"{flag} must point into a mounted volume, got {value} with mounts {mounts}")


def check_cert_manager(docs, version):
    config = check_registration(docs)
    deployment = check_deployment(docs, version)
    c = container(deployment)
    args = c.get("args") or []
    check("--manage-certs" not in args, "the cert-manager overlay must run in file mode")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounted = [volumes[m["name"]] for m in c["volumeMounts"]]
    check(any((v.get("secret") or {}).get("secretName") == SECRET for v in mounted),
          f"the cert-manager overlay must mount Secret {SECRET}")
    source = (config["metadata"].get("annotations") or {}).get("cert-manager.io/inject-ca-from", "")
    ns, _, cert_name = source.partition("/")
    cert = one(docs, "Certificate", cert_name)
    check(cert["metadata"]["namespace"] == ns == OWN_NAMESPACE, f"inject-ca-from {source!r} names no Certificate here")
    check(cert["spec"]["secretName"] == SECRET, f"Certificate {cert_name} must write Secret {SECRET}")
    check(f"{NAME}.{OWN_NAMESPACE}.svc" in cert["spec"]["dnsNames"], "the Certificate must name the Service as the API server dials it")
    issuer = cert["spec"]["issuerRef"]
    one(docs, issuer.get("kind", "Issuer"), issuer["name"])
    for kind in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"):
        check(not find(docs, kind, NAME), f"file mode needs no {kind}")
    items = ((mounted_volume(deployment, c, arg_value(args, "--trust-anchors")) or {}).get("secret") or {}).get("items")
    check(not items or any(i["key"] == "ca.crt" for i in items), "the injector's Secret volume must include ca.crt")
    print("ok: cert-manager overlay (file mode, Certificate, inject-ca-from, no RBAC)")


def check_examples(docs):
    namespaces = {d["metadata"]["name"]: d for d in find(docs, "Namespace")}
    meshed = [n for n, d in namespaces.items() if d["metadata"].get("labels", {}).get(INJECT_LABEL) == "enabled"]
    check(len(meshed) == 1, f"the examples need one namespace labelled {INJECT_LABEL}=enabled")
    workloads = [d for d in docs if d["kind"] in ("Deployment", "Pod") and d["metadata"].get("namespace") == meshed[0]]

    def pod_meta(d):
        return d["spec"]["template"]["metadata"] if d["kind"] == "Deployment" else d["metadata"]

    def opts_out(d):
        meta = pod_meta(d)
        return (meta.get("labels") or {}).get(INJECT_LABEL, (meta.get("annotations") or {}).get(INJECT_LABEL)) in ("false", "disabled")

    check(any(not opts_out(d) for d in workloads), "the examples need a meshed workload")
    check(any(opts_out(d) for d in workloads), "the examples need a pod that opts out")
    print("ok: examples (a meshed namespace, a workload, a pod that opts out)")


PROBE_POD = "apiVersion: v1\nkind: Pod\nmetadata: {name: probe}\nspec:\n  containers: [{name: app, image: busybox}]\n"


def check_binary_accepts(deployment, binary, what):
    """The Deployment's args parse, and its REMORA_* variables are ones the injector reads."""
    c = container(deployment)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/")}
    for var in c.get("env") or []:
        env[var["name"]] = var.get("value", OWN_NAMESPACE)  # valueFrom: the downward API's value
    # clap stops at --help only once every argument before it parsed.
    run = subprocess.run([binary, *c["args"], "--help"], env=env, capture_output=True, text=True, timeout=30)
    check(run.returncode == 0, f"{what}: remora-injector rejects {c['args']}: {run.stderr.strip()}")
    # Every variable the Deployment sets must be one `serve` reads (clap lists them as [env: NAME=]).
    known = " ".join(run.stdout.split())
    for var in c.get("env") or []:
        check(f"{var['name']}=" in known, f"{what}: env {var['name']} is not read by `remora-injector serve`")
    # A variable with a wrong name would be ignored silently: inject with probe values instead.
    probes = {k: f"example.invalid/{k.lower().replace('_', '-')}:probe" for k in env if k.endswith("_IMAGE")}
    run = subprocess.run([binary, "inject", "-f", "-"], env={**env, **probes}, input=PROBE_POD,
                         capture_output=True, text=True, timeout=30)
    check(run.returncode == 0, f"{what}: remora-injector inject fails with the Deployment's environment: {run.stderr.strip()}")
    for var, image in probes.items():
        check(image in run.stdout, f"{what}: {var} is not read by remora-injector (its value never reaches the pod)")
    print(f"ok: {what}: remora-injector accepts the Deployment's arguments and environment")


if __name__ == "__main__":
    base_file, cert_manager_file, examples_file, version = sys.argv[1:5]
    try:
        base = load(base_file)
        check_registration(base)
        check_deployment(base, version)
        check_rbac(base)
        check_self_managed(base)
        check_control(base, version)
        check_control_rbac(base, secret_mode=True)
        check_control_ca(base, files=False)
        check_injector_control_flags(base, "manifests", identity_secret=True)
        cert_manager = load(cert_manager_file)
        check_cert_manager(cert_manager, version)
        check_control(cert_manager, version)
        check_control_rbac(cert_manager, secret_mode=False)
        check_control_ca(cert_manager, files=True)
        check_injector_control_flags(cert_manager, "manifests/cert-manager", identity_secret=False)
        check_examples(load(examples_file))
        if len(sys.argv) > 5:
            check_binary_accepts(one(load(base_file), "Deployment", NAME), sys.argv[5], "manifests")
            check_binary_accepts(one(load(cert_manager_file), "Deployment", NAME), sys.argv[5], "manifests/cert-manager")
    except CheckFailed as failure:
        print(f"FAIL: {failure}", file=sys.stderr)
        sys.exit(1)
    except (KeyError, IndexError, TypeError) as missing:
        print(f"FAIL: a manifest lacks a field the checks read: {missing!r}", file=sys.stderr)
        sys.exit(1)
