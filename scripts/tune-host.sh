#!/usr/bin/env bash
# Tunes a Linux host for uturn. Run as root. Every change is printed; --dry-run prints them and
# makes none; the values replaced are saved so that --revert restores them.
#
#   scripts/tune-host.sh [--config uturn.toml] [--iface IF]... [--busy-poll USEC] [--persist]
#                        [--notrack] [--dry-run] [--revert]
#
# - socket buffer limits and backlogs: net.core.rmem_max / wmem_max / rmem_default,
#   netdev_max_backlog, somaxconn, and net.ipv4.udp_mem scaled to the host's memory;
# - the relay port range (port-range in --config, default 49152-65535) goes into
#   net.ipv4.ip_local_reserved_ports, so the kernel never hands those ports out as ephemeral
#   ports while uturn's explicit binds still get them;
# - the CPU frequency governor to "performance" where cpufreq exists;
# - each NIC queue's IRQ (--iface, default every interface with a device) pinned to one core in
#   turn, with irqbalance told to keep off (IRQBALANCE_BANNED_CPUS is printed; the service is
#   stopped unless --dry-run); prints the matching `--workers N`;
# - with --busy-poll USEC, net.core.busy_poll and busy_read;
# - with --persist, the sysctls also go to /etc/sysctl.d/90-uturn.conf;
# - with --notrack, an nftables table `inet uturn_notrack` exempts the listen ports (listen in
#   --config, default 3478) and the relay port range from connection tracking in both
#   directions (raw-priority prerouting and output chains, `notrack`), so conntrack's table
#   (nf_conntrack_max) no longer caps allocations (docs/scaling.md). A stateful firewall must
#   then accept `ct state untracked` for these ports; NAT cannot apply to them. --revert deletes
#   the table.
# State: $UTURN_TUNE_STATE (default /var/lib/uturn/tune-host.saved), one "path<TAB>old value" line
# per change.
set -euo pipefail

CONFIG="" DRY=0 REVERT=0 PERSIST=0 BUSY="" NOTRACK=0 IFACES=()
while [ $# -gt 0 ]; do
  case $1 in
    --config) CONFIG=$2; shift 2 ;;
    --iface) IFACES+=("$2"); shift 2 ;;
    --busy-poll) BUSY=$2; shift 2 ;;
    --persist) PERSIST=1; shift ;;
    --notrack) NOTRACK=1; shift ;;
    --dry-run) DRY=1; shift ;;
    --revert) REVERT=1; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "tune-host.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
STATE=${UTURN_TUNE_STATE:-/var/lib/uturn/tune-host.saved}
SYSCTL_D=${UTURN_SYSCTL_D:-/etc/sysctl.d}

# set_value FILE VALUE: records FILE's old value once, then writes VALUE (or only prints it).
set_value() {
  local file=$1 value=$2 old
  [ -e "$file" ] || { echo "skip   $file (absent)"; return 0; }
  old=$(tr '\t' ' ' < "$file" | tr -s ' ' | sed 's/ *$//' | head -1)
  if [ "$old" = "$value" ]; then echo "keep   $file = $value"; return 0; fi
  if [ "$DRY" = 1 ]; then echo "set    $file = $value (was $old)"; return 0; fi
  # Global sysctls are read-only inside a network namespace: skip what cannot be written.
  if ! (printf '%s\n' "$value" > "$file") 2>/dev/null; then
    echo "skip   $file (not writable here)"
    return 0
  fi
  echo "set    $file = $value (was $old)"
  mkdir -p "$(dirname "$STATE")"
  grep -q -F "$file	" "$STATE" 2>/dev/null || printf '%s\t%s\n' "$file" "$old" >> "$STATE"
}

sysctl_path() { echo "/proc/sys/$(echo "$1" | tr . /)"; }

if [ "$REVERT" = 1 ]; then
  [ -f "$STATE" ] || { echo "nothing to revert ($STATE absent)"; exit 0; }
  while IFS=$'\t' read -r file old; do
    if [ "$file" = nftables ]; then
      echo "revert nft delete table $old"
      [ "$DRY" = 1 ] || nft delete table $old 2>/dev/null || echo "  table $old already gone"
      continue
    fi
    echo "revert $file = $old"
    [ "$DRY" = 1 ] || printf '%s\n' "$old" > "$file" || echo "  could not write $file" >&2
  done < "$STATE"
  if [ "$DRY" = 0 ]; then rm -f "$STATE" "$SYSCTL_D/90-uturn.conf"; fi
  exit 0
fi

# The relay port range from the config (port-range = "LO-HI"), else uturn's default.
range="49152-65535"
if [ -n "$CONFIG" ]; then
  r=$(sed -n 's/^[[:space:]]*port-range[[:space:]]*=[[:space:]]*"\([0-9]*-[0-9]*\)".*/\1/p' "$CONFIG" | head -1)
  [ -n "$r" ] && range=$r
fi

# udp_mem (pages): at least 1/16, 1/8 and 1/4 of the memory, never below the current values.
mem_pages=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 4 ))
udp_mem=""
read -r u1 u2 u3 < /proc/sys/net/ipv4/udp_mem 2>/dev/null || { u1=0; u2=0; u3=0; }
for pair in "$u1 $((mem_pages / 16))" "$u2 $((mem_pages / 8))" "$u3 $((mem_pages / 4))"; do
  set -- $pair
  udp_mem="$udp_mem $(( $1 > $2 ? $1 : $2 ))"
done
udp_mem=${udp_mem# }
declare -a SYSCTLS=(
  "net.core.rmem_max=8388608"
  "net.core.wmem_max=8388608"
  "net.core.rmem_default=1048576"
  "net.core.netdev_max_backlog=16384"
  "net.core.somaxconn=4096"
  "net.ipv4.udp_mem=$udp_mem"
  "net.ipv4.ip_local_reserved_ports=$range"
)
[ -n "$BUSY" ] && SYSCTLS+=("net.core.busy_poll=$BUSY" "net.core.busy_read=$BUSY")
echo "== sysctls (relay ports $range reserved from the ephemeral range)"
for kv in "${SYSCTLS[@]}"; do
  set_value "$(sysctl_path "${kv%%=*}")" "${kv#*=}"
done
if [ "$PERSIST" = 1 ]; then
  echo "== persist: $SYSCTL_D/90-uturn.conf"
  if [ "$DRY" = 0 ]; then
    mkdir -p "$SYSCTL_D"
    printf '# Written by uturn scripts/tune-host.sh\n' > "$SYSCTL_D/90-uturn.conf"
    for kv in "${SYSCTLS[@]}"; do printf '%s = %s\n' "${kv%%=*}" "${kv#*=}" >> "$SYSCTL_D/90-uturn.conf"; done
  fi
fi

if [ "$NOTRACK" = 1 ]; then
  # Listen ports from `listen = [...]` in --config (any transport), else uturn's default.
  ports=""
  if [ -n "$CONFIG" ]; then
    ports=$(sed -n 's/^[[:space:]]*listen[[:space:]]*=[[:space:]]*\[\(.*\)\].*/\1/p' "$CONFIG" | head -1 \
      | { grep -oE ':[0-9]+"' || true; } | tr -d ':"' | sort -un | paste -sd, -)
  fi
  ports=${ports:-3478}
  lo=${range%-*} hi=${range#*-}
  ruleset="table inet uturn_notrack {
  chain prerouting {
    type filter hook prerouting priority raw; policy accept;
    udp dport { $ports } counter notrack comment \"client to listen\"
    tcp dport { $ports } counter notrack comment \"client to listen\"
    udp dport $lo-$hi counter notrack comment \"peer to relayed address\"
    tcp dport $lo-$hi counter notrack comment \"peer to relayed address (RFC 6062)\"
  }
  chain output {
    type filter hook output priority raw; policy accept;
    udp sport { $ports } counter notrack comment \"listen to client\"
    tcp sport { $ports } counter notrack comment \"listen to client\"
    udp sport $lo-$hi counter notrack comment \"relayed address to peer\"
    tcp sport $lo-$hi counter notrack comment \"relayed address to peer (RFC 6062)\"
    udp dport { $ports } counter notrack comment \"local client to listen\"
  }
}"
  echo "== conntrack exemption (nftables notrack): listen ports $ports, relay ports $range"
  echo "$ruleset"
  if [ "$DRY" = 0 ]; then
    command -v nft >/dev/null || { echo "tune-host.sh: --notrack needs nft (apt-get install nftables)" >&2; exit 1; }
    # Replace a table left by an earlier run in one transaction.
    printf 'table inet uturn_notrack\ndelete table inet uturn_notrack\n%s\n' "$ruleset" | nft -f -
    echo "set    nftables table inet uturn_notrack"
    mkdir -p "$(dirname "$STATE")"
    grep -q -F "nftables	" "$STATE" 2>/dev/null || printf 'nftables\tinet uturn_notrack\n' >> "$STATE"
  fi
fi

echo "== CPU governor"
found=0
for g in /sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_governor; do
  [ -e "$g" ] || continue
  found=1
  set_value "$g" performance
done
[ "$found" = 1 ] || echo "skip   no cpufreq on this host"

echo "== NIC queue IRQs, one core each"
ncpu=$(nproc)
if [ ${#IFACES[@]} -eq 0 ]; then
  for d in /sys/class/net/*; do [ -e "$d/device" ] && IFACES+=("$(basename "$d")"); done
fi
core=0 queues=0
for ifc in "${IFACES[@]}"; do
  [ -d "/sys/class/net/$ifc/device/msi_irqs" ] || { echo "skip   $ifc (no MSI IRQs)"; continue; }
  for irq in $(ls "/sys/class/net/$ifc/device/msi_irqs" | sort -n); do
    [ -e "/proc/irq/$irq/smp_affinity_list" ] || continue
    set_value "/proc/irq/$irq/smp_affinity_list" "$core"
    core=$(( (core + 1) % ncpu )); queues=$((queues + 1))
  done
done
if [ "$queues" -gt 0 ]; then
  echo "irqbalance: add IRQBALANCE_BANNED_CPUS=$(printf '%x' $(( (1 << ncpu) - 1 ))) to /etc/default/irqbalance, or stop it"
  if [ "$DRY" = 0 ] && command -v systemctl >/dev/null && systemctl is-active --quiet irqbalance 2>/dev/null; then
    echo "stop   irqbalance"; systemctl stop irqbalance
  fi
  workers=$(( queues < ncpu ? queues : ncpu ))
  echo "run uturn with --workers $workers (cores 0-$((workers - 1)) take the NIC queues)"
else
  echo "skip   no NIC queue IRQs found; run uturn with --workers $ncpu"
fi
echo "open files: raise the uturn service's LimitNOFILE (one socket per allocation), e.g. 1048576"
[ "$DRY" = 1 ] && echo "dry run: nothing was changed"
exit 0
