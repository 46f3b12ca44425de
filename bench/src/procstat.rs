//! CPU time and memory of a process from /proc: the server-side figures that stay meaningful
//! on a shared machine where absolute packets/s drift.

use std::io;

/// Clock ticks per second of /proc/PID/stat times: the kernel reports them in USER_HZ, which
/// is 100 on every Linux architecture (proc(5)).
const USER_HZ: u64 = 100;

/// User + system CPU time of process `pid`, all threads, in microseconds.
pub fn cpu_micros(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or(io::ErrorKind::InvalidData)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let parse = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).ok_or(io::ErrorKind::InvalidData);
    let ticks = parse(11)? + parse(12)?;
    Ok(ticks * 1_000_000 / USER_HZ)
}

/// Context switches of process `pid`, all threads (voluntary + involuntary, from
/// /proc/PID/task/*/status): each voluntary one is a sleep and a wake-up, so the count per
/// relayed packet shows how well a relay batches.
pub fn context_switches(pid: u32) -> io::Result<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(status) = std::fs::read_to_string(task?.path().join("status")) else { continue };
        for l in status.lines() {
            if l.starts_with("voluntary_ctxt_switches:") || l.starts_with("nonvoluntary_ctxt_switches:") {
                total += l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            }
        }
    }
    Ok(total)
}

/// Resident memory of process `pid` in bytes (VmRSS).
pub fn rss_bytes(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).ok_or(io::ErrorKind::InvalidData)?;
    let kb: u64 = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).ok_or(io::ErrorKind::InvalidData)?;
    Ok(kb * 1024)
}

/// Kernel memory held by UDP sockets, bytes: the `mem` pages of /proc/net/sockstat's UDP line
/// (buffered datagrams), plus the slab objects of the socket caches (the sockets themselves).
pub fn kernel_udp_bytes() -> io::Result<u64> {
    let sockstat = std::fs::read_to_string("/proc/net/sockstat")?;
    let page = 4096u64;
    let mem_pages = sockstat
        .lines()
        .find(|l| l.starts_with("UDP:"))
        .and_then(|l| l.split_whitespace().skip_while(|w| *w != "mem").nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let mut slab = 0u64;
    if let Ok(s) = std::fs::read_to_string("/proc/slabinfo") {
        for l in s.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() > 3 && matches!(f[0], "UDP" | "UDPv6" | "sock_inode_cache" | "filp" | "dentry") {
                let (active, size) = (f[1].parse::<u64>().unwrap_or(0), f[3].parse::<u64>().unwrap_or(0));
                slab += active * size;
            }
        }
    }
    Ok(mem_pages * page + slab)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        assert!(super::rss_bytes(me).unwrap() > 0);
        let mut x = 0u64;
        for i in 0..3_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        super::cpu_micros(me).unwrap();
        assert!(super::context_switches(me).unwrap() > 0);
    }
}
