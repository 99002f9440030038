//! A process's memory mappings as `/proc/PID/smaps` reports them, for the
//! tests and benchmarks that measure what guests' QEMU processes hold.

/// One mapping: its file's inode (0 for anonymous memory), its size and
/// what of it is resident, whole and proportionally.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mapping {
    pub inode: u64,
    pub size_kib: u64,
    pub rss_kib: u64,
    pub pss_kib: u64,
    /// The mapped file's path, or a name such as `[heap]`; empty for
    /// anonymous memory.
    pub name: String,
}

/// Every mapping of process `pid`.
pub fn mappings(pid: u32) -> std::io::Result<Vec<Mapping>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut maps: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        // A header: address perms offset dev inode [path].
        if let Some((a, b)) = first.split_once('-')
            && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        {
            let at = |s: &str| u64::from_str_radix(s, 16).unwrap_or(0);
            let fields: Vec<&str> = line.split_whitespace().collect();
            maps.push(Mapping {
                inode: fields.get(4).and_then(|i| i.parse().ok()).unwrap_or(0),
                size_kib: at(b).saturating_sub(at(a)) >> 10,
                name: fields.get(5..).map(|n| n.join(" ")).unwrap_or_default(),
                ..Mapping::default()
            });
            continue;
        }
        let kib = || words.clone().next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
        match (maps.last_mut(), first) {
            (Some(m), "Rss:") => m.rss_kib += kib(),
            (Some(m), "Pss:") => m.pss_kib += kib(),
            _ => {}
        }
    }
    Ok(maps)
}
