//! A VM's serial console, kept in a log of bounded size.
//!
//! Cloud Hypervisor writes a `File`-mode serial console with no bound: a
//! guest that prints forever fills the node's disk. So provd renders its
//! serial in `Socket` mode (the VMM listens on `serial.sock` in the VM's
//! directory) and this reader, run beside the VMM (`provctl vm console-log`),
//! copies what the guest prints into `serial.log`, rotating it at a size
//! limit and keeping a fixed number of older files. libvirt's consoles need
//! none of this: virtlogd caps and rotates the log the domain XML names.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Size of one log file before it is rotated, unless configured: what
/// virtlogd keeps by default.
pub const DEFAULT_MAX_BYTES: u64 = 2 * 1024 * 1024;
/// Older files kept beside the current one, unless configured: virtlogd's
/// default too.
pub const DEFAULT_KEEP: u32 = 3;
/// The most older files kept; a typo must not fill a directory.
pub const MAX_KEEP: u32 = 100;
/// The socket a VM's serial console listens on, beside its log.
pub const SOCKET_NAME: &str = "serial.sock";

/// The longest path a Unix socket address holds (`sun_path` less its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// A log file that rotates itself: `serial.log` is written until the next
/// write would take it past `max_bytes`; it then becomes `serial.log.1`, the
/// older ones move up by one, and whatever would become `.keep+1` is gone.
#[derive(Debug)]
pub struct RotatingLog {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: File,
    len: u64,
}

impl RotatingLog {
    /// Opens (appending to) the log at `path`. `max_bytes` must be at least 1
    /// and `keep` at most [`MAX_KEEP`].
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> io::Result<Self> {
        if max_bytes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "max-bytes must be at least 1",
            ));
        }
        if keep > MAX_KEEP {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("keep is {keep}; at most {MAX_KEEP} older files are kept"),
            ));
        }
        let file = open_log(path)?;
        let len = file.metadata()?.len();
        Ok(Self { path: path.to_path_buf(), max_bytes, keep, file, len })
    }

    /// Appends `bytes`, rotating as often as the limit requires: a single
    /// write larger than the limit is split across files, so no file is
    /// ever larger than `max_bytes`.
    pub fn write(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            if self.len >= self.max_bytes {
                self.rotate()?;
            }
            let room = usize::try_from(self.max_bytes - self.len).unwrap_or(usize::MAX);
            let (now, rest) = bytes.split_at(room.min(bytes.len()));
            self.file.write_all(now)?;
            self.len += now.len() as u64;
            bytes = rest;
        }
        Ok(())
    }

    fn numbered(&self, n: u32) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file.flush()?;
        if self.keep == 0 {
            // Nothing older is kept: start the one file over.
            self.file = OpenOptions::new()
                .write(true)
                .truncate(true)
                .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                .open(&self.path)?;
            self.len = 0;
            return Ok(());
        }
        match std::fs::remove_file(self.numbered(self.keep)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        for n in (1..self.keep).rev() {
            match std::fs::rename(self.numbered(n), self.numbered(n + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(&self.path, self.numbered(1))?;
        self.file = open_log(&self.path)?;
        self.len = 0;
        Ok(())
    }
}

/// Opened without following a link at the log's own name: the VM's
/// directory is the node's, but a log must never be redirected onto
/// another file by a planted link.
fn open_log(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
}

/// Copies one connection's output into `log` until the VMM closes it.
/// Returns the bytes copied.
pub fn copy_connection(stream: &mut impl Read, log: &mut RotatingLog) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        log.write(buf.get(..n).unwrap_or_default())?;
        total += n as u64;
    }
}

/// Connects to the VMM's serial socket, waiting for it to appear (the VMM
/// may start after the reader) up to `wait`; `None` when it never did.
pub fn connect(socket: &Path, wait: Duration) -> io::Result<Option<UnixStream>> {
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: a Unix socket path holds at most {MAX_SOCKET_PATH} bytes",
                socket.display()
            ),
        ));
    }
    let started = std::time::Instant::now();
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => return Ok(Some(s)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                if started.elapsed() >= wait {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn read(p: &Path) -> Vec<u8> {
        std::fs::read(p).unwrap_or_default()
    }

    #[test]
    fn a_log_never_passes_its_limit_and_keeps_the_newest_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join(SOCKET_NAME);
        let log = dir.path().join("serial.log");
        let listener = UnixListener::bind(&sock).unwrap();
        // The VMM's side: it listens, and writes what the guest prints in
        // uneven pieces, 3 MiB in all.
        let written: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
        let expect = written.clone();
        let vmm = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            for piece in written.chunks(70_001) {
                s.write_all(piece).unwrap();
            }
        });
        let mut stream = connect(&sock, Duration::from_secs(5)).unwrap().unwrap();
        let mut rl = RotatingLog::open(&log, 1_000_000, 2).unwrap();
        let copied = copy_connection(&mut stream, &mut rl).unwrap();
        vmm.join().unwrap();
        assert_eq!(copied, expect.len() as u64);
        let (cur, one, two) = (
            read(&log),
            read(&dir.path().join("serial.log.1")),
            read(&dir.path().join("serial.log.2")),
        );
        assert!(!dir.path().join("serial.log.3").exists(), "only 2 older files are kept");
        for f in [&cur, &one, &two] {
            assert!(f.len() <= 1_000_000, "a file of {} bytes", f.len());
        }
        // Oldest to newest, the kept files are exactly the stream's tail.
        let kept = [two, one, cur].concat();
        assert_eq!(kept.len(), 1_000_000 * 2 + (expect.len() - 3_000_000));
        assert_eq!(&expect[expect.len() - kept.len()..], &kept[..]);
    }

    #[test]
    fn a_reopened_log_continues_its_count_and_a_link_at_its_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        std::fs::write(&log, vec![b'a'; 900]).unwrap();
        let mut rl = RotatingLog::open(&log, 1000, 1).unwrap();
        rl.write(&[b'b'; 200]).unwrap();
        assert_eq!(read(&log), vec![b'b'; 100]);
        assert_eq!(read(&dir.path().join("serial.log.1")).len(), 1000);

        let target = dir.path().join("elsewhere");
        std::fs::write(&target, b"keep").unwrap();
        let linked = dir.path().join("linked.log");
        std::os::unix::fs::symlink(&target, &linked).unwrap();
        assert!(RotatingLog::open(&linked, 1000, 1).is_err());
        assert_eq!(read(&target), b"keep");

        let mut none = RotatingLog::open(&dir.path().join("n.log"), 10, 0).unwrap();
        none.write(&[b'x'; 25]).unwrap();
        assert_eq!(read(&dir.path().join("n.log")), vec![b'x'; 5]);
        assert!(!dir.path().join("n.log.1").exists());
        assert!(RotatingLog::open(&dir.path().join("z.log"), 0, 1).is_err());
        assert!(RotatingLog::open(&dir.path().join("z.log"), 1, MAX_KEEP + 1).is_err());
    }

    #[test]
    fn a_missing_socket_is_waited_for_and_then_reported_absent() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("none.sock");
        assert!(connect(&gone, Duration::from_millis(250)).unwrap().is_none());
        let long = dir.path().join("x".repeat(120));
        assert!(connect(&long, Duration::ZERO).is_err());
    }
}
