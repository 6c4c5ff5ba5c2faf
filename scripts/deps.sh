#!/usr/bin/env bash
# Installs the programs that the tests, the demo and the benchmark run, as
# listed in tests/tools/tools.list (the one list; the Go code refuses to run
# a program that is not on it), when they are missing: Debian packages with
# apt-get, promtool out of Debian's prometheus package. Quiet unless it
# installs something (one line) or fails (then it prints apt's log).
#   scripts/deps.sh           install what is missing (needs root)
#   scripts/deps.sh --print   print the list as this script reads it
set -euo pipefail
cd "$(dirname "$0")/.."
list=tests/tools/tools.list

missing() {
	case "$1" in
	/*) [ ! -x "$1" ] ;;
	*) ! command -v "$1" >/dev/null ;;
	esac
}

debs=() files=() absent=()
while read -r name source rest; do
	case "$name" in '' | '#'* | library | via) continue ;; esac
	if [ "${1:-}" = --print ]; then
		echo "$name $source $rest"
		continue
	fi
	missing "$name" || continue
	read -r -a from <<<"$rest"
	case "$source" in
	deb)
		for pkg in "${from[@]}"; do
			[[ " ${debs[*]} " == *" $pkg "* ]] || debs+=("$pkg")
		done
		;;
	deb-file) files+=("$name ${from[0]} ${from[1]}") ;;
	essential) absent+=("$name (Debian's essential package ${from[0]})") ;;
	toolchain) absent+=("$name (the Go toolchain: see README.md)") ;;
	build) ;; # the tests build it
	*) echo "deps: $list: $name: unknown source $source" >&2; exit 1 ;;
	esac
done <"$list"
[ "${1:-}" = --print ] && exit 0

if [ ${#absent[@]} -gt 0 ]; then
	printf 'deps: missing, and not installed by this script: %s\n' "${absent[@]}" >&2
	exit 1
fi
[ ${#debs[@]} -eq 0 ] && [ ${#files[@]} -eq 0 ] && exit 0

pkgs=("${debs[@]}")
for f in "${files[@]}"; do
	read -r name pkg _ <<<"$f"
	pkgs+=("$name from $pkg")
done
if [ "$(id -u)" -ne 0 ]; then
	echo "deps: missing ${pkgs[*]}; run as root (or: apt-get install -y ${debs[*]})" >&2
	exit 1
fi
echo "deps: installing ${pkgs[*]} (Debian packages)"
log=$(mktemp /tmp/tulle-deps.XXXXXX.log)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() {
	echo "deps: $1 failed; the log ($log):" >&2
	cat "$log" >&2
	exit 1
}
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >>"$log" 2>&1 || fail "apt-get update"
if [ ${#debs[@]} -gt 0 ]; then
	apt-get install -y -q --no-install-recommends "${debs[@]}" >>"$log" 2>&1 || fail "apt-get install ${debs[*]}"
fi
# A file out of a package without installing the package (installing
# prometheus would start a server, for promtool alone).
for f in "${files[@]}"; do
	read -r name pkg path <<<"$f"
	(cd "$work" && apt-get download "$pkg" && dpkg-deb -x "$pkg"_*.deb "x-$pkg") >>"$log" 2>&1 || fail "apt-get download $pkg"
	install -m 0755 "$work/x-$pkg$path" "/usr/local/bin/$name" >>"$log" 2>&1 || fail "install $path from $pkg"
done
still=()
while read -r name source _; do
	case "$name" in '' | '#'* | library | via) continue ;; esac
	[ "$source" = build ] && continue
	missing "$name" && still+=("$name")
done <"$list"
if [ ${#still[@]} -gt 0 ]; then
	fail "installing (still missing: ${still[*]})"
fi
rm -f "$log"
