//! What the machine says: resident memory of server processes, this process's CPU time.

/// Resident set size of `pid` in KiB (0 if it cannot be read).
pub fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Total RSS of `pids` in KiB.
pub fn total_rss_kb(pids: &[u32]) -> u64 {
    pids.iter().map(|p| rss_kb(*p)).sum()
}

/// CPU seconds (user + system) used by this process so far.
pub fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// The process ids of every process whose command line contains `needle`, and of their
/// descendants (nginx workers are children of the matched master).
pub fn pids_matching(needle: &str) -> Vec<u32> {
    let mut all = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
            if pid == std::process::id() {
                continue;
            }
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            all.push((pid, parent_of(pid), cmd));
        }
    }
    // Not this tool's own ancestors (a shell whose command line holds the needle).
    let mut mine = vec![std::process::id()];
    while let Some(&last) = mine.last() {
        match parent_of(last) {
            0 | 1 => break,
            p => mine.push(p),
        }
    }
    let mut out: Vec<u32> = all
        .iter()
        .filter(|(pid, _, cmd)| cmd.contains(needle) && !mine.contains(pid))
        .map(|(pid, _, _)| *pid)
        .collect();
    loop {
        let children: Vec<u32> = all
            .iter()
            .filter(|(pid, parent, _)| out.contains(parent) && !out.contains(pid) && !mine.contains(pid))
            .map(|(pid, _, _)| *pid)
            .collect();
        if children.is_empty() {
            return out;
        }
        out.extend(children);
    }
}

fn parent_of(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}
