//! Guests booted under qemu from what provd wrote: the node-side kernel and
//! initramfs, Debian roots carrying `scripts/provd-check` as their first
//! process, and a console reader with a deadline.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

fn script(name: &str, args: &[&Path]) -> Result<(), String> {
    let out = Command::new("bash")
        .arg(repo().join("scripts").join(name))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running scripts/{name}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "scripts/{name} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Debian's cloud kernel unpacked in `dir` (`vmlinuz`, `modules/`), kept
/// between runs.
pub fn guest_kernel(dir: &Path) -> Result<PathBuf, String> {
    script("guest-kernel.sh", &[dir])?;
    Ok(dir.to_path_buf())
}

/// A Debian root with cloud-init in `dir`, kept between runs.
pub fn cloud_root(dir: &Path) -> Result<PathBuf, String> {
    script("cloud-root.sh", &[dir])?;
    Ok(dir.to_path_buf())
}

/// The three small demo roots (`web`, `api`, `db`) from this machine's
/// packages, in `dir`.
pub fn demo_roots(dir: &Path) -> Result<(), String> {
    script("demo-images.sh", &[dir])
}

/// Puts the kernel and an initramfs built from its modules into a node's
/// `boot/` folder as `vmlinuz` and `provd-initrd.img`.
pub fn install_boot_files(kernel: &Path, data: &Path) -> Result<(), String> {
    let boot = data.join("boot");
    std::fs::create_dir_all(&boot).map_err(|e| format!("{}: {e}", boot.display()))?;
    std::fs::copy(kernel.join("vmlinuz"), boot.join("vmlinuz"))
        .map_err(|e| format!("copying the kernel: {e}"))?;
    provd_vm::boot::build_initramfs(
        &kernel.join("modules"),
        Path::new("/bin/busybox"),
        provd_partitions::OVERLAY_ROOT_SCRIPT,
        &boot.join("provd-initrd.img"),
    )
    .map_err(|e| e.to_string())?;
    Ok(())
}

/// Makes `root` boot into `scripts/provd-check`, which hashes `files`.
pub fn add_check(root: &Path, files: &[String]) -> Result<(), String> {
    let io = |what: &str| {
        let what = what.to_string();
        move |e: std::io::Error| format!("{what}: {e}")
    };
    let sbin = root.join("usr/sbin");
    std::fs::create_dir_all(&sbin).map_err(io("usr/sbin"))?;
    let target = sbin.join("provd-check");
    std::fs::copy(repo().join("scripts/provd-check"), &target).map_err(io("provd-check"))?;
    // Where the check counts its boots: the same in every image, so the
    // folder comes from a shared layer and not from the VM's own partition.
    let state = root.join("var/lib/provd-check");
    std::fs::create_dir_all(&state).map_err(io("var/lib/provd-check"))?;
    std::fs::write(state.join("README"), "provd-check counts this guest's boots here\n")
        .map_err(io("var/lib/provd-check/README"))?;
    let mut list = files.join("\n");
    list.push('\n');
    std::fs::write(root.join("etc/provd-check.list"), list).map_err(io("provd-check.list"))?;
    Ok(())
}

/// What a boot printed.
#[derive(Debug, Clone)]
pub struct Console {
    /// Every console line.
    pub lines: Vec<String>,
    /// From qemu's start to the first `provd-check:` line: the guest's
    /// first process is running.
    pub first_check_line: Option<Duration>,
    /// From qemu's start to `provd-check: end`.
    pub check_end: Option<Duration>,
    /// From qemu's start to its exit.
    pub elapsed: Duration,
    /// Whether qemu ended by itself (false: stopped at the deadline).
    pub exited: bool,
}

impl Console {
    /// The values of `provd-check: <key> <value>` lines, in order.
    pub fn facts(&self, key: &str) -> Vec<String> {
        let prefix = format!("provd-check: {key} ");
        self.lines
            .iter()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix(&prefix).map(str::to_string))
            .collect()
    }

    /// Whether the guest's check ran to its end.
    pub fn finished(&self) -> bool {
        self.lines.iter().any(|l| l.trim_end_matches('\r') == "provd-check: end")
    }

    /// The console, for a failure message.
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
}

/// Boots the domain XML at `domain` under plain qemu, as `provctl boot
/// run` does, reading its console until qemu exits or `timeout` passes.
pub fn boot(domain: &Path, timeout: Duration) -> Result<Console, String> {
    let xml = std::fs::read_to_string(domain).map_err(|e| format!("{}: {e}", domain.display()))?;
    let parsed = provd_vm::qemu::parse_domain(&xml).map_err(|e| e.to_string())?;
    boot_domain(&parsed, timeout)
}

/// [`boot`] of a parsed domain (which a caller may have changed).
pub fn boot_domain(parsed: &provd_vm::qemu::Domain, timeout: Duration) -> Result<Console, String> {
    let accel = provd_vm::qemu::Accel::detect();
    let args = provd_vm::qemu::qemu_args(parsed, accel);
    let qemu = provd_vm::qemu::qemu_binary().map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut child = Command::new(&qemu)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", qemu.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, String)>();
    let out_tx = tx.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).into_owned();
            if out_tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let err_reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send((Instant::now(), format!("qemu: {line}"))).is_err() {
                break;
            }
        }
    });
    let deadline = started + timeout;
    let mut lines = Vec::new();
    let mut first_check_line = None;
    let mut check_end = None;
    let mut exited = false;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        match rx.recv_timeout(deadline - now) {
            Ok((at, line)) => {
                if first_check_line.is_none() && line.starts_with("provd-check:") {
                    first_check_line = Some(at - started);
                }
                if line.trim_end_matches('\r') == "provd-check: end" {
                    check_end = Some(at - started);
                }
                lines.push(line);
            }
            // Both pipes closed: qemu is gone.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                exited = true;
                break;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
        }
    }
    if !exited {
        let _ = child.kill();
    }
    let _ = child.wait();
    let elapsed = started.elapsed();
    let _ = reader.join();
    let _ = err_reader.join();
    lines.extend(rx.try_iter().map(|(_, l)| l));
    Ok(Console { lines, first_check_line, check_end, elapsed, exited })
}

/// BLAKE3 of a file, hex.
pub fn file_digest(path: &Path) -> Result<String, String> {
    let mut h = blake3::Hasher::new();
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    std::io::copy(&mut f, &mut h).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(h.finalize().to_hex().to_string())
}
