#!/usr/bin/env bash
# Proves that a clean clone passes `make test` on a machine that has never
# run it, without relying on anything installed by hand: `make test` runs
# with a PATH that holds only
#   - Debian's essential set (the programs in /bin, /usr/bin, /sbin and
#     /usr/sbin of every package with "Essential: yes"),
#   - the programs on tests/tools/tools.list (what scripts/deps.sh installs),
#   - what README.md asks for first: go (and gofmt) and make,
# with empty GOCACHE, GOMODCACHE and GOPATH, a fresh HOME (so no go env file
# or GOFLAGS) and nothing else in the environment, from a fresh `git clone`
# of a committed branch. A program the code runs that is not on the list is
# not in that PATH, and a test that needs it fails.
#
#   scripts/fresh-check.sh [BRANCH]   (as root; BRANCH defaults to the current one)
#
# It first runs scripts/deps.sh with the normal PATH, as `make test` would
# on a fresh machine (apt-get is not in the restricted PATH). The work
# directory (/tmp/tulle-fresh.*) is removed after a pass (the log is kept
# beside it) and kept after a failure, with the log in it.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
branch=${1:-$(git -C "$repo" rev-parse --abbrev-ref HEAD)}
[ "$(id -u)" -eq 0 ] || { echo "fresh-check: run as root (make test needs it)" >&2; exit 1; }

work=$(mktemp -d /tmp/tulle-fresh.XXXXXX)
echo "fresh-check: $work: clone of $repo branch $branch"
git clone -q --branch "$branch" "$repo" "$work/src"
echo "fresh-check: commit $(git -C "$work/src" rev-parse --short HEAD)"

# What `make test` would install on a fresh machine.
bash "$work/src/scripts/deps.sh"

bin=$work/bin
mkdir -p "$bin" "$work/home" "$work/gocache" "$work/gomodcache" "$work/gopath"
link() { # link PATH: $bin/<base name> -> PATH (the first one wins)
	[ -e "$bin/$(basename "$1")" ] || ln -s "$1" "$bin/$(basename "$1")"
}
essential=$(dpkg-query -W -f='${binary:Package} ${Essential}\n' | awk '$2 == "yes" {print $1}')
n=0
for pkg in $essential; do
	while read -r f; do
		if [ -f "$f" ] && [ -x "$f" ]; then
			link "$f"
			n=$((n + 1))
		fi
	done < <(dpkg -L "$pkg" | grep -E '^/(usr/)?s?bin/[^/]+$' || true)
done
echo "fresh-check: $n programs of the essential packages: $(echo $essential)"

listed=()
while read -r name source _; do
	case "$source" in build) continue ;; esac
	case "$name" in /*) continue ;; esac # run by path, not looked up in PATH
	p=$(command -v "$name") || { echo "fresh-check: $name (on the list) is not installed after deps.sh" >&2; exit 1; }
	link "$p"
	listed+=("$name")
done < <(bash "$work/src/scripts/deps.sh" --print)
echo "fresh-check: listed: ${listed[*]}"
for p in go gofmt make; do
	link "$(command -v "$p")" || { echo "fresh-check: $p is missing (README: Go 1.26 and make)" >&2; exit 1; }
done

log=$work/make-test.log
echo "fresh-check: make test with PATH=$bin ($(ls "$bin" | wc -l) programs), fresh GOCACHE and GOMODCACHE; log: $log"
start=$(date +%s)
set +e
(cd "$work/src" && env -i PATH="$bin" HOME="$work/home" GOCACHE="$work/gocache" \
	GOMODCACHE="$work/gomodcache" GOPATH="$work/gopath" TMPDIR=/tmp LANG=C.UTF-8 \
	make test) >"$log" 2>&1
rc=$?
set -e
secs=$(($(date +%s) - start))
tail -n 30 "$log"
if [ $rc -ne 0 ]; then
	echo "fresh-check: FAILED (make test exit $rc) after ${secs}s; kept $work" >&2
	exit $rc
fi
kept=/tmp/tulle-fresh-$(date +%Y%m%d-%H%M%S).log
cp "$log" "$kept"
echo "fresh-check: passed in $((secs / 60)) min $((secs % 60)) s; the log is $kept"
chmod -R u+w "$work/gomodcache"
rm -rf "$work"
