//! Placement across nodes, simulated on the real roots' files (no
//! partition built): 4 nodes, 64 VMs drawn from the Debian roots in a random
//! order, placed by `provd-placement` with each policy in turn on the same
//! VMs in the same order:
//!
//! * sharing: the node where the VM fits and its image adds the fewest
//!   bytes (provd's `provctl place`);
//! * round-robin;
//! * most-free: the node with the most free memory (Nova's default RAM
//!   weigher; how Proxmox and Incus balance too).
//!
//! Bytes stored fleet-wide: on each node, every (path, content) its VMs'
//! images hold, once (what provd's layers store on that node), plus each
//! VM's private partition (`PRIVATE_MIB`, 3.6 MiB as measured by
//! bench-flow's one-at-a-time run).
//!
//! `ROOTS=a:b:c` (default `/var/tmp/rootfs-{a,b,c}`), `NODES` (4), `VMS`
//! (64), `ORDERS` (5 random orders), `NODE_VCPUS` (48), `PRIVATE_MIB`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use provd_placement::{File, Image, Node, Policy, Resources, Vm, place};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// xorshift64*: the same orders on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn main() -> Result<()> {
    let roots: Vec<PathBuf> = std::env::var("ROOTS")
        .unwrap_or_else(|_| "/var/tmp/rootfs-a:/var/tmp/rootfs-b:/var/tmp/rootfs-c".into())
        .split(':')
        .map(PathBuf::from)
        .collect();
    for r in &roots {
        if !r.is_dir() {
            bail!(
                "{} is not a directory (build the roots as docs/benchmarks.md says)",
                r.display()
            );
        }
    }
    let nodes_n = env_or("NODES", 4) as usize;
    let vms_n = env_or("VMS", 64) as usize;
    let orders = env_or("ORDERS", 5);
    let node_vcpus = env_or("NODE_VCPUS", 48);
    let private = (env_or("PRIVATE_MIB", 36) as f64 / 10.0 * (1 << 20) as f64) as u64;

    let t = Instant::now();
    let images: Vec<Image> = roots
        .iter()
        .map(|r| {
            let files = provd_scan::file_digests(r, 2)?;
            Ok(Image {
                reference: format!("dir:{}", r.display()),
                files: files
                    .into_iter()
                    .map(|f| File { path: f.path, size: f.size, digest: f.digest })
                    .collect(),
            })
        })
        .collect::<Result<_>>()?;
    println!(
        "{} roots read and hashed in {:.1} s (the manager's one read of each image):",
        images.len(),
        t.elapsed().as_secs_f64()
    );
    for i in &images {
        println!("  {}: {} files, {:.1} MiB", i.reference, i.files.len(), mib(i.bytes()));
    }
    let union = {
        let mut all = std::collections::HashSet::new();
        let mut bytes = 0;
        for i in &images {
            bytes += provd_placement::new_bytes(i, &[&all]);
            all.extend(i.files.iter().map(|f| (f.path.clone(), f.digest)));
        }
        bytes
    };
    println!("  every root once, shared (path, content) once: {:.1} MiB", mib(union));
    println!(
        "{nodes_n} nodes of {node_vcpus} vCPUs and {} GiB; {vms_n} VMs of 1, 2 or 4 vCPUs \
         (2 GiB per vCPU), images in a random order; a private partition is {:.1} MiB\n",
        node_vcpus * 2,
        mib(private)
    );
    println!(
        "{:>6} {:>12} {:>14} {:>10} {:>16} {:>12}",
        "order", "policy", "stored MiB", "vs sharing", "nodes used", "VMs per node"
    );
    let policies = [Policy::Sharing, Policy::RoundRobin, Policy::MostFree];
    let mut totals = [0u64; 3];
    for seed in 1..=orders {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ seed);
        let vms: Vec<Vm> = (0..vms_n)
            .map(|i| {
                let vcpus = 1u64 << (rng.next() % 3);
                Vm {
                    name: format!("vm-{i}"),
                    tenant: "default".into(),
                    image: (rng.next() % images.len() as u64) as usize,
                    vcpus,
                    memory_mib: vcpus * 2048,
                    disk_bytes: private,
                }
            })
            .collect();
        let mut stored_sharing = 0;
        for (k, policy) in policies.iter().enumerate() {
            let mut nodes: Vec<Node> = (0..nodes_n)
                .map(|n| Node {
                    name: format!("node-{n}"),
                    free: Resources {
                        vcpus: node_vcpus,
                        memory_mib: node_vcpus * 2048,
                        disk_bytes: 1 << 40,
                    },
                    held: Default::default(),
                })
                .collect();
            let decisions = place(&vms, &images, &mut nodes, *policy);
            let unplaced = decisions.iter().filter(|d| d.node.is_none()).count();
            if unplaced > 0 {
                bail!(
                    "{unplaced} VMs fit no node with {}: give the nodes more vCPUs",
                    policy.as_str()
                );
            }
            let placed_bytes: u64 = decisions.iter().map(|d| d.new_bytes).sum();
            let stored = placed_bytes + private * vms.len() as u64;
            if k == 0 {
                stored_sharing = stored;
            }
            if let Some(t) = totals.get_mut(k) {
                *t += stored;
            }
            let per_node: Vec<usize> = nodes
                .iter()
                .map(|n| decisions.iter().filter(|d| d.node.as_deref() == Some(&n.name)).count())
                .collect();
            let used = per_node.iter().filter(|&&c| c > 0).count();
            println!(
                "{seed:>6} {:>12} {:>14.1} {:>10.3} {:>16} {:>12}",
                policy.as_str(),
                mib(stored),
                stored as f64 / stored_sharing as f64,
                format!("{used} of {nodes_n}"),
                format!("{per_node:?}")
            );
        }
    }
    let [sharing, round_robin, most_free] = totals;
    println!(
        "\nmean over {orders} orders: sharing {:.1} MiB; round-robin {:.1} MiB ({:.2}x); \
         most-free {:.1} MiB ({:.2}x)",
        mib(sharing / orders),
        mib(round_robin / orders),
        round_robin as f64 / sharing as f64,
        mib(most_free / orders),
        most_free as f64 / sharing as f64
    );
    Ok(())
}
