#!/usr/bin/env bash
# Runs every fuzz target in turn and minimizes its corpus into fuzz/corpus/<target>.
#   fuzz/run.sh [RUNS] [SECONDS]      defaults: 10000000 runs, at most 600 s per target
#   TARGETS="config splice" fuzz/run.sh …   only those targets
# Needs cargo-fuzz (`cargo install cargo-fuzz`) and a nightly compiler, or the stable
# one with RUSTC_BOOTSTRAP=1 (set here). One job, niced: the machine is shared.
# Built without AddressSanitizer (-s none): pgwarden is safe Rust, so what fuzzing
# finds is panics, overflows (debug assertions stay on), hangs and memory blow-ups,
# and runs go several times faster. FUZZ_FLAGS="" brings ASan back.
# Prints one line per target: executions, seconds, exec/s, and whether it crashed;
# crash inputs land in fuzz/artifacts/<target>/.
set -uo pipefail
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1
runs=${1:-10000000}
seconds=${2:-600}
flags=${FUZZ_FLAGS--s none}
targets=${TARGETS:-$(cargo fuzz list)}
nice -n 19 cargo fuzz build -O $flags || exit 1
mkdir -p logs
for t in $targets; do
    mkdir -p "corpus/$t"
    nice -n 19 cargo fuzz run -O $flags "$t" "corpus/$t" -- \
        -runs="$runs" -max_total_time="$seconds" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
        -jobs=1 -workers=1 -print_final_stats=1 >"logs/$t.log" 2>&1
    rc=$?
    # Keep a small corpus: only inputs that add coverage, at most 1 KiB each, and
    # where that is still more than 300 files (config, splice), the 300 smallest.
    nice -n 19 cargo fuzz cmin -O $flags "$t" "corpus/$t" >/dev/null 2>&1 || true
    find "corpus/$t" -type f -size +1024c -delete
    find "corpus/$t" -type f -printf '%s %p\n' | sort -n | tail -n +301 | cut -d' ' -f2- | xargs -r rm -f
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "logs/$t.log" | tail -1 | grep -o '[0-9]*$')
    speed=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "logs/$t.log" | tail -1 | grep -o '[0-9]*$')
    files=$(ls "corpus/$t" | wc -l)
    printf '%-18s executions=%s exec/s=%s corpus=%s exit=%s\n' "$t" "${execs:-?}" "${speed:-?}" "$files" "$rc"
done
