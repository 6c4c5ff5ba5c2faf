#!/usr/bin/env bash
# Installs what the tests, the demo and the benchmark need, from Debian's
# packages, only when something is missing. Needs root.
set -euo pipefail
need=()
command -v ip >/dev/null         || need+=(iproute2)
command -v iperf3 >/dev/null     || need+=(iperf3)
command -v iptables >/dev/null   || need+=(iptables)
command -v nft >/dev/null        || need+=(nftables)
command -v tcpdump >/dev/null    || need+=(tcpdump)
command -v ethtool >/dev/null    || need+=(ethtool)
command -v ping >/dev/null       || need+=(iputils-ping)
command -v setpriv >/dev/null    || need+=(util-linux)
command -v systemd-analyze >/dev/null || need+=(systemd)
[ -x /usr/lib/cni/bridge ]       || need+=(containernetworking-plugins)
if [ ${#need[@]} -gt 0 ]; then
	if [ "$(id -u)" -ne 0 ]; then
		echo "deps: missing ${need[*]}; run as root (or: apt-get install -y ${need[*]})" >&2
		exit 1
	fi
	echo "deps: installing ${need[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# promtool checks the alert rules; only that binary is taken from Debian's
# prometheus package (installing the package would start a server).
if ! command -v promtool >/dev/null; then
	[ "$(id -u)" -eq 0 ] || { echo "deps: promtool missing; run as root" >&2; exit 1; }
	echo "deps: installing promtool"
	t=$(mktemp -d)
	apt-get update -qq
	(cd "$t" && apt-get download prometheus >/dev/null && dpkg-deb -x prometheus_*.deb x)
	install -m 0755 "$t/x/usr/bin/promtool" /usr/local/bin/promtool
	rm -rf "$t"
fi
