#!/usr/bin/env bash
# Renders every kustomization under manifests/, validates it strictly against the Kubernetes
# 1.33 schemas (kubernetes-validate, from PyPI), and checks the webhook registration, RBAC and
# Deployments (the injector's and remora-control's, whose ClusterRole must grant exactly list and
# watch on what it indexes and create on tokenreviews, and whose Role only keeps the identity CA's
# Secret) say what SPEC and the install docs say (scripts/check-manifests.py);
# also validates the injected golden outputs of `remora-injector inject`
# (injector/tests/golden/*.out.yaml).
# Installs kubernetes-validate into target/ on first use; `make test` runs this.
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION=1.33.0
VALIDATE_VERSION=1.37.0 # ships schemas for 1.33 and strict variants
tools=target/manifests-tools

command -v kubectl >/dev/null 2>&1 || { echo "kubectl is missing (scripts/install-deps.sh test installs it)" >&2; exit 1; }

# A private environment, so the system Python is left alone. Debian without python3-venv
# cannot make one: fall back to a plain --target install.
python=python3
if [ -x "$tools/venv/bin/kubernetes-validate" ]; then
  python="$tools/venv/bin/python"
elif [ -f "$tools/lib/kubernetes_validate/__init__.py" ]; then
  export PYTHONPATH="$PWD/$tools/lib${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "installing kubernetes-validate $VALIDATE_VERSION into $tools"
  mkdir -p "$tools"
  if python3 -m venv "$tools/venv" >/dev/null 2>&1 && "$tools/venv/bin/pip" install -q "kubernetes-validate==$VALIDATE_VERSION"; then
    python="$tools/venv/bin/python"
  else
    rm -rf "$tools/venv"
    python3 -m pip install -q --target "$tools/lib" "kubernetes-validate==$VALIDATE_VERSION" ||
      python3 -m pip install -q --break-system-packages --target "$tools/lib" "kubernetes-validate==$VALIDATE_VERSION"
    export PYTHONPATH="$PWD/$tools/lib${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
validate() { "$python" -c 'import sys; from kubernetes_validate.__main__ import main; sys.exit(main())' "$@"; }

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
out=target/manifests-rendered
rm -rf "$out"
mkdir -p "$out"

status=0
while IFS= read -r kustomization; do
  dir=$(dirname "$kustomization")
  name=$(echo "$dir" | sed 's#^manifests/##; s#/#-#g') # manifests, base, cert-manager, examples
  file="$out/$name.yaml"
  if ! kubectl kustomize "$dir" >"$file"; then
    echo "FAIL: kubectl kustomize $dir" >&2
    status=1
    continue
  fi
  # cert-manager's kinds have no schema here: they are warned about, and checked below.
  if validate --strict --kubernetes-version "$K8S_VERSION" --quiet --no-warn "$file"; then
    echo "ok: $dir renders and validates strictly for Kubernetes $K8S_VERSION ($(grep -c '^kind:' "$file") objects)"
  else
    echo "FAIL: $dir does not validate for Kubernetes $K8S_VERSION" >&2
    status=1
  fi
done < <(find manifests -name kustomization.yaml | sort)
[ "$status" = 0 ] || exit "$status"

# The injected outputs users apply (remora-injector inject's golden files) must pass the same
# strict check. A List has no schema of its own: its items are validated instead. Reading them
# with PyYAML (YAML 1.1, as kubectl reads) also catches a string that would come back as a bool.
for golden in injector/tests/golden/*.out.yaml; do
  file="$out/golden-$(basename "$golden" .out.yaml).yaml"
  "$python" - "$golden" "$file" <<'PY'
import sys, yaml
with open(sys.argv[1], encoding="utf-8") as f:
    docs = [d for d in yaml.safe_load_all(f) if d]
objects = [i for d in docs for i in (d.get("items") or [] if d.get("kind") == "List" else [d])]
with open(sys.argv[2], "w", encoding="utf-8") as f:
    yaml.safe_dump_all(objects, f, sort_keys=False)
PY
  if validate --strict --kubernetes-version "$K8S_VERSION" --quiet "$file"; then
    echo "ok: $golden validates strictly for Kubernetes $K8S_VERSION ($(grep -c '^kind:' "$file") objects)"
  else
    echo "FAIL: $golden does not validate for Kubernetes $K8S_VERSION" >&2
    status=1
  fi
done
[ "$status" = 0 ] || exit "$status"

# With the injector built (make test builds first), also run it on the Deployments' arguments.
injector=target/debug/remora-injector
[ -x "$injector" ] || injector=
"$python" scripts/check-manifests.py "$out/manifests.yaml" "$out/cert-manager.yaml" "$out/examples.yaml" "$version" $injector
