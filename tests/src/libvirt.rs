//! Debian's libvirtd, as the node runs it: its stock configuration, QEMU
//! as `libvirt-qemu`. The tests use the one that runs, or start it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::boot::Console;

const URI: &str = "qemu:///system";

/// The node's libvirtd, started here when none ran, and stopped when the
/// last test of the process that holds it is done with it: tests of one
/// binary run in parallel and share it.
#[derive(Debug, Clone)]
pub struct Libvirtd {
    _daemons: Arc<Daemons>,
}

#[derive(Debug)]
struct Daemons {
    started: Vec<Child>,
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for child in self.started.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The daemons the tests of this process hold, if any still does.
static SHARED: Mutex<Weak<Daemons>> = Mutex::new(Weak::new());

/// `virsh -c qemu:///system ARGS`: its output, or its error.
pub fn virsh(args: &[&str]) -> Result<String, String> {
    let out = Command::new("virsh")
        .args(["-c", URI])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("virsh: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("virsh {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Daemons {
    /// None when one runs already; else virtlogd and libvirtd, once
    /// libvirtd answers.
    fn start() -> Result<Daemons, String> {
        if virsh(&["version"]).is_ok() {
            return Ok(Daemons { started: Vec::new() });
        }
        if !Path::new("/usr/sbin/libvirtd").exists() {
            return Err("libvirtd is not installed: Debian's libvirt-daemon-system \
                        (scripts/setup.sh installs it)"
                .into());
        }
        let mut started = Vec::new();
        // QEMU's console log goes through virtlogd (`stdio_handler = "logd"`).
        for daemon in ["/usr/sbin/virtlogd", "/usr/sbin/libvirtd"] {
            let child = Command::new(daemon)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("{daemon}: {e}"))?;
            started.push(child);
        }
        let daemons = Daemons { started };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match virsh(&["version"]) {
                Ok(_) => return Ok(daemons),
                Err(e) if Instant::now() > deadline => return Err(format!("libvirtd: {e}")),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

impl Libvirtd {
    /// The running libvirtd, or one started from Debian's package
    /// (`libvirt-daemon-system`, which `scripts/setup.sh` installs) with its
    /// stock configuration.
    pub fn ensure() -> Result<Libvirtd, String> {
        // Held while starting, so that one test starts the daemons.
        let mut shared = SHARED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(daemons) = shared.upgrade() {
            return Ok(Libvirtd { _daemons: daemons });
        }
        let daemons = Arc::new(Daemons::start()?);
        *shared = Arc::downgrade(&daemons);
        Ok(Libvirtd { _daemons: daemons })
    }

    /// Whether libvirt knows a domain called `name`.
    pub fn defined(&self, name: &str) -> bool {
        virsh(&["domstate", name]).is_ok()
    }
}

/// Reads the serial log `serial_log` (written by virtlogd) of a guest
/// started at `started` until its check has ended or `timeout` passed:
/// the lines up to the check's end, since the guest then boots again.
pub fn console(serial_log: &Path, started: Instant, timeout: Duration) -> Result<Console, String> {
    let mut first_check_line = None;
    loop {
        let text = std::fs::read_to_string(serial_log).unwrap_or_default();
        let lines: Vec<String> =
            text.lines().map(|l| l.trim_end_matches('\r').to_string()).collect();
        if first_check_line.is_none() && lines.iter().any(|l| l.starts_with("provd-check:")) {
            first_check_line = Some(started.elapsed());
        }
        if let Some(end) = lines.iter().position(|l| l == "provd-check: end") {
            let lines = lines.into_iter().take(end + 1).collect();
            let elapsed = started.elapsed();
            return Ok(Console {
                lines,
                first_check_line,
                check_end: Some(elapsed),
                elapsed,
                exited: true,
            });
        }
        if started.elapsed() > timeout {
            return Err(format!(
                "{}: no end of the guest's check in {timeout:?}; its console:\n{text}",
                serial_log.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The pid of the QEMU that libvirt runs domain `name` in, while it runs.
pub fn qemu_pid(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/run/libvirt/qemu/{name}.pid")).ok()?;
    let pid: u32 = text.trim().parse().ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

/// Resident and proportional KiB of process `pid`'s mappings of the file
/// with inode `ino` (`/proc/PID/smaps`): a PSS below the RSS means other
/// processes map some of the same pages.
pub fn mapped_kib(pid: u32, ino: u64) -> Option<(u64, u64)> {
    let maps = crate::smaps::mappings(pid).ok()?;
    Some(
        maps.iter()
            .filter(|m| m.inode == ino)
            .fold((0, 0), |(rss, pss), m| (rss + m.rss_kib, pss + m.pss_kib)),
    )
}

/// Samples, while `names` all run, the KiB each one's QEMU maps of the
/// file with inode `ino`, every 200 ms until `stop` is set; keeps the
/// sample where the smallest of their RSS was largest.
pub fn sample_shared_mappings(
    names: &[&str],
    ino: u64,
    stop: &std::sync::atomic::AtomicBool,
) -> Vec<(String, u64, u64)> {
    let mut best: Vec<(String, u64, u64)> = Vec::new();
    let least = |v: &[(String, u64, u64)]| v.iter().map(|s| s.1).min().unwrap_or(0);
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let sample: Option<Vec<(String, u64, u64)>> = names
            .iter()
            .map(|n| {
                let (rss, pss) = mapped_kib(qemu_pid(n)?, ino)?;
                Some((n.to_string(), rss, pss))
            })
            .collect();
        if let Some(s) = sample
            && (best.is_empty() || least(&s) > least(&best))
        {
            best = s;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    best
}
