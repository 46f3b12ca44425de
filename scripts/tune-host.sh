#!/usr/bin/env bash
# Tunes a Linux host for uturn (run as root; prints what it changes). Safe to run repeatedly.
# - larger socket buffers, so bursts to one worker's listener are not dropped by the kernel;
# - a narrower ephemeral port range (32768-49151, from Linux's default 32768-60999): uturn's
#   relay range (default 49152-65535) overlaps the default ephemeral range; ending
#   ip_local_port_range below 49152 keeps other programs' ephemeral ports out of the relay range
#   (UTURN_TUNE_PORTS=0 leaves it alone).
set -euo pipefail
apply() { echo "sysctl -w $1=$2"; sysctl -qw "$1=$2"; }
apply net.core.rmem_max 8388608
apply net.core.wmem_max 8388608
apply net.core.rmem_default 1048576
apply net.core.netdev_max_backlog 16384
if [ "${UTURN_TUNE_PORTS:-1}" = 1 ]; then
  apply net.ipv4.ip_local_port_range "32768 49151"
fi
echo "open files: raise the uturn service's LimitNOFILE (one socket per allocation), e.g. 1048576"
