//! Debian's libvirtd, as the node runs it: its stock configuration, QEMU
//! as `libvirt-qemu`. The tests use the one that runs, or start it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::boot::Console;

const URI: &str = "qemu:///system";

/// The node's libvirtd, started here (and stopped on drop) when none ran.
#[derive(Debug)]
pub struct Libvirtd {
    started: Vec<Child>,
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        for child in self.started.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

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

impl Libvirtd {
    /// The running libvirtd, or one started from Debian's package
    /// (`libvirt-daemon-system`, which `scripts/setup.sh` installs) with its
    /// stock configuration.
    pub fn ensure() -> Result<Libvirtd, String> {
        if virsh(&["version"]).is_ok() {
            return Ok(Libvirtd { started: Vec::new() });
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
        let daemons = Libvirtd { started };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match virsh(&["version"]) {
                Ok(_) => return Ok(daemons),
                Err(e) if Instant::now() > deadline => return Err(format!("libvirtd: {e}")),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Defines the domain in `domain_xml`, starts it and reads its serial
    /// log (`serial_log`, written by virtlogd) until the guest's check has
    /// ended or `timeout` passed; then stops and undefines it.
    pub fn boot(
        &self,
        domain_xml: &Path,
        serial_log: &Path,
        timeout: Duration,
    ) -> Result<Console, String> {
        let xml = domain_xml.display().to_string();
        let defined = virsh(&["define", &xml])?;
        let name = defined
            .split('\'')
            .nth(1)
            .ok_or_else(|| format!("virsh define said {defined:?}"))?
            .to_string();
        let _ = std::fs::remove_file(serial_log);
        let started = Instant::now();
        let result = virsh(&["start", &name]).and_then(|_| {
            let mut first_check_line = None;
            loop {
                let text = std::fs::read_to_string(serial_log).unwrap_or_default();
                let lines: Vec<String> =
                    text.lines().map(|l| l.trim_end_matches('\r').to_string()).collect();
                if first_check_line.is_none() && lines.iter().any(|l| l.starts_with("provd-check:"))
                {
                    first_check_line = Some(started.elapsed());
                }
                // The guest's check ends its boot; libvirt would restart it.
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
                        "{name}: no end of the guest's check in {timeout:?}; its console:\n{text}"
                    ));
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        let _ = virsh(&["destroy", &name]);
        virsh(&["undefine", &name])?;
        result
    }

    /// Whether libvirt knows a domain called `name`.
    pub fn defined(&self, name: &str) -> bool {
        virsh(&["domstate", name]).is_ok()
    }
}
