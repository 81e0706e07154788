#!/usr/bin/env bash
# Release builds of several commits, stripped and packed for a machine
# without cargo (a many-core machine lent for a few minutes).
#
#   scripts/dist.sh OUT NAME=REF [NAME=REF...]
#   scripts/dist.sh /tmp/dist main=HEAD owned-keys=lead/owned-keys de5a316=de5a316
#
# Each REF is checked out in a worktree of its own and built with a
# target directory of its own (target/dist/NAME, kept for the next run,
# its workspace crates cleaned first if it last built another commit):
# cargo names a path dependency's artifacts alike whatever the checkout,
# so two commits built into one target directory take each other's
# crates for fresh and a binary can mix them (it happened: a server
# built from main with an older commit's log crate). Writes
# OUT/NAME/stockd and OUT/NAME/stock-loadgen (stripped; the loadgen
# only where the commit has one), the commit each was built from in
# OUT/NAME/commit, and OUT.tar.xz with all of them. Run the binaries
# there with the scripts of this tree (ab.sh LG=..., scale.sh BIN=...).
set -euo pipefail
cd "$(dirname "$0")/.."
usage() { echo "usage: $0 OUT NAME=REF [NAME=REF...]" >&2; exit 2; }
[ $# -ge 2 ] || usage
out=$1
shift
for spec in "$@"; do
    case $spec in
        *=*) ;;
        *) echo "dist.sh: '$spec' is not NAME=REF" >&2; usage ;;
    esac
    name=${spec%%=*}
    [[ $name =~ ^[A-Za-z0-9._-]+$ ]] || { echo "dist.sh: name '$name': letters, digits, '.', '_' and '-' only" >&2; exit 2; }
    git rev-parse --verify -q "${spec#*=}^{commit}" > /dev/null || { echo "dist.sh: '${spec#*=}' is not a commit here" >&2; exit 2; }
done
command -v strip > /dev/null || { echo "dist.sh needs strip (binutils)" >&2; exit 1; }

root=$PWD
mkdir -p "$out"
for spec in "$@"; do
    name=${spec%%=*} commit=$(git rev-parse "${spec#*=}^{commit}")
    wt=$(mktemp -d /tmp/stockd-dist.XXXXXX)
    git worktree add -q --detach "$wt" "$commit"
    echo "dist.sh: $name = ${commit:0:12}, building in $wt (target/dist/$name)"
    pkgs=(-p stockd)
    grep -q '"loadgen"' "$wt/Cargo.toml" && pkgs+=(-p stock-loadgen)
    target=$root/target/dist/$name
    if [ -f "$target/built-from" ] && [ "$(cat "$target/built-from")" != "$commit" ]; then
        # Another commit was built under this name: its workspace crates
        # must not pass for this one's, so they are cleaned first.
        members=$(cd "$wt" && cargo metadata -q --no-deps --format-version 1 \
            | python3 -c 'import json, sys; print(" ".join("-p " + p["name"] for p in json.load(sys.stdin)["packages"]))')
        # shellcheck disable=SC2086
        (cd "$wt" && CARGO_TARGET_DIR="$target" cargo clean -q --release $members)
    fi
    (cd "$wt" && CARGO_TARGET_DIR="$target" cargo build --release -q "${pkgs[@]}")
    echo "$commit" > "$target/built-from"
    mkdir -p "$out/$name"
    for bin in stockd stock-loadgen; do
        if [ -f "$root/target/dist/$name/release/$bin" ]; then
            cp "$root/target/dist/$name/release/$bin" "$out/$name/"
            strip "$out/$name/$bin"
        fi
    done
    echo "$commit" > "$out/$name/commit"
    git worktree remove --force "$wt"
done
tar -cJf "$out.tar.xz" -C "$(dirname "$out")" "$(basename "$out")"
echo "dist.sh: $(du -h "$out.tar.xz" | cut -f1) in $out.tar.xz:"
for d in "$out"/*/; do echo "  $(basename "$d"): $(cut -c1-12 "$d/commit"), $(ls "$d" | grep -v commit | tr '\n' ' ')"; done
