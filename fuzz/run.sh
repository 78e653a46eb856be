#!/usr/bin/env bash
# Runs the fuzz targets (see fuzz/README.md).
#   fuzz/run.sh smoke [TARGET...]   each target over its seeds and regressions, then a few
#                                   seconds more (FUZZ_SMOKE_SECONDS, default 3); no sanitizer
#   fuzz/run.sh fuzz [TARGET...]    each target for FUZZ_SECONDS (default 60) with AddressSanitizer
# Either fails if a target crashes, hangs (FUZZ_TIMEOUT seconds for one input, default 5) or
# allocates without bound (one allocation over FUZZ_MALLOC_MB, default 512, or more than
# FUZZ_RSS_MB resident, default 2048); the input is then in fuzz/artifacts/<target>/.
# New inputs found go to fuzz/work/<target>/ (not committed); fuzz/corpus/<target>/ holds the
# seeds and fuzz/regressions/<target>/ the inputs that once failed.
set -euo pipefail
cd "$(dirname "$0")/.."

# cargo-fuzz needs nightly flags; stable rustc accepts them with this.
export RUSTC_BOOTSTRAP=1
CARGO=${CARGO:-cargo}
ALL=(hpack_decode h2_relay_frames h1_response detect admission_review init_flags routes client_hello identity_csr)

mode=${1:-}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${ALL[@]}")
case "$mode" in
  smoke)
    sanitizer=none
    seconds=${FUZZ_SMOKE_SECONDS:-3}
    ;;
  fuzz)
    sanitizer=${FUZZ_SANITIZER:-address}
    seconds=${FUZZ_SECONDS:-60}
    ;;
  *)
    echo "usage: $0 smoke|fuzz [TARGET...]" >&2
    exit 2
    ;;
esac

dict_of() {
  case "$1" in
    hpack_decode | h2_relay_frames) echo fuzz/dict/hpack.dict ;;
    h1_response) echo fuzz/dict/http1.dict ;;
    admission_review) echo fuzz/dict/admission.dict ;;
    init_flags) echo fuzz/dict/init_flags.dict ;;
    *) echo "" ;;
  esac
}

# Each sanitizer builds everything with other flags: a target directory of its own each, so
# that a smoke run after a fuzz run (or the reverse) does not rebuild the whole tree.
build=(--sanitizer "$sanitizer")
[ "$sanitizer" = address ] || build+=(--target-dir "fuzz/target/$sanitizer")
# A smoke run builds with cargo-fuzz's --dev: fuzz/Cargo.toml's [profile.dev] says why.
if [ "$mode" = smoke ]; then build+=(--dev); fi
start=$(date +%s)
$CARGO fuzz build "${build[@]}"
echo "fuzz build ($sanitizer): $(($(date +%s) - start)) s"

summary=()
failed=0
for target in "${targets[@]}"; do
  mkdir -p "fuzz/work/$target" "fuzz/corpus/$target" "fuzz/regressions/$target" "fuzz/artifacts/$target"
  dict=$(dict_of "$target")
  log="fuzz/work/$target.log"
  limits=(-timeout="${FUZZ_TIMEOUT:-5}" -rss_limit_mb="${FUZZ_RSS_MB:-2048}" -malloc_limit_mb="${FUZZ_MALLOC_MB:-512}")
  args=(
    "${limits[@]}"
    -max_total_time="$seconds"
    -max_len="${FUZZ_MAX_LEN:-16384}"
    -print_final_stats=1
    -artifact_prefix="fuzz/artifacts/$target/"
  )
  [ -z "$dict" ] || args+=(-dict="$dict")
  # Past failures first, each file whole (a corpus directory's inputs are cut at -max_len);
  # then the run: its first directory takes what it finds, the seeds are only read.
  regressions=("fuzz/regressions/$target"/*)
  if { [ ! -e "${regressions[0]}" ] \
    || $CARGO fuzz run "${build[@]}" "$target" "${regressions[@]}" -- "${limits[@]}"; } >"$log" 2>&1 \
    && $CARGO fuzz run "${build[@]}" "$target" \
      "fuzz/work/$target" "fuzz/corpus/$target" -- "${args[@]}" >>"$log" 2>&1; then
    status=ok
  else
    status=FAILED
    failed=1
    grep -E 'ERROR|panicked|Test unit written|SUMMARY' "$log" | head -20 >&2 || true
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n1)
  cov=$(grep -Eo 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -n1)
  summary+=("$(printf '%-18s %-6s %12s runs %9s/s  %s' "$target" "$status" "${runs:-?}" "${rate:-?}" "${cov:-}")")
done
printf '%s\n' "${summary[@]}"
exit "$failed"
