//! Where each VM goes: for every VM, in the order given, the node where it
//! fits and where its image adds the fewest bytes to what the node already
//! holds, as the node's own layers tell (US 10,365,935: the remote manager
//! determines the instructions from the users' VM configurations; sharing
//! is worth most when VMs of similar images land together).
//!
//! A node's holdings are the files of its layers, keyed by path and content
//! digest: provd's plan shares a file with a layer when both match. A VM
//! adds the bytes of its image's files that the node does not hold; once
//! it is placed there, the node holds them, so the next VM of that image
//! adds nothing. Nothing is kept between runs: each run starts from what
//! the nodes answered.
//!
//! Two policies of the placement systems in use today are here too, for
//! comparison on the same VMs in the same order: round-robin, and the node
//! with the most free memory (Nova's default RAM weigher, also how Proxmox
//! and Incus balance).

use std::collections::{HashMap, HashSet};

use provd_domain::trust::{may_see, tenant_domain};

/// One regular file of an image: path (relative, `/`-separated), size and
/// BLAKE3 content digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    pub path: String,
    pub size: u64,
    pub digest: [u8; 32],
}

/// An image's files, as the manager read them once.
#[derive(Debug, Clone)]
pub struct Image {
    pub reference: String,
    pub files: Vec<File>,
}

impl Image {
    /// Bytes of its files, each (path, content) once.
    pub fn bytes(&self) -> u64 {
        let mut seen = HashSet::new();
        self.files.iter().filter(|f| seen.insert((f.path.as_str(), f.digest))).map(|f| f.size).sum()
    }
}

/// Free resources of a node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    pub vcpus: u64,
    pub memory_mib: u64,
    pub disk_bytes: u64,
}

/// What one node answered: its free resources and the files of its layers.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub free: Resources,
    /// (path, digest) of every file its layers hold, by the layers' trust
    /// domain (`public` or `tenant:<name>`): a VM shares only what the
    /// public layers and its own tenant's hold.
    pub held: HashMap<String, HashSet<(String, [u8; 32])>>,
}

impl Node {
    /// The sets of files a VM of `tenant` may share.
    fn visible(&self, tenant: &str) -> Vec<&HashSet<(String, [u8; 32])>> {
        self.held.iter().filter(|(d, _)| may_see(tenant, d)).map(|(_, set)| set).collect()
    }
}

/// A VM to place: its image (an index into the images) and what it
/// reserves besides the image's new bytes.
#[derive(Debug, Clone)]
pub struct Vm {
    pub name: String,
    /// Its spec's tenant (`default` when the spec names none).
    pub tenant: String,
    pub image: usize,
    pub vcpus: u64,
    pub memory_mib: u64,
    /// Disk the VM needs whatever the node holds: its private partition
    /// and data disks.
    pub disk_bytes: u64,
}

/// How to choose among the nodes a VM fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// The fewest new bytes; ties go to the node with the most free vCPUs,
    /// then memory, then the earlier node: load spreads where sharing does
    /// not decide.
    Sharing,
    /// The next node in turn that fits.
    RoundRobin,
    /// The most free memory, then vCPUs.
    MostFree,
}

impl Policy {
    pub fn parse(s: &str) -> Option<Policy> {
        match s {
            "sharing" => Some(Policy::Sharing),
            "round-robin" => Some(Policy::RoundRobin),
            "most-free" => Some(Policy::MostFree),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Sharing => "sharing",
            Policy::RoundRobin => "round-robin",
            Policy::MostFree => "most-free",
        }
    }
}

/// One node's score for one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Score {
    pub node: String,
    /// Bytes of the image the node lacks.
    pub new_bytes: u64,
    /// Why the VM does not fit, if it does not.
    pub unfit: Option<String>,
    /// The node's free resources before this VM.
    pub free: Resources,
}

/// Where one VM goes, and every node's score.
#[derive(Debug, Clone)]
pub struct Decision {
    pub vm: String,
    pub image: String,
    /// `None`: it fits no node.
    pub node: Option<String>,
    pub new_bytes: u64,
    pub scores: Vec<Score>,
}

/// Bytes of `image` that none of `held` holds, each (path, content) once.
pub fn new_bytes(image: &Image, held: &[&HashSet<(String, [u8; 32])>]) -> u64 {
    let mut seen = HashSet::new();
    image
        .files
        .iter()
        .filter(|f| seen.insert((f.path.as_str(), f.digest)))
        .filter(|f| {
            let key = (f.path.clone(), f.digest);
            !held.iter().any(|h| h.contains(&key))
        })
        .map(|f| f.size)
        .sum()
}

fn unfit(vm: &Vm, free: &Resources, new: u64) -> Option<String> {
    let disk = vm.disk_bytes.saturating_add(new);
    if vm.vcpus > free.vcpus {
        Some(format!("needs {} vCPUs, {} free", vm.vcpus, free.vcpus))
    } else if vm.memory_mib > free.memory_mib {
        Some(format!("needs {} MiB of memory, {} free", vm.memory_mib, free.memory_mib))
    } else if disk > free.disk_bytes {
        Some(format!("needs {disk} bytes of disk, {} free", free.disk_bytes))
    } else {
        None
    }
}

/// Places `vms` in order on `nodes` (updated as VMs land: resources taken,
/// the image's files held) with `policy`.
pub fn place(vms: &[Vm], images: &[Image], nodes: &mut [Node], policy: Policy) -> Vec<Decision> {
    let mut turn = 0usize;
    let mut out = Vec::with_capacity(vms.len());
    for vm in vms {
        let Some(image) = images.get(vm.image) else {
            out.push(Decision {
                vm: vm.name.clone(),
                image: String::new(),
                node: None,
                new_bytes: 0,
                scores: Vec::new(),
            });
            continue;
        };
        let scores: Vec<Score> = nodes
            .iter()
            .map(|n| {
                let new = new_bytes(image, &n.visible(&vm.tenant));
                Score {
                    node: n.name.clone(),
                    new_bytes: new,
                    unfit: unfit(vm, &n.free, new),
                    free: n.free,
                }
            })
            .collect();
        let fitting = || scores.iter().enumerate().filter(|(_, s)| s.unfit.is_none());
        let chosen = match policy {
            Policy::Sharing => fitting()
                .min_by(|(i, a), (j, b)| {
                    a.new_bytes
                        .cmp(&b.new_bytes)
                        .then(b.free.vcpus.cmp(&a.free.vcpus))
                        .then(b.free.memory_mib.cmp(&a.free.memory_mib))
                        .then(i.cmp(j))
                })
                .map(|(i, _)| i),
            Policy::MostFree => fitting()
                .min_by(|(i, a), (j, b)| {
                    b.free
                        .memory_mib
                        .cmp(&a.free.memory_mib)
                        .then(b.free.vcpus.cmp(&a.free.vcpus))
                        .then(i.cmp(j))
                })
                .map(|(i, _)| i),
            Policy::RoundRobin => {
                let n = scores.len();
                let pick = (0..n)
                    .map(|k| (turn + k) % n.max(1))
                    .find(|&i| scores.get(i).is_some_and(|s| s.unfit.is_none()));
                if let Some(i) = pick {
                    turn = i + 1;
                }
                pick
            }
        };
        let mut decision = Decision {
            vm: vm.name.clone(),
            image: image.reference.clone(),
            node: None,
            new_bytes: 0,
            scores,
        };
        if let Some(i) = chosen
            && let Some(node) = nodes.get_mut(i)
        {
            let new = new_bytes(image, &node.visible(&vm.tenant));
            node.free.vcpus -= vm.vcpus;
            node.free.memory_mib -= vm.memory_mib;
            node.free.disk_bytes -= vm.disk_bytes.saturating_add(new);
            // Counted as its tenant's: the manager does not know which
            // images a node's catalogue makes public, and so never counts
            // on sharing a later VM of another tenant could not have.
            node.held
                .entry(tenant_domain(&vm.tenant))
                .or_default()
                .extend(image.files.iter().map(|f| (f.path.clone(), f.digest)));
            decision.node = Some(node.name.clone());
            decision.new_bytes = new;
        }
        out.push(decision);
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    fn image(name: &str, files: &[(&str, u8, u64)]) -> Image {
        Image {
            reference: name.into(),
            files: files
                .iter()
                .map(|&(p, d, size)| File { path: p.into(), size, digest: [d; 32] })
                .collect(),
        }
    }

    fn node(name: &str, vcpus: u64, held: &[(&str, u8)]) -> Node {
        let files = held.iter().map(|&(p, d)| (p.to_string(), [d; 32])).collect();
        Node {
            name: name.into(),
            free: Resources { vcpus, memory_mib: vcpus * 1024, disk_bytes: 1 << 40 },
            held: HashMap::from([("public".to_string(), files)]),
        }
    }

    fn vm(name: &str, image: usize) -> Vm {
        Vm {
            name: name.into(),
            tenant: "default".into(),
            image,
            vcpus: 1,
            memory_mib: 1024,
            disk_bytes: 0,
        }
    }

    #[test]
    fn a_vm_counts_only_the_public_layers_and_its_own_tenants() {
        let images = vec![image("shop", &[("usr/lib/a", 1, 100), ("srv/shop", 2, 50)])];
        // n1 holds the shop's files, but in tenant b's layers; n2 holds only
        // the public library.
        let mut n1 = node("n1", 8, &[]);
        n1.held.insert(
            "tenant:b".into(),
            HashSet::from([("usr/lib/a".to_string(), [1; 32]), ("srv/shop".to_string(), [2; 32])]),
        );
        let mut nodes = vec![n1, node("n2", 4, &[("usr/lib/a", 1)])];
        let a = Vm { tenant: "a".into(), ..vm("a-1", 0) };
        let d = place(std::slice::from_ref(&a), &images, &mut nodes, Policy::Sharing);
        assert_eq!(d[0].scores[0].new_bytes, 150, "b's layers are not a's to share");
        assert_eq!((d[0].node.as_deref(), d[0].new_bytes), (Some("n2"), 50));
        // Tenant b's VM shares its own tenant's layers on n1.
        let b = Vm { tenant: "b".into(), ..vm("b-1", 0) };
        let d = place(&[b], &images, &mut nodes, Policy::Sharing);
        assert_eq!((d[0].node.as_deref(), d[0].new_bytes), (Some("n1"), 0));
        // a's placed VM counts for a's next VM, not for anyone else's.
        let d = place(&[Vm { name: "a-2".into(), ..a }], &images, &mut nodes, Policy::Sharing);
        assert_eq!(d[0].scores[1].new_bytes, 0);
        let c = Vm { tenant: "c".into(), ..vm("c-1", 0) };
        let d = place(&[c], &images, &mut nodes, Policy::Sharing);
        assert_eq!(d[0].scores[1].new_bytes, 50);
    }

    #[test]
    fn a_vm_goes_where_its_image_is_held_and_its_peers_follow() {
        let images = vec![
            image("web", &[("usr/lib/a", 1, 100), ("usr/lib/b", 2, 50), ("etc/web", 3, 1)]),
            image("db", &[("usr/lib/a", 1, 100), ("etc/db", 4, 1)]),
            image("other", &[("opt/x", 9, 500)]),
        ];
        let mut nodes =
            vec![node("n1", 8, &[]), node("n2", 8, &[("usr/lib/a", 1), ("usr/lib/b", 2)])];
        let vms = vec![vm("web-1", 0), vm("db-1", 1), vm("other-1", 2), vm("other-2", 2)];
        let d = place(&vms, &images, &mut nodes, Policy::Sharing);
        assert_eq!(d[0].node.as_deref(), Some("n2"));
        assert_eq!(d[0].new_bytes, 1);
        assert_eq!(d[0].scores[0].new_bytes, 151);
        // db shares usr/lib/a with what n2 holds.
        assert_eq!((d[1].node.as_deref(), d[1].new_bytes), (Some("n2"), 1));
        // Nothing shared anywhere: the node with more free vCPUs.
        assert_eq!((d[2].node.as_deref(), d[2].new_bytes), (Some("n1"), 500));
        // Its peer follows it.
        assert_eq!((d[3].node.as_deref(), d[3].new_bytes), (Some("n1"), 0));
    }

    #[test]
    fn a_full_node_is_skipped_and_a_vm_that_fits_nowhere_is_said() {
        let images = vec![image("web", &[("a", 1, 10)])];
        let mut nodes = vec![node("n1", 1, &[("a", 1)]), node("n2", 2, &[])];
        let vms = vec![vm("a", 0), vm("b", 0), vm("c", 0), vm("d", 0)];
        let d = place(&vms, &images, &mut nodes, Policy::Sharing);
        let at: Vec<Option<&str>> = d.iter().map(|d| d.node.as_deref()).collect();
        assert_eq!(at, vec![Some("n1"), Some("n2"), Some("n2"), None]);
        assert_eq!(d[3].scores[0].unfit.as_deref(), Some("needs 1 vCPUs, 0 free"));
    }

    #[test]
    fn round_robin_and_most_free_ignore_sharing() {
        let images = vec![image("web", &[("a", 1, 10)])];
        let vms: Vec<Vm> = (0..4).map(|i| vm(&format!("v{i}"), 0)).collect();
        let mut nodes = vec![node("n1", 4, &[]), node("n2", 4, &[])];
        let d = place(&vms, &images, &mut nodes, Policy::RoundRobin);
        let at: Vec<&str> = d.iter().map(|d| d.node.as_deref().unwrap()).collect();
        assert_eq!(at, vec!["n1", "n2", "n1", "n2"]);
        let mut nodes = vec![node("n1", 4, &[]), node("n2", 6, &[])];
        let d = place(&vms, &images, &mut nodes, Policy::MostFree);
        let at: Vec<&str> = d.iter().map(|d| d.node.as_deref().unwrap()).collect();
        assert_eq!(at, vec!["n2", "n2", "n1", "n2"]);
    }
}
