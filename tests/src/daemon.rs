//! A real `provd serve` for tests and benchmarks: certificates, a signing
//! key, a configuration file and the daemon process, on 127.0.0.1.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::pki::{Identity, Pki};

/// Everything a test needs to talk to a node.
#[derive(Debug)]
pub struct TestNode {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub data: PathBuf,
    pub pki: Pki,
    pub manager: Identity,
    /// Trusted by the node.
    pub signer: provd_bundle::SigningKey,
    binary: PathBuf,
    child: Option<Child>,
    pub url: String,
    /// The daemon's stderr log.
    pub log: PathBuf,
    /// Working directory and `--config` argument, when the daemon is
    /// started as a user would from a shell: a relative path.
    relative: Option<(PathBuf, PathBuf)>,
    /// `PROVD_LOG` for the next start; the test process's own, or `info`,
    /// when unset.
    pub log_filter: Option<String>,
}

/// What the configuration says beyond the defaults: TOML appended to it.
pub const DEFAULT_EXTRA: &str =
    "[capacity]\nvcpus = 16\nmemory-mib = 32768\ndisk-bytes = 107374182400\n";

impl TestNode {
    /// Writes certificates, a key and a configuration under `dir`, with
    /// `extra` TOML appended (sections such as `[policy]`), and starts the
    /// daemon `binary`.
    pub fn start(binary: &Path, dir: &Path, extra: &str) -> std::io::Result<TestNode> {
        let pki = Pki::new(&dir.join("pki"), "managers-ca")?;
        let server = pki.server("node")?;
        let manager = pki.client("manager", "manager-1")?;
        let signer = provd_bundle::SigningKey::generate()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let public = dir.join("signer.pub");
        signer
            .public_key()
            .write_file(&public, "test signer")
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let data = dir.join("data");
        let config = dir.join("provd.toml");
        // The node's manager administers it, unless the test says who does.
        let access =
            if extra.contains("[access]") { "" } else { "[access]\nadmins = [\"manager-1\"]\n" };
        // VMs may use any host network and boot file, unless the test
        // says which.
        let allow = "vm-bridges = [\"*\"]\nvm-taps = [\"*\"]\nvm-boot-files = [\"**\"]\n\
                     vm-cmdlines = [\"*\"]\n";
        let extra = if extra.contains("vm-bridges") {
            extra.to_string()
        } else if extra.contains("[policy]\n") {
            extra.replacen("[policy]\n", &format!("[policy]\n{allow}"), 1)
        } else {
            format!("{extra}\n[policy]\n{allow}")
        };
        std::fs::write(
            &config,
            format!(
                "data-dir = {data:?}\nlisten = \"127.0.0.1:0\"\ntrusted-keys = [{public:?}]\n\
                 admin-socket = {sock:?}\n\
                 [tls]\ncert = {cert:?}\nkey = {key:?}\nclient-ca = {ca:?}\n{access}{extra}",
                sock = dir.join("admin.sock"),
                cert = server.cert,
                key = server.key,
                ca = pki.ca_pem,
            ),
        )?;
        let mut node = TestNode {
            dir: dir.to_path_buf(),
            config,
            data,
            pki,
            manager,
            signer,
            binary: binary.to_path_buf(),
            child: None,
            url: String::new(),
            log: dir.join("provd.log"),
            relative: None,
            log_filter: None,
        };
        node.restart()?;
        Ok(node)
    }

    /// Rewrites the configuration with every path relative to its
    /// directory, and from the next restart starts the daemon in the
    /// directory above with `--config <dir name>/provd.toml`.
    pub fn use_relative_config(&mut self) -> std::io::Result<()> {
        let text = std::fs::read_to_string(&self.config)?;
        let prefix = format!("\"{}/", self.dir.display());
        std::fs::write(&self.config, text.replace(&prefix, "\""))?;
        let parent = self.dir.parent().ok_or_else(|| std::io::Error::other("no parent"))?;
        let name = self.dir.file_name().ok_or_else(|| std::io::Error::other("no name"))?;
        self.relative = Some((parent.to_path_buf(), Path::new(name).join("provd.toml")));
        Ok(())
    }

    /// Starts the daemon (again) and waits until it listens.
    pub fn restart(&mut self) -> std::io::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut command = Command::new(&self.binary);
        match &self.relative {
            Some((cwd, config)) => command.current_dir(cwd).args(["serve", "--config"]).arg(config),
            None => command.args(["serve", "--config"]).arg(&self.config),
        };
        let mut child = command
            .env(
                "PROVD_LOG",
                self.log_filter
                    .clone()
                    .or_else(|| std::env::var("PROVD_LOG").ok())
                    .unwrap_or_else(|| "info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| std::io::Error::other("no stdout"))?;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        let Some(addr) = line.trim().strip_prefix("provd listening on ") else {
            let _ = child.kill();
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            return Err(std::io::Error::other(format!("provd did not start: {line:?}\n{log}")));
        };
        self.url = addr.to_string();
        self.child = Some(child);
        Ok(())
    }

    /// The daemon's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The daemon's resident memory in KiB (`VmRSS`), 0 if unknown.
    pub fn rss_kib(&self) -> u64 {
        self.pid().map(rss_kib).unwrap_or(0)
    }

    /// Kills the daemon with SIGKILL: no shutdown, no cleanup.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the daemon with SIGTERM and waits for it; its exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        c.wait().ok()
    }

    /// The client files of the node's manager.
    pub fn tls(&self) -> (PathBuf, PathBuf, PathBuf) {
        (self.pki.ca_pem.clone(), self.manager.cert.clone(), self.manager.key.clone())
    }

    /// A signed bundle of `component` with `manifest`, valid for a day.
    /// A manifest or component the bundle format refuses gives an empty
    /// bundle, after printing why (the node then refuses it, naming it).
    pub fn bundle(&self, manifest: &str, component: &[u8]) -> Vec<u8> {
        self.bundle_valid_for(manifest, component, 86_400)
    }

    /// A signed bundle that expires `seconds` from now.
    pub fn bundle_valid_for(&self, manifest: &str, component: &[u8], seconds: u64) -> Vec<u8> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        match provd_bundle::build(manifest, component, now - 60, now + seconds)
            .and_then(|b| provd_bundle::sign(&b, &self.signer))
        {
            Ok(b) => b,
            Err(e) => {
                eprintln!("cannot build the bundle: {e}");
                Vec::new()
            }
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Resident memory of process `pid` in KiB (`VmRSS`), 0 if unknown.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Samples the resident memory of `pid` every 10 ms until `stop` is set;
/// the thread returns the peak in KiB.
pub fn sample_peak_rss(
    pid: u32,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            peak = peak.max(rss_kib(pid));
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        peak.max(rss_kib(pid))
    })
}
