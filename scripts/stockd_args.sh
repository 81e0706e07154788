# Sourced by the scripts that run one stockd build under one workload
# (callgrind.sh, threads.sh): their arguments are [STOCKD] -- LOADGEN_ARGS.

# parse_stockd_args "$@": sets `bin` (the build; target/release/stockd by
# default) and the array `loadgen_args`, or prints the usage and exits.
parse_stockd_args() {
    bin=target/release/stockd
    if [ $# -gt 0 ] && [ "$1" != "--" ]; then bin=$1; shift; fi
    [ "${1:-}" = "--" ] || { echo "usage: $0 [STOCKD] -- LOADGEN_ARGS..." >&2; exit 2; }
    shift
    loadgen_args=("$@")
}
