//! The node's libvirtd, through libvirt's API (never a `virsh` process):
//! define, start, stop and undefine the domains provd renders, and read
//! their state. Each call opens its own connection, so a libvirtd that
//! restarted meanwhile is simply reached again.

use virt::connect::Connect;
use virt::domain::Domain;

/// Why libvirt refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LibvirtError {
    /// the daemon could not be reached at the URI
    #[error("connecting to libvirt at {uri}: {message}")]
    Connect { uri: String, message: String },
    /// libvirt refused the request
    #[error("libvirt, {what}: {message}")]
    Refused { what: String, message: String },
    /// the domain has no definition of that name, or it is another's
    #[error("libvirt, {what} {name}: {why}")]
    NotOurs { what: &'static str, name: String, why: String },
    /// the guest did not end when asked
    #[error(
        "{name} did not shut down within {seconds} s of being asked (ACPI); \
         a forced stop ends it at once"
    )]
    StillRunning { name: String, seconds: u64 },
}

/// How a running domain is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// At once, as pulling the power cord (`virsh destroy`).
    Now,
    /// The guest is asked to shut down (ACPI) and given `within` to end.
    Shutdown { within: std::time::Duration },
}

/// A domain's state as libvirt reports it, in `virsh domstate`'s words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainState {
    Running,
    Blocked,
    Paused,
    ShuttingDown,
    ShutOff,
    Crashed,
    Suspended,
    Unknown,
}

impl DomainState {
    pub fn as_str(self) -> &'static str {
        match self {
            DomainState::Running => "running",
            DomainState::Blocked => "idle",
            DomainState::Paused => "paused",
            DomainState::ShuttingDown => "in shutdown",
            DomainState::ShutOff => "shut off",
            DomainState::Crashed => "crashed",
            DomainState::Suspended => "pmsuspended",
            DomainState::Unknown => "no state",
        }
    }

    /// Whether a guest may be writing to its disks.
    pub fn is_active(self) -> bool {
        !matches!(self, DomainState::ShutOff | DomainState::Crashed)
    }

    fn from_raw(state: virt::sys::virDomainState) -> DomainState {
        match state {
            virt::sys::VIR_DOMAIN_RUNNING => DomainState::Running,
            virt::sys::VIR_DOMAIN_BLOCKED => DomainState::Blocked,
            virt::sys::VIR_DOMAIN_PAUSED => DomainState::Paused,
            virt::sys::VIR_DOMAIN_SHUTDOWN => DomainState::ShuttingDown,
            virt::sys::VIR_DOMAIN_SHUTOFF => DomainState::ShutOff,
            virt::sys::VIR_DOMAIN_CRASHED => DomainState::Crashed,
            virt::sys::VIR_DOMAIN_PMSUSPENDED => DomainState::Suspended,
            _ => DomainState::Unknown,
        }
    }
}

/// The node's libvirtd at one URI (`qemu:///system`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Libvirt {
    uri: String,
}

fn refused(what: impl Into<String>, e: &virt::error::Error) -> LibvirtError {
    LibvirtError::Refused { what: what.into(), message: e.message().to_string() }
}

impl Libvirt {
    pub fn new(uri: impl Into<String>) -> Libvirt {
        Libvirt { uri: uri.into() }
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    fn connect(&self) -> Result<Connection, LibvirtError> {
        // libvirt's default handler prints every error to stderr, expected
        // ones (a lookup of a domain that is not defined) included, outside
        // the daemon's log; the errors still come back as values.
        static QUIET: std::sync::Once = std::sync::Once::new();
        QUIET.call_once(virt::error::clear_error_callback);
        Connect::open(Some(&self.uri)).map(Connection).map_err(|e| LibvirtError::Connect {
            uri: self.uri.clone(),
            message: e.message().to_string(),
        })
    }

    /// Whether libvirtd answers at the URI.
    pub fn reachable(&self) -> Result<(), LibvirtError> {
        self.connect().map(|_| ())
    }

    /// Defines (or redefines, for the same name and UUID) the domain `xml`
    /// describes; returns its name.
    pub fn define(&self, xml: &str) -> Result<String, LibvirtError> {
        let conn = self.connect()?;
        let domain =
            Domain::define_xml(&conn.0, xml).map_err(|e| refused("defining a domain", &e))?;
        domain.get_name().map_err(|e| refused("reading a domain's name", &e))
    }

    /// Starts domain `name`, which must be defined with `uuid` (a domain of
    /// that name with another UUID is not the caller's, and is refused).
    /// Returns `false` when it was already running.
    pub fn start(&self, name: &str, uuid: &str) -> Result<bool, LibvirtError> {
        let conn = self.connect()?;
        let domain = own(&conn, name, uuid, "starting")?;
        if active(&domain, name)? {
            return Ok(false);
        }
        domain.create().map_err(|e| refused(format!("starting {name}"), &e))?;
        Ok(true)
    }

    /// Stops domain `name`, which must be defined with `uuid`, as `how`
    /// says. Returns `false` when it was not running.
    pub fn stop(&self, name: &str, uuid: &str, how: Stop) -> Result<bool, LibvirtError> {
        let conn = self.connect()?;
        let domain = own(&conn, name, uuid, "stopping")?;
        if !active(&domain, name)? {
            return Ok(false);
        }
        match how {
            Stop::Now => {
                domain.destroy().map_err(|e| refused(format!("stopping {name}"), &e))?;
            }
            Stop::Shutdown { within } => {
                domain.shutdown().map_err(|e| refused(format!("shutting down {name}"), &e))?;
                let deadline = std::time::Instant::now() + within;
                // libvirt's shutdown only asks the guest; its end is
                // seen by polling, as `virsh shutdown --wait` would.
                while active(&domain, name)? {
                    if std::time::Instant::now() >= deadline {
                        return Err(LibvirtError::StillRunning {
                            name: name.to_string(),
                            seconds: within.as_secs(),
                        });
                    }
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
            }
        }
        Ok(true)
    }

    /// Stops domain `name` at once, if it runs, and undefines it, if it is
    /// defined with `uuid`: a domain of that name with another UUID is not
    /// the caller's, and stays. Returns whether one was removed.
    pub fn remove(&self, name: &str, uuid: &str) -> Result<bool, LibvirtError> {
        let conn = self.connect()?;
        let domain = match own(&conn, name, uuid, "removing") {
            Ok(domain) => domain,
            Err(LibvirtError::NotOurs { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        if active(&domain, name)? {
            domain.destroy().map_err(|e| refused(format!("stopping {name}"), &e))?;
        }
        domain.undefine().map_err(|e| refused(format!("undefining {name}"), &e))?;
        Ok(true)
    }

    /// The state of domain `name`, or `None` when libvirt does not know it.
    pub fn state(&self, name: &str) -> Result<Option<DomainState>, LibvirtError> {
        Ok(self.states(&[name])?.pop().flatten())
    }

    /// The state of each domain of `names`, in order, over one connection.
    pub fn states(&self, names: &[&str]) -> Result<Vec<Option<DomainState>>, LibvirtError> {
        let conn = self.connect()?;
        names
            .iter()
            .map(|name| {
                let Some(domain) = lookup(&conn, name)? else { return Ok(None) };
                let (state, _) = domain
                    .get_state()
                    .map_err(|e| refused(format!("reading the state of {name}"), &e))?;
                Ok(Some(DomainState::from_raw(state)))
            })
            .collect()
    }
}

/// A connection, closed when dropped.
struct Connection(Connect);

impl Drop for Connection {
    fn drop(&mut self) {
        let _ = self.0.close();
    }
}

/// Domain `name` if it is defined with `uuid`.
fn own(
    conn: &Connection,
    name: &str,
    uuid: &str,
    what: &'static str,
) -> Result<Domain, LibvirtError> {
    let not_ours = |why: &str| LibvirtError::NotOurs { what, name: name.into(), why: why.into() };
    let domain = lookup(conn, name)?.ok_or_else(|| not_ours("no domain of that name"))?;
    let theirs = domain.get_uuid_string().map_err(|e| refused(format!("reading {name}"), &e))?;
    if !theirs.eq_ignore_ascii_case(uuid) {
        return Err(not_ours(&format!("the domain of that name is another's (UUID {theirs})")));
    }
    Ok(domain)
}

fn active(domain: &Domain, name: &str) -> Result<bool, LibvirtError> {
    domain.is_active().map_err(|e| refused(format!("reading {name}"), &e))
}

fn lookup(conn: &Connection, name: &str) -> Result<Option<Domain>, LibvirtError> {
    match Domain::lookup_by_name(&conn.0, name) {
        Ok(d) => Ok(Some(d)),
        Err(e) if e.code() == virt::error::ErrorNumber::NoDomain => Ok(None),
        Err(e) => Err(refused(format!("looking up {name}"), &e)),
    }
}
